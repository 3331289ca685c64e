"""Paired timing: the candidates run in turn, round after round, so machine drift hits all alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from recserve.timing import interleaved, paired_ratio

__all__ = ["interleaved", "paired_ratio", "percentiles", "split"]


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


def split(n: int, parts: int) -> list[int]:
    """``n`` in ``parts`` near-equal whole shares, the larger ones first (calls over load generators)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
