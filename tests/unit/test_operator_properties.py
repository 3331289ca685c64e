"""Property tests of the rollout state machine: random canary plans driven by random worlds.

A world is a sequence of ticks: time moves by a random amount, the candidate's Triton counters grow by random
success/failure increments, p99 and shadow agreement wander, the user toggles pause/abort, Triton goes away
and comes back, and now and then someone unloads the candidate. Triton obeys every LoadVersions. Whatever
happens, the weights the operator writes must follow the plan, a failed rollout must end with all traffic on
the stable version, and a terminal rollout must stay put.
"""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recserve.operator.machine import (
    TERMINAL,
    Emit,
    LoadVersions,
    Observations,
    SetWeights,
    Status,
    VersionCounters,
    intended,
    reconcile,
)
from recserve.operator.spec import ModelRolloutSpec

T0 = 1_700_000_000.0


@st.composite
def specs(draw) -> ModelRolloutSpec:
    weights = sorted(draw(st.lists(st.integers(1, 100), min_size=1, max_size=5)))
    steps = [{"weight": w, "pauseSeconds": draw(st.sampled_from([0, 0.5, 1, 5, 30]))} for w in weights]
    thresholds = {"maxErrorRate": draw(st.sampled_from([0.0, 0.01, 0.1, 0.5]))}
    if draw(st.booleans()):
        thresholds["maxP99LatencyMs"] = draw(st.sampled_from([1.0, 5.0, 50.0]))
    if draw(st.booleans()):
        thresholds["minShadowAgreement"] = draw(st.sampled_from([0.5, 0.9]))
    return ModelRolloutSpec.model_validate({
        "model": "ranker", "stableVersion": "1", "candidateVersion": "2", "steps": steps,
        "analysis": {"intervalSeconds": draw(st.sampled_from([0.5, 1, 5, 30])),
                     "failureLimit": draw(st.integers(1, 3)), "minRequests": draw(st.sampled_from([0, 1, 10, 50])),
                     "thresholds": thresholds},
        "triton": {"grpcUrl": "t:8001", "metricsUrl": "http://t:8002/metrics"},
        "router": {"policyFile": "/tmp/p.json", "shadowPercent": draw(st.sampled_from([0, 10])),
                   "drainSeconds": draw(st.sampled_from([0, 0, 15]))},
    })


tick = st.fixed_dictionaries({
    "dt": st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 5.0, 30.0, 60.0]),
    "ok": st.integers(0, 60),
    "bad": st.integers(0, 60) | st.just(0),
    "p99": st.none() | st.sampled_from([0.5, 3.0, 20.0, 80.0]),
    "agreement": st.none() | st.sampled_from([0.3, 0.7, 1.0]),
    "paused": st.booleans(),
    "abort": st.sampled_from([False] * 30 + [True]),
    "reachable": st.sampled_from([True] * 9 + [False]),
    "unload_candidate": st.sampled_from([False] * 30 + [True]),
})


def run(spec: ModelRolloutSpec, ticks: list[dict]):
    """Yields (before, spec used, result) for every tick of a world that obeys the operator."""
    status, now, ok, bad, loaded = Status(), T0, 0.0, 0.0, {"1"}
    for t in ticks:
        now, ok, bad = now + t["dt"], ok + t["ok"], bad + t["bad"]
        if t["unload_candidate"]:
            loaded.discard("2")
        s = spec.model_copy(update={"paused": t["paused"], "abort": t["abort"]})
        obs = Observations(False) if not t["reachable"] else \
            Observations(True, frozenset(loaded), VersionCounters(ok, bad, t["p99"]) if "2" in loaded else None,
                         t["agreement"])
        result = reconcile(s, status, obs, now)
        for a in result.actions:
            if isinstance(a, LoadVersions):
                loaded = set(a.versions)
        yield status, s, result
        status = result.status


def candidate(a: SetWeights) -> int:
    w = dict(a.weights)
    assert w["1"] + w["2"] == 100 and set(w) == {"1", "2"}, a
    return w["2"]


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(specs(), st.lists(tick, min_size=1, max_size=60))
def test_weights_only_move_as_the_steps_allow(spec, ticks) -> None:
    allowed = {0, 100} | {s.weight for s in spec.steps}
    highest = 0
    for before, _, result in run(spec, ticks):
        after = result.status
        for a in (a for a in result.actions if isinstance(a, SetWeights)):
            w = candidate(a)
            assert w in allowed
            if after.phase in ("RolledBack", "Aborted", "Rejected", "Pending"):
                assert w == 0
            elif after.phase == "Promoted":
                assert w == 100
                assert before.phase in ("Progressing", "Paused") and before.step == len(spec.steps) - 1
            elif w == before.weight and after.step == before.step and before.phase in ("Progressing", "Paused"):
                assert after.phase in ("Progressing", "Paused")  # holding the step: its weight written again
            else:  # entering a step: the next one, never further
                assert after.phase == "Progressing"
                expected_step = 0 if before.phase == "Pending" else before.step + 1
                assert after.step == expected_step, (before, after)
                assert w == spec.steps[after.step].weight
                assert w >= highest, "the candidate's weight went down during the rollout"
                highest = w
        if after.phase not in TERMINAL:
            assert after.weight == (0 if after.phase == "Pending" else spec.steps[after.step].weight)
            assert 0 <= after.step < len(spec.steps)
            assert after.step >= before.step


@SETTINGS
@given(specs(), st.lists(tick, min_size=1, max_size=60))
def test_every_failed_rollout_ends_with_all_traffic_on_the_stable_version(spec, ticks) -> None:
    for before, _, result in run(spec, ticks):
        if result.status.phase in ("RolledBack", "Aborted", "Rejected") and before.phase not in TERMINAL:
            writes = [a for a in result.actions if isinstance(a, SetWeights)]
            assert writes, "a rollback must write the routing policy"
            assert dict(writes[-1].weights) == {"1": 100, "2": 0}
            assert (writes[-1].shadow_version, writes[-1].shadow_percent) == (None, 0.0), "still mirroring"
            assert result.status.weight == 0
            if result.status.phase != "Rejected" and spec.router.drain_seconds == 0:
                assert LoadVersions("ranker", ("1",), final=True) in result.actions
                load_i = result.actions.index(LoadVersions("ranker", ("1",), final=True))
                assert result.actions.index(writes[-1]) < load_i, "unloaded before the traffic moved away"
            elif result.status.phase != "Rejected":  # with a drain: the unload comes later, never now
                assert not [a for a in result.actions if isinstance(a, LoadVersions)]
                assert result.status.keep_versions == ["1"] and result.status.unload_after is not None


@SETTINGS
@given(specs(), st.lists(tick, min_size=1, max_size=60))
def test_once_terminal_nothing_more_happens(spec, ticks) -> None:
    """After a terminal decision the only thing left is the drained unload (once); then nothing."""
    terminal, unloads = None, 0
    for _, _, result in run(spec, ticks):
        if terminal is not None:
            loads = [a for a in result.actions if isinstance(a, LoadVersions)]
            assert result.actions == loads and len(loads) <= 1
            unloads += len(loads)
            assert result.status.phase == terminal.phase and result.status.weight == terminal.weight
        elif result.status.phase in TERMINAL:
            terminal = result.status
    assert unloads <= 1


@SETTINGS
@given(specs(), st.lists(tick, min_size=1, max_size=40))
def test_a_paused_rollout_never_moves_traffic_forward(spec, ticks) -> None:
    for before, used, result in run(spec, ticks):
        if used.paused and before.phase not in TERMINAL:
            for a in (a for a in result.actions if isinstance(a, SetWeights)):
                if before.phase == "Pending":  # a rollout paused before its first step keeps the candidate at 0
                    assert candidate(a) == 0
                elif result.status.phase == "Paused":  # held: the step's weight written again, never more
                    assert candidate(a) == before.weight and result.status.step == before.step
                else:
                    assert candidate(a) == 0 and result.status.phase in ("RolledBack", "Aborted", "Rejected")
            if before.phase == "Pending":
                assert result.status.phase in ("Pending", "RolledBack", "Aborted", "Rejected")


@SETTINGS
@given(specs(), st.lists(tick, min_size=1, max_size=40))
def test_reconcile_is_pure_along_any_path(spec, ticks) -> None:
    for before, used, result in run(spec, ticks):
        snapshot = copy.deepcopy(before)
        obs = Observations(True, frozenset({"1", "2"}), VersionCounters(1e6, 10.0, 1.0), 0.9)
        assert reconcile(used, before, obs, T0 + 1e5) == reconcile(used, before, obs, T0 + 1e5)
        assert before == snapshot
        assert Status.from_dict(result.status.to_dict()) == result.status


@SETTINGS
@given(specs(), st.lists(tick, min_size=1, max_size=60))
def test_the_analysis_counts_and_failure_limit_are_respected(spec, ticks) -> None:
    for before, _, result in run(spec, ticks):
        after = result.status
        if after.phase in TERMINAL and before.phase in TERMINAL:
            continue
        assert after.failures <= spec.analysis.failure_limit
        if after.phase == "RolledBack" and after.failures >= spec.analysis.failure_limit:
            assert after.last_analysis is not None and after.last_analysis.verdict == "failed"
        if after.failures > before.failures:
            assert after.failures == before.failures + 1
            assert after.last_analysis.verdict == "failed"
            assert after.last_analysis.requests >= max(1, spec.analysis.min_requests)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), traffic=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 5)), min_size=1, max_size=40),
       dt=st.sampled_from([0.25, 1.0, 5.0, 30.0]))
def test_any_failing_candidate_is_rolled_back_whatever_its_traffic(spec, traffic, dt) -> None:
    """Every tick the candidate fails more than maxErrorRate of its requests (from none to a few dozen per tick):
    it is rolled back, and until then it never gets more than its first step's weight."""
    t = spec.analysis.thresholds.max_error_rate
    status, success, failure, now = Status(), 0.0, 0.0, T0
    loaded, weights = {"1"}, []
    for i in range(5000):
        ok, extra = traffic[i % len(traffic)]
        bad = int(ok * t / (1 - t)) + 1 + extra if t < 1 else ok + 1 + extra  # this tick's error rate > t
        success, failure, now = success + ok, failure + bad, now + dt
        obs = Observations(True, frozenset(loaded), VersionCounters(success, failure, None) if "2" in loaded else None)
        r = reconcile(spec, status, obs, now)
        for a in r.actions:
            if isinstance(a, LoadVersions):
                loaded = set(a.versions)
            if isinstance(a, SetWeights):
                weights.append(dict(a.weights)["2"])
        status = r.status
        if status.phase in TERMINAL and status.unload_after is None:
            break
    assert status.phase == "RolledBack", (status.phase, status.message)
    assert set(weights) <= {0, spec.steps[0].weight} and weights[-1] == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), ticks=st.lists(st.tuples(tick, st.sampled_from(["none"] * 4 + ["before", "after"]),
                                              st.integers(0, 3)), min_size=1, max_size=60))
def test_an_operator_stopped_anywhere_neither_repeats_a_step_nor_restarts_its_clock(spec, ticks) -> None:
    """Each tick the operator may stop before it records the decision, or after recording it with only some of
    its actions done (the API server refuses an Event name it has). Whatever the stops, no step is entered twice
    (no second Step Event), a step's clock never restarts, and once it runs without stops nothing stays pending."""
    status, now, ok, bad, loaded = Status(), T0, 0.0, 0.0, {"1"}
    posted: dict[str, Emit] = {}
    started: dict[int, float] = {}

    def carry_out(actions) -> None:
        nonlocal loaded
        for a in actions:
            if isinstance(a, LoadVersions):
                loaded = set(a.versions)
            if isinstance(a, Emit):
                assert a.key, a
                posted.setdefault(a.key, a)

    for t, stop, done in ticks + [(dict(ticks[-1][0], dt=1.0, reachable=True), "none", 0)] * 3:
        now, ok, bad = now + t["dt"], ok + t["ok"], bad + t["bad"]
        obs = Observations(False) if not t["reachable"] else \
            Observations(True, frozenset(loaded), VersionCounters(ok, bad, t["p99"]) if "2" in loaded else None)
        result = reconcile(spec, status, obs, now)
        recorded = intended(status, result)
        if stop == "before":
            continue
        if stop == "after":
            carry_out(result.actions[:done])
            status = recorded if recorded is not None else status
        else:
            carry_out(result.actions)
            status = result.status
        if status.phase in ("Progressing", "Paused") and status.step_started_at is not None:
            assert started.setdefault(status.step, status.step_started_at) == status.step_started_at, \
                f"step {status.step} restarted"
    steps = [e.message for e in posted.values() if e.reason == "Step"]
    assert len(steps) == len(set(steps)), steps
    assert sum(1 for e in posted.values() if e.reason == "Started") <= 1
    assert status.pending == []
