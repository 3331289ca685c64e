"""Paired timing: candidates run in turn, round after round, so machine drift hits all alike."""

from __future__ import annotations

import time
from collections.abc import Callable

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


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]."""
    return float(np.median(np.asarray(a) / np.asarray(b)))
