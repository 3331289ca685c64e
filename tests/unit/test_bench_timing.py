"""The benchmarks' closed-loop driver (bench/timing.py): every request sent once, concurrency kept,
load split over processes that run side by side."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from bench.timing import LoadPool, _split, client_processes, closed_loop


async def recording_load(outdir: str, delay_s: float, concurrency: int, total: int) -> list[float]:
    """A load against nothing (each call sleeps) that writes its process, peak concurrency and span to
    ``outdir/<pid>.json``."""
    active, peak = [0], [0]

    async def call(_payload) -> None:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        await asyncio.sleep(delay_s)
        active[0] -= 1

    start = time.time()
    latencies = await closed_loop(call, list(range(7)), concurrency, total)
    record = {"pid": os.getpid(), "peak": peak[0], "start": start, "end": time.time(), "requests": len(latencies)}
    (Path(outdir) / f"{os.getpid()}.json").write_text(json.dumps(record))
    return latencies


def records(outdir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in outdir.glob("*.json")]


def test_closed_loop_sends_every_request_once_at_the_given_concurrency(tmp_path: Path) -> None:
    latencies = asyncio.run(recording_load(str(tmp_path), 0.002, 5, 40))
    (r,) = records(tmp_path)
    assert len(latencies) == 40 and r["peak"] == 5
    assert min(latencies) >= 2.0  # milliseconds: at least the sleep


@pytest.mark.parametrize("n, parts, expect", [(64, 4, [16, 16, 16, 16]), (10, 4, [3, 3, 2, 2]), (1, 1, [1])])
def test_split_shares_out_everything(n: int, parts: int, expect: list[int]) -> None:
    assert _split(n, parts) == expect


def test_one_process_runs_in_this_one(tmp_path: Path) -> None:
    with LoadPool(1) as pool:
        latencies, wall = pool.run(recording_load, (str(tmp_path), 0.001), 4, 20)
    (r,) = records(tmp_path)
    assert r["pid"] == os.getpid() and len(latencies) == 20 and wall > 0


def test_two_processes_share_concurrency_and_requests_side_by_side(tmp_path: Path) -> None:
    with LoadPool(2) as pool:
        latencies, wall = pool.run(recording_load, (str(tmp_path), 0.01), 6, 60)
    a, b = records(tmp_path)
    assert len(latencies) == 60 and os.getpid() not in (a["pid"], b["pid"])
    assert (a["peak"], b["peak"], a["requests"], b["requests"]) == (3, 3, 30, 30)
    assert max(a["start"], b["start"]) < min(a["end"], b["end"])  # they overlapped
    assert wall >= max(a["end"], b["end"]) - max(a["start"], b["start"])


def test_client_processes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_CLIENT_PROCS", "3")
    assert client_processes() == 3
    monkeypatch.delenv("BENCH_CLIENT_PROCS")
    assert client_processes() == max(1, (os.cpu_count() or 1) // 4)
