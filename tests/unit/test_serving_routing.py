"""Edge-or-cloud decisions, the circuit breaker and the latency estimate, with a hand-moved clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.serving.routing import CircuitBreaker, Decision, LatencyEstimate, RouteSettings, below_cloud, decide


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


S = RouteSettings(edge_latency_ms=2.0, margin_ms=1.0, max_inflight=4, margin_share=0.0)


# --- decide --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.0, -0.001, -5.0, -1e9])
def test_passed_deadline_is_rejected_whatever_else_holds(budget: float) -> None:
    for allowed in (True, False):
        for inflight in (0, 100):
            d = decide(budget, 1.0, 2.0, allowed, inflight, S)
            assert d.route == "reject"


def test_open_breaker_sends_to_edge() -> None:
    for budget in (None, 3.0, 1000.0):
        d = decide(budget, 1.0, 2.0, False, 0, S)
        assert (d.route, d.reason) == ("edge", "circuit open")


@pytest.mark.parametrize("inflight", [4, 5, 1000])
def test_saturated_cloud_sends_to_edge(inflight: int) -> None:
    for budget in (None, 1000.0):
        d = decide(budget, 1.0, 2.0, True, inflight, S)
        assert (d.route, d.reason) == ("edge", "cloud saturated")


def test_just_below_max_inflight_still_goes_to_cloud() -> None:
    assert decide(1000.0, 1.0, 2.0, True, 3, S).route == "cloud"


def test_estimate_plus_reserve_over_budget_goes_to_edge() -> None:
    # estimate 10 + reserve 3 = 13
    assert decide(12.99, 10.0, 2.0, True, 0, S) == Decision("edge", "deadline")
    assert decide(5.0, 10.0, 2.0, True, 0, S).route == "edge"
    assert decide(13.0, 10.0, 2.0, True, 0, S).route == "cloud"  # exactly fits


def test_within_budget_goes_to_cloud_with_budget_minus_reserve() -> None:
    d = decide(50.0, 10.0, 2.0, True, 0, S)
    assert d.route == "cloud" and d.reason == "within budget"
    assert d.cloud_timeout_ms == pytest.approx(50.0 - 3.0)  # the cloud until only the edge still fits
    s = RouteSettings(edge_latency_ms=7.5, margin_ms=2.5, max_inflight=10, margin_share=0.0)
    assert decide(200.0, 3.0, 7.5, True, 0, s).cloud_timeout_ms == pytest.approx(190.0)


def test_a_share_of_the_budget_is_kept_for_what_the_router_cannot_see() -> None:
    s = RouteSettings(edge_latency_ms=2.0, margin_ms=1.0, max_inflight=4, margin_share=0.1)
    d = decide(100.0, 10.0, 2.0, True, 0, s)  # margin 1 + 10% of 100
    assert d.cloud_timeout_ms == pytest.approx(87.0)
    assert decide(10.0, 6.5, 2.0, True, 0, s).route == "edge"  # 6.5 + 2 + 1 + 1 > 10
    assert decide(10.0, 5.0, 2.0, True, 0, s).route == "cloud"
    assert below_cloud(3.2, 2.0, s, "x").route == "fallback"  # 2 + 1 + 0.32 > 3.2


def test_neither_cloud_nor_edge_fitting_goes_to_the_last_rung() -> None:
    # edge estimate 4 + margin 1 = 5 > 4.5 left: no rung but the last
    assert decide(4.5, 10.0, 4.0, True, 0, S) == Decision("fallback", "deadline; no time left for the edge")
    assert decide(5.0, 10.0, 4.0, True, 0, S) == Decision("edge", "deadline")  # exactly fits
    assert decide(4.5, 10.0, 4.0, False, 0, S).route == "fallback"
    assert decide(4.5, 10.0, 4.0, True, 100, S).reason == "cloud saturated; no time left for the edge"
    # the edge estimate, not the configured starting value, sets the cloud's reserve
    assert decide(50.0, 10.0, 0.5, True, 0, S).cloud_timeout_ms == pytest.approx(50.0 - 1.5)


def test_below_cloud_without_a_deadline_is_always_the_edge() -> None:
    assert below_cloud(None, 1e9, S, "cloud failed") == Decision("edge", "cloud failed")
    assert below_cloud(0.5, 2.0, S, "cloud failed").route == "fallback"


def test_no_budget_goes_to_cloud() -> None:
    d = decide(None, 1e6, 2.0, True, 0, S)
    assert d.route == "cloud" and d.reason == "no deadline"
    assert d.cloud_timeout_ms > 0


@settings(max_examples=400, deadline=None)
@given(
    budget=st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
    estimate=st.floats(min_value=1e-3, max_value=1e5, allow_nan=False),
    inflight=st.integers(min_value=0, max_value=2000),
    allowed=st.booleans(),
    edge=st.floats(min_value=0.0, max_value=500.0, allow_nan=False),
    margin=st.floats(min_value=0.0, max_value=500.0, allow_nan=False),
    max_inflight=st.integers(min_value=1, max_value=1000),
)
def test_cloud_decision_always_leaves_the_fallback_reserve(budget, estimate, inflight, allowed, edge, margin,
                                                           max_inflight) -> None:
    s = RouteSettings(edge_latency_ms=edge, margin_ms=margin, max_inflight=max_inflight, margin_share=0.0)
    d = decide(budget, estimate, edge, allowed, inflight, s)
    assert d.route in ("cloud", "edge", "fallback")
    if d.route == "cloud":
        reserve = edge + margin
        tol = 1e-9 * max(1.0, budget)
        assert allowed and inflight < max_inflight
        assert budget - d.cloud_timeout_ms >= reserve - tol  # the fallback always has its time
        assert d.cloud_timeout_ms >= estimate - tol  # and the cloud gets at least its estimate
        assert math.isfinite(d.cloud_timeout_ms) and d.cloud_timeout_ms > 0
    else:
        # edge only for a reason: breaker, saturation or a budget too small for estimate + reserve
        assert (not allowed) or inflight >= max_inflight or estimate + edge + margin > budget
        # and the last rung only when the edge does not fit either
        assert (d.route == "fallback") == (edge + margin > budget)


# --- CircuitBreaker ------------------------------------------------------------------------------------------------


def test_breaker_opens_after_n_consecutive_failures() -> None:
    b = CircuitBreaker(failure_threshold=3, cooldown_s=2.0, clock=Clock())
    for _ in range(2):
        b.record_failure()
        assert b.state == b.CLOSED and b.allow()
    b.record_failure()
    assert b.state == b.OPEN
    assert not b.allow()


def test_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(failure_threshold=3, cooldown_s=2.0, clock=Clock())
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state == b.CLOSED and b.allow()


def test_open_breaker_stays_open_until_the_cooldown() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=2.0, clock=clock)
    b.record_failure()
    for dt in (0.0, 0.5, 1.0, 1.999):
        clock.t = 1000.0 + dt
        assert not b.allow(), dt
        assert b.state == b.OPEN
    clock.t = 1002.0
    assert b.allow()
    assert b.state == b.HALF_OPEN


def test_half_open_lets_exactly_one_probe_through() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, cooldown_s=1.0, clock=clock)
    b.record_failure()
    b.record_failure()
    clock.t += 5
    assert [b.allow() for _ in range(10)] == [True] + [False] * 9
    assert b.state == b.HALF_OPEN


def test_probe_success_closes_the_breaker() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, cooldown_s=1.0, clock=clock)
    b.record_failure()
    b.record_failure()
    clock.t += 1
    assert b.allow()
    b.record_success()
    assert b.state == b.CLOSED and b.failures == 0
    assert all(b.allow() for _ in range(5))
    # and it takes the full threshold again to open
    b.record_failure()
    assert b.state == b.CLOSED


def test_probe_failure_reopens_for_another_cooldown() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, cooldown_s=2.0, clock=clock)
    for _ in range(3):
        b.record_failure()
    clock.t += 2.5
    assert b.allow()
    b.record_failure()  # one failure is enough in half-open
    assert b.state == b.OPEN
    assert b.opened_at == clock.t
    clock.t += 1.9
    assert not b.allow()
    clock.t += 0.1
    assert b.allow()
    assert not b.allow()


# --- LatencyEstimate -----------------------------------------------------------------------------------------------


def test_latency_estimate_moves_toward_observations() -> None:
    e = LatencyEstimate(alpha=0.1, k=2.0, initial_ms=5.0)
    assert e.estimate_ms == pytest.approx(5.0 + 2.0 * 2.5)
    prev_mean = e.mean
    for _ in range(200):
        e.observe(50.0)
        assert prev_mean < e.mean <= 50.0
        prev_mean = e.mean
    assert e.mean == pytest.approx(50.0, rel=1e-3)
    assert e.dev == pytest.approx(0.0, abs=0.1)  # a steady latency has no deviation left
    assert e.estimate_ms == pytest.approx(50.0, rel=1e-2)
    for _ in range(200):
        e.observe(1.0)
    assert e.mean == pytest.approx(1.0, rel=1e-2)


def test_latency_estimate_one_step_is_an_ewma() -> None:
    e = LatencyEstimate(alpha=0.5, k=1.0, initial_ms=10.0)
    e.observe(20.0)
    # dev: 5 + 0.5 * (|20 - 10| - 5) = 7.5; mean: 10 + 0.5 * 10 = 15
    assert (e.mean, e.dev) == pytest.approx((15.0, 7.5))
    assert e.estimate_ms == pytest.approx(22.5)


def test_jittery_latency_raises_the_estimate_above_the_mean() -> None:
    steady, jittery = LatencyEstimate(), LatencyEstimate()
    for i in range(500):
        steady.observe(10.0)
        jittery.observe(5.0 if i % 2 else 15.0)
    assert steady.mean == pytest.approx(jittery.mean, rel=0.1)
    assert jittery.estimate_ms > steady.estimate_ms + 5


# --- the breaker cannot wedge: random outcomes, cancellations and lost probes ---------------------------------------

OUTCOMES = st.sampled_from(["success", "failure", "cancel", "lost"])
"""What becomes of a call the breaker let through: ``lost`` never reports (a bug the watchdog must survive)."""


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.tuples(st.floats(min_value=0.0, max_value=5.0, allow_nan=False), OUTCOMES), max_size=60),
    threshold=st.integers(min_value=1, max_value=5),
    cooldown=st.floats(min_value=0.1, max_value=3.0, allow_nan=False),
    probe_timeout=st.floats(min_value=0.5, max_value=10.0, allow_nan=False),
)
def test_the_breaker_always_closes_once_the_cloud_is_healthy(steps, threshold, cooldown, probe_timeout) -> None:
    clock = Clock()
    seen: list = []
    b = CircuitBreaker(threshold, cooldown, clock, probe_timeout_s=probe_timeout, on_change=seen.append)
    for dt, outcome in steps:  # a faulty cloud: each request that is let through ends some way
        clock.t += dt
        if b.allow():
            {"success": b.record_success, "failure": b.record_failure, "cancel": b.record_cancel,
             "lost": lambda: None}[outcome]()
        assert (seen[-1] if seen else b.CLOSED) == b.state  # the gauge always reads the state
    # the cloud is healthy again: requests every 50 ms, each let through succeeds
    healthy_since = clock.t
    while b.state != b.CLOSED:
        clock.t += 0.05
        if b.available() and b.allow():
            b.record_success()
        assert clock.t - healthy_since <= cooldown + probe_timeout + 0.1, "the breaker wedged"
    assert b.allow() and b.available()


def test_an_estimate_nothing_lowers_fades_back_to_its_start() -> None:
    """Regression: late cloud answers after a hang pushed the estimate past every budget; no request went to the
    cloud again, so no answer could lower it: the router stayed on the edge after Triton was back."""
    clock = Clock()
    e = LatencyEstimate(initial_ms=5.0, initial_dev_ms=2.5, clock=clock, forget_after_s=1.0)
    for _ in range(20):
        e.observe(3000.0)
    high = e.estimate_ms
    assert high > 1000
    clock.t += 1.0
    assert e.estimate_ms == high  # a busy router never waits this long: nothing fades
    clock.t += 1.0
    assert e.estimate_ms == pytest.approx(10.0 + (high - 10.0) / 2)
    clock.t += 20.0
    assert e.estimate_ms == pytest.approx(10.0, abs=0.01)
    e.observe(4.0)  # learning starts again from the faded values
    assert e.estimate_ms < 10.0
    steady = LatencyEstimate(clock=clock)  # without a half-life nothing fades
    steady.observe(100.0)
    clock.t += 100
    assert steady.estimate_ms > 15
