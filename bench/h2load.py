"""Closed- and open-loop gRPC load from ``h2load``, nghttp2's C HTTP/2 load generator.

A Python gRPC client spends about 50 us of CPU per call; on a small machine that is CPU the server
under test does not get, and the more efficient server configuration loses the most. h2load spends
about 10 us. It knows nothing of gRPC, so a unary call is an HTTP/2 POST of one length-prefixed
message (the same bytes every time), and it sees HTTP statuses only: a gRPC error still arrives as
HTTP 200. Callers check the server's own success counters (see ``bench.triton``).

``scripts/fetch_h2load.sh`` (run by ``make tools``) puts it under ``.tools/bin``.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench.timing import split

TOOLS = Path(__file__).resolve().parent.parent / ".tools" / "bin"


class LoadGeneratorError(RuntimeError):
    """h2load is missing, failed, or did not send what it was asked to."""


def find() -> str:
    """``$H2LOAD``, else ``h2load`` on PATH, else the one ``scripts/fetch_h2load.sh`` installed."""
    for candidate in (os.environ.get("H2LOAD"), shutil.which("h2load"), TOOLS / "h2load"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise LoadGeneratorError("h2load not found: run `make tools` (scripts/fetch_h2load.sh), or put nghttp2's "
                             "h2load on PATH, or set $H2LOAD")


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message: flag byte 0, 4-byte big-endian length, the serialized message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def closed_loop(target: str | list[str], method: str, message: bytes, concurrency: int, total: int,
                connections: int = 4, headers: dict[str, str] | None = None) -> tuple[np.ndarray, float]:
    """Send ``total`` unary calls of ``message`` to ``http://target/method`` with ``concurrency`` in
    flight (over up to ``connections`` HTTP/2 connections, the rest as streams on them): the latencies
    (ms) and the wall seconds from the first request's start to the last response. With a list of
    targets (one port per router replica), the calls and the concurrency are split evenly, one h2load
    process per target, all running at once. ``headers``: extra request metadata, e.g.
    ``{"grpc-timeout": "2S"}`` for a deadline."""
    def args(c: int, n: int) -> tuple[list[str], int]:
        conns = max(d for d in range(1, min(connections, c) + 1) if c % d == 0)  # exactly c in flight
        return [f"--clients={conns}", f"--max-concurrent-streams={c // conns}"], n

    targets = ([target] if isinstance(target, str) else list(target))[:concurrency]
    rows = _run(targets, method, message, headers,
                [args(c, n) for c, n in zip(split(concurrency, len(targets)), split(total, len(targets)))])
    wall_us = int((rows[:, 0] + rows[:, 2]).max() - rows[:, 0].min())
    return rows[:, 2] / 1e3, wall_us / 1e6


def open_loop(target: str | list[str], method: str, message: bytes, rate: float, total: int,
              max_in_flight: int = 256, connections: int = 4,
              headers: dict[str, str] | None = None) -> tuple[np.ndarray, float]:
    """Send ``total`` calls at ``rate`` calls/s whether or not earlier ones have been answered (open
    loop: a slow server's queue shows in the latencies instead of slowing the sender down), spread
    over ``connections`` per target: the latencies (ms) and the achieved rate (calls/s, first to
    last start). ``max_in_flight`` caps the streams open at once, per target; a sender held back by
    the cap would time calls from when they left, not from when they were due, so falling more than
    5% behind ``rate`` raises instead of reporting latencies that hide the wait."""
    targets = [target] if isinstance(target, str) else list(target)

    def args(n: int) -> tuple[list[str], int]:
        conns = max(1, min(connections, n))
        return [f"--clients={conns}", f"--max-concurrent-streams={max(1, max_in_flight // conns)}",
                f"--rps={rate / len(targets) / conns:.6f}"], n

    rows = _run(targets, method, message, headers, [args(n) for n in split(total, len(targets))])
    span_s = (rows[:, 0].max() - rows[:, 0].min()) / 1e6
    achieved = (len(rows) - 1) / span_s if span_s > 0 else float("inf")
    if achieved < 0.95 * rate:
        raise LoadGeneratorError(f"h2load sent {achieved:,.0f} calls/s of the {rate:,.0f} asked for: more than "
                                 f"{max_in_flight} calls were in flight at once; the server cannot carry this rate, "
                                 f"ask for less (or allow more in flight)")
    return rows[:, 2] / 1e3, achieved


def _run(targets: list[str], method: str, message: bytes, headers: dict[str, str] | None,
         per_target: list[tuple[list[str], int]]) -> np.ndarray:
    """One h2load per target with its own load arguments and number of calls, all at once: the log
    rows of all (start us since the epoch, HTTP status, us to the response's end)."""
    with tempfile.TemporaryDirectory(prefix="recserve-h2load-") as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(grpc_frame(message))
        runs = []
        for i, (t, (load, n)) in enumerate(zip(targets, per_target)):
            log = Path(tmp) / f"log{i}"
            cmd = [find(), "--threads=1", *load, f"--requests={n}", f"--data={body}",
                   "--header=content-type: application/grpc", "--header=te: trailers",
                   *(f"--header={k}: {v}" for k, v in (headers or {}).items()),
                   f"--log-file={log}", f"http://{t}/{method.lstrip('/')}"]
            runs.append((t, n, log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        return np.concatenate([_read(t, method, n, log, proc) for t, n, log, proc in runs])


def _read(target: str, method: str, total: int, log: Path, proc: subprocess.Popen) -> np.ndarray:
    out, err = proc.communicate()
    if proc.returncode != 0 or not log.exists():
        raise LoadGeneratorError(f"h2load failed ({proc.returncode}): {(err or out).strip()[-500:]}")
    # one line per request: start (us since the epoch), HTTP status, microseconds to the response's end
    text = log.read_text()
    rows = np.loadtxt(text.splitlines(), dtype=np.int64, ndmin=2) if text.strip() else np.zeros((0, 3), np.int64)
    if len(rows) != total or (rows[:, 1] != 200).any():
        bad = int((rows[:, 1] != 200).sum()) if len(rows) else 0
        raise LoadGeneratorError(f"h2load: {len(rows)} of {total} calls logged, {bad} without HTTP 200; "
                                 f"is the server at {target} up and serving {method}?")
    return rows
