"""Edge or cloud, per request: pure decisions over the deadline, a latency estimate, a circuit breaker
and in-flight load. Time comes from an injected clock, so tests drive it by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class RouteSettings:
    """How the router trades the cloud's quality against the deadline."""

    edge_latency_ms: float = 2.0
    """What answering from the edge model is expected to cost before it has been measured (then the
    edge's moving estimate takes over); kept in reserve so a failed cloud call can still fall back."""
    margin_ms: float = 1.0
    """Slack for serialization and scheduling on top of the estimates."""
    max_inflight: int = 256
    """Cloud calls in flight above which new requests go to the edge."""


@dataclass(frozen=True)
class Decision:
    route: str
    """``cloud``, ``edge``, ``fallback`` (neither fits what is left: the last rung, a stale cached answer
    or the candidates in their given order) or ``reject`` (the deadline had passed on arrival)."""
    reason: str
    cloud_timeout_ms: float = 0.0
    """With ``cloud``: how long to wait for it before falling back to the edge."""


def decide(budget_ms: float | None, cloud_estimate_ms: float, edge_estimate_ms: float, cloud_allowed: bool,
           inflight: int, settings: RouteSettings) -> Decision:
    """Where to send a request with ``budget_ms`` left (None: no deadline), given the moving estimates
    of what the cloud and the edge cost."""
    if budget_ms is not None and budget_ms <= 0:
        return Decision("reject", "deadline already passed")
    if not cloud_allowed:
        return below_cloud(budget_ms, edge_estimate_ms, settings, "circuit open")
    if inflight >= settings.max_inflight:
        return below_cloud(budget_ms, edge_estimate_ms, settings, "cloud saturated")
    if budget_ms is None:
        return Decision("cloud", "no deadline", 10_000.0)
    reserve = edge_estimate_ms + settings.margin_ms
    if cloud_estimate_ms + reserve > budget_ms:
        return below_cloud(budget_ms, edge_estimate_ms, settings, "deadline")
    return Decision("cloud", "within budget", budget_ms - reserve)


def below_cloud(budget_ms: float | None, edge_estimate_ms: float, settings: RouteSettings, why: str) -> Decision:
    """The rung below the cloud: the edge if it fits what is left (None: no deadline), else the last rung."""
    if budget_ms is None or edge_estimate_ms + settings.margin_ms <= budget_ms:
        return Decision("edge", why)
    return Decision("fallback", f"{why}; no time left for the edge")


class LatencyEstimate:
    """Exponentially weighted mean and mean absolute deviation of cloud latency; estimate = mean + k * dev."""

    def __init__(self, alpha: float = 0.1, k: float = 2.0, initial_ms: float = 5.0, initial_dev_ms: float | None = None):
        self.alpha, self.k = alpha, k
        self.mean = initial_ms
        self.dev = initial_ms / 2 if initial_dev_ms is None else initial_dev_ms

    def observe(self, ms: float) -> None:
        self.dev += self.alpha * (abs(ms - self.mean) - self.dev)
        self.mean += self.alpha * (ms - self.mean)

    @property
    def estimate_ms(self) -> float:
        return self.mean + self.k * self.dev


class CircuitBreaker:
    """Closed -> open after ``failure_threshold`` consecutive failures or timeouts; after ``cooldown_s``
    half-open lets one probe through: success closes it, failure opens it again."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False

    def available(self) -> bool:
        """Whether :meth:`allow` would let a call through now, without taking the half-open probe."""
        if self.state == self.OPEN:
            return self.clock() - self.opened_at >= self.cooldown_s
        return self.state == self.CLOSED or not self._probing

    def allow(self) -> bool:
        if self.state == self.OPEN and self.clock() - self.opened_at >= self.cooldown_s:
            self.state, self._probing = self.HALF_OPEN, False
        if self.state == self.CLOSED:
            return True
        if self.state == self.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self.state, self.failures, self._probing = self.CLOSED, 0, False

    def record_failure(self) -> None:
        self.failures += 1
        if self.state == self.HALF_OPEN or self.failures >= self.failure_threshold:
            self.state, self.opened_at, self._probing = self.OPEN, self.clock(), False
