"""Edge or cloud, per request: pure decisions over the deadline, a latency estimate, a circuit breaker
and in-flight load. Time comes from an injected clock, so tests drive it by hand.
"""

from __future__ import annotations

import enum
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
    margin_share: float = 0.2
    """And this share of what is left of the budget: time the router cannot see, which grows with load (the
    request in the kernel and the event loop before its headers are read, the answer's way back to the client)."""


@dataclass(frozen=True)
class Decision:
    route: str
    """``cloud``, ``edge``, ``fallback`` (neither fits what is left: the last rung, a stale cached answer
    or the candidates in their given order) or ``reject`` (the deadline had passed on arrival)."""
    reason: str
    cloud_timeout_ms: float = 0.0
    """With ``cloud``: how long to wait for it: the last moment the edge still fits the deadline after it. A
    cloud that has not answered by then (hung, slow, gone) is a timeout, and the edge answers in time."""


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
    margin = settings.margin_ms + settings.margin_share * budget_ms
    reserve = edge_estimate_ms + margin
    if cloud_estimate_ms + reserve > budget_ms:
        return below_cloud(budget_ms, edge_estimate_ms, settings, "deadline")
    return Decision("cloud", "within budget", budget_ms - reserve)


def below_cloud(budget_ms: float | None, edge_estimate_ms: float, settings: RouteSettings, why: str) -> Decision:
    """The rung below the cloud: the edge if it fits what is left (None: no deadline), else the last rung."""
    if budget_ms is None or edge_estimate_ms + settings.margin_ms + settings.margin_share * budget_ms <= budget_ms:
        return Decision("edge", why)
    return Decision("fallback", f"{why}; no time left for the edge")


class LatencyEstimate:
    """Exponentially weighted mean and mean absolute deviation of a latency; estimate = mean + k * dev.

    With a ``clock`` and ``forget_after_s``, what it has learnt fades toward its initial values once nothing has
    been observed for that long (halving every ``forget_after_s`` more): an estimate only the cloud's answers can
    lower must not keep the cloud away for good (after a hang a few late answers had pushed it past every
    budget, so no request went to the cloud, and nothing lowered it). A busy router never waits that long.
    """

    def __init__(self, alpha: float = 0.1, k: float = 2.0, initial_ms: float = 5.0, initial_dev_ms: float | None = None,
                 clock: Callable[[], float] | None = None, forget_after_s: float | None = None):
        self.alpha, self.k = alpha, k
        self.initial = (initial_ms, initial_ms / 2 if initial_dev_ms is None else initial_dev_ms)
        self.mean, self.dev = self.initial
        self.clock, self.forget_after_s = clock, forget_after_s
        self._seen = clock() if clock is not None else 0.0

    def _faded(self) -> tuple[float, float]:
        if self.clock is None or not self.forget_after_s:
            return self.mean, self.dev
        idle = self.clock() - self._seen - self.forget_after_s
        if idle <= 0:
            return self.mean, self.dev
        keep = 0.5 ** (idle / self.forget_after_s)
        (mean0, dev0) = self.initial
        return mean0 + keep * (self.mean - mean0), dev0 + keep * (self.dev - dev0)

    def observe(self, ms: float) -> None:
        self.mean, self.dev = self._faded()
        if self.clock is not None:
            self._seen = self.clock()
        self.dev += self.alpha * (abs(ms - self.mean) - self.dev)
        self.mean += self.alpha * (ms - self.mean)

    @property
    def estimate_ms(self) -> float:
        mean, dev = self._faded()
        return mean + self.k * dev


class BreakerState(enum.IntEnum):
    """The value of the ``recserve_router_circuit_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Closed -> open after ``failure_threshold`` consecutive failures or timeouts; after ``cooldown_s``
    half-open lets one probe through: success closes it, failure opens it again.

    It cannot wedge: a probe whose caller went away is released (:meth:`record_cancel`), and a probe with
    no outcome after ``probe_timeout_s`` (a lost call: a bug, never a normal path) is given up, so the next
    request probes again. ``on_change`` hears every state change (the router's state gauge)."""

    CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 probe_timeout_s: float = 10.0, on_change: Callable[[BreakerState], None] | None = None):
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.probe_timeout_s = probe_timeout_s
        self.clock = clock
        self.on_change = on_change or (lambda state: None)
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probe_since: float | None = None
        """When the half-open probe went out; None while no probe is out."""

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            self.on_change(state)

    def _tick(self) -> None:
        now = self.clock()
        if self.state == self.OPEN and now - self.opened_at >= self.cooldown_s:
            self._probe_since = None
            self._set(self.HALF_OPEN)
        elif self._probe_since is not None and now - self._probe_since >= self.probe_timeout_s:
            self._probe_since = None  # a probe without an outcome: let another request probe

    def available(self) -> bool:
        """Whether :meth:`allow` would let a call through now, without taking the half-open probe."""
        self._tick()
        return self.state == self.CLOSED or (self.state == self.HALF_OPEN and self._probe_since is None)

    def allow(self) -> bool:
        self._tick()
        if self.state == self.CLOSED:
            return True
        if self.state == self.HALF_OPEN and self._probe_since is None:
            self._probe_since = self.clock()
            return True
        return False

    def record_success(self) -> None:
        self.failures, self._probe_since = 0, None
        self._set(self.CLOSED)

    def record_failure(self) -> None:
        self.failures += 1
        if self.state == self.HALF_OPEN or self.failures >= self.failure_threshold:
            self.opened_at, self._probe_since = self.clock(), None
            self._set(self.OPEN)

    def record_cancel(self) -> None:
        """A call whose caller went away before the cloud answered: no outcome, but a probe is released."""
        if self.state == self.HALF_OPEN:
            self._probe_since = None
