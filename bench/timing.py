"""Paired timing: the candidates run in turn, round after round, so machine drift hits all alike."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np


def interleaved(candidates: dict[str, Callable[[], object]], *, rounds: int = 7, seconds: float = 0.3) -> dict[str, list[float]]:
    """Per candidate, the median seconds per call in each round (one list entry a round)."""
    for fn in candidates.values():  # warm-up
        for _ in range(3):
            fn()
    out: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            times, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end or len(times) < 5:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[name].append(float(np.median(times)))
    return out


def percentiles(candidates: dict[str, Callable[[], object]], *, calls: int = 2000) -> dict[str, dict[str, float]]:
    """p50/p99 milliseconds of single calls, the candidates alternating call by call."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        for _ in range(20):
            fn()
    for _ in range(calls):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: {"p50_ms": float(np.percentile(s, 50) * 1e3), "p99_ms": float(np.percentile(s, 99) * 1e3)}
            for name, s in samples.items()}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]."""
    return float(np.median(np.asarray(a) / np.asarray(b)))


# --------------------------------------------------------------------------------- closed-loop load


async def closed_loop(call: Callable, payloads: list, concurrency: int, total: int) -> list[float]:
    """``concurrency`` workers each send the next payload as soon as their last call returned; the
    latencies in milliseconds."""
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(payloads[i % len(payloads)])
            latencies.append((time.perf_counter() - t0) * 1e3)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def client_processes() -> int:
    """Load-generating processes: ``$BENCH_CLIENT_PROCS``, else a quarter of the cores (one on 2 cores).
    One Python process tops out near 8,000 small gRPC calls/s; on a larger machine it, not the server,
    would set the throughput."""
    env = os.environ.get("BENCH_CLIENT_PROCS")
    return max(1, int(env) if env else (os.cpu_count() or 1) // 4)


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _warm() -> int:
    import grpc  # noqa: F401  (the imports a load needs, paid before any clock starts)
    import numpy  # noqa: F401

    time.sleep(0.2)  # held, so that each warm-up call lands on its own process
    return os.getpid()


def _run_at(load: Callable, args: tuple, concurrency: int, total: int, start_at: float) -> tuple[float, list[float]]:
    time.sleep(max(0.0, start_at - time.time()))
    latencies = asyncio.run(load(*args, concurrency, total))
    return time.time(), latencies


class LoadPool:
    """Closed-loop load, split over ``procs`` processes that start together. ``load`` is a module-level
    ``async def load(*args, concurrency, total) -> latencies_ms``; with one process it runs in this one."""

    def __init__(self, procs: int | None = None):
        self.procs = procs or client_processes()
        self._pool = ProcessPoolExecutor(self.procs, mp_context=mp.get_context("spawn")) if self.procs > 1 else None
        if self._pool is not None:
            for f in [self._pool.submit(_warm) for _ in range(self.procs)]:
                f.result()

    def run(self, load: Callable, args: tuple, concurrency: int, total: int) -> tuple[list[float], float]:
        """All latencies (ms) and the wall seconds from the common start to the last process's end."""
        if self._pool is None:
            t0 = time.perf_counter()
            latencies = asyncio.run(load(*args, concurrency, total))
            return latencies, time.perf_counter() - t0
        procs = min(self.procs, concurrency)
        start_at = time.time() + 1.0  # every process imported and connected before the clock starts
        futures = [self._pool.submit(_run_at, load, args, c, n, start_at)
                   for c, n in zip(_split(concurrency, procs), _split(total, procs))]
        results = [f.result() for f in futures]
        return [x for _, lat in results for x in lat], max(end for end, _ in results) - start_at

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> LoadPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
