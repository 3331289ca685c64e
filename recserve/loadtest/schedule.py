"""Intended send times of an open-loop run: pure functions of the arrival spec and a seed."""

from __future__ import annotations

import numpy as np

from recserve.loadtest.scenario import Arrivals


def rate_at(arrivals: Arrivals, t: float) -> float:
    r = arrivals.rate
    for b in arrivals.bursts:
        if b.at_s <= t < b.at_s + b.duration_s:
            r *= b.multiplier
    return r


def schedule(arrivals: Arrivals, seed: int = 0) -> np.ndarray:
    """Offsets in seconds from the start (warm-up included), sorted.

    Constant: evenly spaced at the current rate. Poisson: exponential gaps at the current rate
    (bursts change the rate piecewise; a gap drawn across a rate change is fine at these scales).
    """
    total = arrivals.warmup_s + arrivals.duration_s
    rng = np.random.default_rng(seed)
    times, t = [], 0.0
    while True:
        rate = rate_at(arrivals, t - arrivals.warmup_s if t >= arrivals.warmup_s else -1.0)
        gap = 1.0 / rate if arrivals.process == "constant" else rng.exponential(1.0 / rate)
        t += gap
        if t >= total:
            break
        times.append(t)
    return np.asarray(times)
