"""The kopf handlers called directly, with kopf-like arguments (a real ``kopf.Patch``), a fake observation
and recorded actions: what reaches the status, when errors are temporary or permanent, what the finalizer does.

``recserve.operator.handlers`` reads RECSERVE_OPERATOR_TICK_SECONDS when first imported and registers its
handlers in kopf's global registry; the ``handlers`` fixture imports it with the same 0.5 s tick as the
integration tests, so the order the test modules run in does not matter.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import kopf
import pytest

from recserve.operator.machine import Emit, LoadVersions, Observations, SetWeights, Status, VersionCounters
from recserve.serving.policy import parse_policy

LOG = logging.getLogger("test-operator")
SPEC = {
    "model": "ranker", "stableVersion": "1", "candidateVersion": "2",
    "steps": [{"weight": 10, "pauseSeconds": 60}],
    "triton": {"grpcUrl": "127.0.0.1:1", "metricsUrl": "http://127.0.0.1:1/metrics"},
    "router": {"policyFile": "/nonexistent/policy.json", "drainSeconds": 0},
}
BODY = {"apiVersion": "recserve.io/v1alpha1", "kind": "ModelRollout",
        "metadata": {"name": "r", "namespace": "ns", "uid": "u-1", "generation": 1}}
"""metadata.generation: the API server bumps it on every spec change."""


@pytest.fixture
def handlers(monkeypatch):
    if "recserve.operator.handlers" not in sys.modules:
        monkeypatch.setenv("RECSERVE_OPERATOR_TICK_SECONDS", os.environ.get("RECSERVE_OPERATOR_TICK_SECONDS", "0.5"))
    return importlib.import_module("recserve.operator.handlers")


@pytest.fixture
def world(handlers, monkeypatch):
    """Fake observations; records carried-out actions and posted events."""

    class World:
        obs = Observations(True, frozenset({"1", "2"}), VersionCounters(0.0, 0.0, 1.0))
        observed = 0
        actions: list = []
        events: list = []
        recorded: list = []
        """Statuses written before the actions (``act.record_status``)."""
        fail_with: Exception | None = None

    w = World()

    def fake_observe(spec, pods):
        w.observed += 1
        return w.obs

    def fake_carry_out(spec, actions, body, namespace, pods):
        if w.fail_with is not None:
            raise w.fail_with
        if actions:  # what was carried out (a look that decided nothing carries out nothing)
            w.actions.append(list(actions))

    monkeypatch.setattr(handlers, "observe", fake_observe)
    monkeypatch.setattr(handlers, "carry_out", fake_carry_out)
    monkeypatch.setattr(handlers, "_custom_api", lambda: None)
    monkeypatch.setattr(handlers.act, "record_status", lambda api, body, status: w.recorded.append(dict(status)))
    monkeypatch.setattr(kopf, "event", lambda body, *, type, reason, message="": w.events.append((type, reason, message)))
    return w


def call(handler, spec=SPEC, status=None, retry=0, generation=1, memo=None, index=None, patch=None) -> kopf.Patch:
    """One call as kopf makes it; ``memo``: the rollout's in-memory memo (kopf keeps one per object), ``index``:
    ``rollouts_by_model`` (kopf's index of every rollout; this one alone by default)."""
    patch = kopf.Patch() if patch is None else patch
    meta = {**BODY["metadata"], "generation": generation, "creationTimestamp": "2026-12-01T10:00:00Z"}
    body = {**BODY, "metadata": meta, "spec": spec}
    if index is None:
        index = {("ns", spec.get("model")): [(meta["creationTimestamp"], meta["name"])]}
    handler(body=body, spec=spec, meta=meta, status=status, patch=patch, namespace="ns", name=meta["name"],
            retry=retry, logger=LOG, memo=kopf.Memo() if memo is None else memo, rollouts_by_model=index)
    return patch


def test_a_tick_runs_the_state_machine_and_writes_its_status(handlers, world) -> None:
    patch = call(handlers.on_tick)
    assert world.observed == 1
    assert world.actions == [[Emit("Normal", "Started", "canary of version 2 started"),
                              SetWeights("ranker", (("1", 90), ("2", 10))),
                              Emit("Normal", "Step", "step 1/1 at 10%")]]
    status = patch["status"]
    assert status["phase"] == "Progressing" and status["weight"] == 10 and status["step"] == 0
    assert status["stableVersion"] == "1" and status["candidateVersion"] == "2"
    assert Status.from_dict(dict(status)).phase == "Progressing"


def test_a_tick_that_changes_nothing_writes_nothing(handlers, world) -> None:
    status = dict(call(handlers.on_tick)["status"])
    status.update(call(handlers.on_tick, status=status)["status"])  # "(waiting for a passing analysis)"
    carried_out = len(world.actions)
    patch = call(handlers.on_tick, status=status)
    assert len(world.actions) == carried_out, "no actions"
    assert "status" not in patch or not patch["status"]


@pytest.mark.parametrize("retry,delay", [(0, 1.0), (3, 8.0), (9, 32.0)])
def test_failed_actions_stay_pending_and_are_retried_with_backoff(handlers, world, retry, delay) -> None:
    world.fail_with = OSError("disk full")
    patch = kopf.Patch()
    with pytest.raises(kopf.TemporaryError) as e:
        call(handlers.on_tick, retry=retry, patch=patch)
    assert e.value.delay == delay
    assert "OSError: disk full" in str(e.value)
    assert not patch.get("status")  # kopf writes nothing: what was recorded before the actions stands
    [recorded] = world.recorded
    assert recorded["phase"] == "Progressing" and [a["kind"] for a in recorded["pending"]] == ["Emit", "SetWeights",
                                                                                               "Emit"]


def test_a_decision_is_recorded_before_its_actions_and_carried_out_again_not_decided_again(handlers, world) -> None:
    """The operator stopped (or an action failed) after recording step 1: the next look carries out the same
    actions, keeps the step's clock and posts the Events under the same names; then the pending list is cleared."""
    world.fail_with = OSError("the API server went away")
    with pytest.raises(kopf.TemporaryError):
        call(handlers.on_tick)
    [recorded] = world.recorded
    world.fail_with = None
    patch = call(handlers.on_tick, status=recorded)
    assert len(world.recorded) == 1, "a replay records nothing new"
    replayed = world.actions[-1]
    assert [type(a).__name__ for a in replayed] == ["Emit", "SetWeights", "Emit"]
    assert [a.key for a in replayed if isinstance(a, Emit)] == [a["key"] for a in recorded["pending"] if a["kind"] == "Emit"]
    status = dict(patch["status"])
    assert status["pending"] == [] and status["stepStartedAt"] == recorded["stepStartedAt"]
    assert status["weight"] == 10 and status["step"] == 0


def test_a_finished_rollout_with_actions_pending_does_not_rest(handlers, world) -> None:
    pending = [{"kind": "SetWeights", "model": "ranker", "weights": [["1", 100], ["2", 0]], "shadowVersion": None,
                "shadowPercent": 0.0}]
    status = {"phase": "RolledBack", "stableVersion": "1", "candidateVersion": "2", "observedGeneration": 1,
              "pending": pending}
    patch = call(handlers.on_tick, status=status)
    assert world.actions == [[SetWeights("ranker", (("1", 100), ("2", 0)))]]
    assert patch["status"]["pending"] == []
    assert not call(handlers.on_tick, status={**status, "pending": []}).get("status")
    assert len(world.actions) == 1


def test_failing_loads_still_start_the_load_clock_and_end_in_a_rollback(handlers, world) -> None:
    from recserve.errors import ServerError

    spec = {**SPEC, "loadTimeoutSeconds": 0.2}
    world.obs = Observations(True, frozenset({"1"}))  # the candidate is not loaded, and loading it fails
    world.fail_with = ServerError("failed to load 'ranker': version 2 has no model.onnx")
    with pytest.raises(kopf.TemporaryError):
        patch = kopf.Patch()
        call(handlers.on_tick, spec=spec, patch=patch)
    status = dict(patch["status"])
    assert status["phase"] == "Pending" and status["weight"] == 0 and status["loadingSince"] > 0
    assert "loading failed (ServerError: failed to load 'ranker': version 2 has no model.onnx)" in status["message"]

    world.fail_with = None
    status["loadingSince"] -= 1.0  # the timeout has passed
    patch = call(handlers.on_tick, spec=spec, status=status)
    assert patch["status"]["phase"] == "RolledBack" and "not loaded after" in patch["status"]["message"]
    assert SetWeights("ranker", (("1", 100), ("2", 0))) in world.actions[-1]


def test_an_invalid_spec_is_rejected_once_with_a_clear_message(handlers, world) -> None:
    bad = {**SPEC, "candidateVersion": "1"}
    patch = call(handlers.on_tick, spec=bad, status={})
    status = dict(patch["status"])
    assert status["phase"] == "Rejected" and status["weight"] == 0 and status["observedGeneration"] == 1
    assert "candidateVersion must differ from stableVersion" in status["message"]
    assert world.events == [("Warning", "InvalidSpec", status["message"])]
    assert world.observed == 0 and world.actions == []
    # the next ticks see the Rejected status and leave it alone: no crash loop, no event storm
    for _ in range(3):
        again = call(handlers.on_tick, spec=bad, status=status)
        assert not again.get("status")
    assert len(world.events) == 1


def test_a_differently_invalid_spec_is_reported_again(handlers, world) -> None:
    status = dict(call(handlers.on_tick, spec={**SPEC, "candidateVersion": "1"}, status={})["status"])
    patch = call(handlers.on_tick, spec={**SPEC, "candidateVersion": "x"}, status=status, generation=2)
    assert "should match pattern" in patch["status"]["message"] and patch["status"]["observedGeneration"] == 2
    assert [e[1] for e in world.events] == ["InvalidSpec", "InvalidSpec"]


@pytest.mark.parametrize("phase", ["Promoted", "RolledBack", "Aborted", "Rejected"])
def test_a_finished_rollout_looks_at_its_tritons_once_per_resync_interval(handlers, world, phase) -> None:
    """Every RESYNC_SECONDS, for a Triton that restarted; a rejected one never loaded anything: never."""
    status = {"phase": phase, "stableVersion": "1", "candidateVersion": "2", "observedGeneration": 1}
    world.obs = Observations(True, frozenset({"1"} if phase != "Promoted" else {"2"}),
                             pods={"p": frozenset({"1"} if phase != "Promoted" else {"2"})})
    memo = kopf.Memo()
    patches = [call(handlers.on_tick, status=status, memo=memo) for _ in range(3)]
    assert world.observed == (0 if phase == "Rejected" else 1)
    assert world.actions == [] and not any(patches), "it serves what the rollout ended on: nothing to do"


def test_a_finished_rollout_loads_its_versions_again_on_a_restarted_triton(handlers, world) -> None:
    status = {"phase": "Promoted", "stableVersion": "1", "candidateVersion": "2", "observedGeneration": 1}
    world.obs = Observations(True, frozenset({"1"}), pods={"a": frozenset({"2"}), "b": frozenset({"1"})})
    patch = call(handlers.on_tick, status=status)
    assert world.actions == [[LoadVersions("ranker", ("2",), pod="b")]] and not patch


def test_a_finished_rollout_superseded_by_a_newer_one_leaves_triton_alone(handlers, world) -> None:
    """Once a rollout created later drives the model, the old one must not load its own version back."""
    status = {"phase": "Promoted", "stableVersion": "1", "candidateVersion": "2", "observedGeneration": 1}
    world.obs = Observations(True, frozenset({"3"}), pods={"a": frozenset({"3"})})
    newer = {("ns", "ranker"): [("2026-12-01T10:00:00Z", "r"), ("2026-12-02T09:00:00Z", "r-v3")]}
    call(handlers.on_tick, status=status, index=newer)
    assert world.observed == 1 and world.actions == []
    older = {("ns", "ranker"): [("2026-11-01T10:00:00Z", "r-v1"), ("2026-12-01T10:00:00Z", "r")]}
    call(handlers.on_tick, status=status, index=older)
    assert world.actions == [[LoadVersions("ranker", ("2",), pod="a")]]


def test_the_rollout_index_keys_a_rollout_by_every_model_it_drives(handlers) -> None:
    meta = {"creationTimestamp": "2026-12-01T10:00:00Z"}
    assert handlers.rollouts_by_model(namespace="ns", name="r", spec={**SPEC, "candidateModel": "ranker_trt"},
                                      meta=meta) == {("ns", "ranker"): (meta["creationTimestamp"], "r"),
                                                     ("ns", "ranker_trt"): (meta["creationTimestamp"], "r")}
    # a newer rollout of the candidate's model supersedes this one too
    index = {("ns", "ranker_trt"): [("2026-12-02T00:00:00Z", "other")]}
    assert handlers.superseded(index, "ns", "r", {**SPEC, "candidateModel": "ranker_trt"}, meta)
    assert not handlers.superseded(index, "ns", "r", SPEC, meta)


@pytest.mark.parametrize("status", [
    {"phase": "Promoted", "stableVersion": "1", "candidateVersion": "2", "weight": 100, "observedGeneration": 1},
    {"phase": "Rejected", "message": "spec.: Value error, candidateVersion must differ from stableVersion", "weight": 0,
     "observedGeneration": 1},
], ids=["new-candidate-after-promotion", "fixed-invalid-spec"])
def test_a_new_target_after_a_terminal_phase_starts_over(handlers, world, status) -> None:
    spec = {**SPEC, "stableVersion": "2", "candidateVersion": "3"} if status["phase"] == "Promoted" else SPEC
    world.obs = Observations(True, frozenset({"1", "2"}), VersionCounters())
    patch = call(handlers.on_tick, spec=spec, status=status, generation=2)  # the spec changed
    assert world.observed == 1
    assert patch["status"]["phase"] in ("Pending", "Progressing")
    assert patch["status"]["candidateVersion"] == spec["candidateVersion"]


def test_the_finalizer_puts_all_traffic_back_on_the_stable_version(handlers, world) -> None:
    handlers.on_delete(body=BODY, spec=SPEC, status={"phase": "Progressing", "weight": 10}, namespace="ns", logger=LOG)
    # routes first, unloads after the drain (0 s here): two separate steps
    assert world.actions == [[SetWeights("ranker", (("1", 100), ("2", 0)))], [LoadVersions("ranker", ("1",), final=True)]]


@pytest.mark.parametrize("status,spec", [
    ({"phase": "Promoted"}, SPEC), ({"phase": "RolledBack"}, SPEC),
    ({"phase": "Pending"}, {**SPEC, "candidateVersion": "1"}),  # an invalid spec: nothing to undo
])
def test_the_finalizer_leaves_finished_or_invalid_rollouts_alone(handlers, world, status, spec) -> None:
    handlers.on_delete(body=BODY, spec=spec, status=status, namespace="ns", logger=LOG)
    assert world.actions == []


def test_carry_out_runs_each_action_against_its_target(handlers, monkeypatch, tmp_path: Path) -> None:
    from recserve.operator import act
    from recserve.operator.spec import ModelRolloutSpec

    loads, cms, events = [], [], []
    monkeypatch.setattr(act, "load_versions", lambda spec, a, pods: loads.append((a, pods)))
    monkeypatch.setattr(act, "set_weights_configmap", lambda api, ns, name, a: cms.append((ns, name, a)))
    monkeypatch.setattr(handlers, "_core_api", lambda: "core-v1")
    monkeypatch.setattr(act, "post_event", lambda api, body, emit: events.append((api, emit.type, emit.reason, emit.message)))
    spec = ModelRolloutSpec.model_validate({**SPEC, "router": {"policyFile": str(tmp_path / "p.json"),
                                                               "configMap": "routing"}})
    w = SetWeights("ranker", (("1", 60), ("2", 40)))
    handlers.carry_out(spec, [LoadVersions("ranker", ("1", "2")), w, Emit("Normal", "Step", "hi")], BODY, "ns",
                       ["pods"])
    assert loads == [(LoadVersions("ranker", ("1", "2")), ["pods"])]
    assert parse_policy((tmp_path / "p.json").read_text()).models["ranker"].versions == {"1": 60.0, "2": 40.0}
    assert cms == [("ns", "routing", w)]
    assert events == [("core-v1", "Normal", "Step", "hi")]


class FakeEvents:
    """``CoreV1Api.create_namespaced_event`` as the API server answers it: 409 for a name it has."""

    def __init__(self, fail: Exception | None = None):
        self.stored: dict[str, dict] = {}
        self.fail = fail

    def create_namespaced_event(self, namespace: str, body: dict) -> dict:
        from kubernetes.client.exceptions import ApiException

        if self.fail is not None:
            raise self.fail
        name = body["metadata"]["name"]
        if name in self.stored:
            raise ApiException(status=409, reason="AlreadyExists")
        self.stored[name] = body
        return body


def test_an_event_carried_out_twice_is_posted_once_and_names_its_rollout() -> None:
    from recserve.operator import act

    api = FakeEvents()
    emit = Emit("Normal", "Step", "step 1/3 at 10%", key="0123456789abcdef")
    assert act.post_event(api, BODY, emit) is True
    assert act.post_event(api, BODY, emit) is False
    [(name, ev)] = api.stored.items()
    assert name == "r.0123456789abcdef"
    assert ev["involvedObject"] == {"apiVersion": "recserve.io/v1alpha1", "kind": "ModelRollout", "name": "r",
                                    "namespace": "ns", "uid": "u-1"}
    assert (ev["type"], ev["reason"], ev["message"]) == ("Normal", "Step", "step 1/3 at 10%")
    assert act.post_event(api, BODY, Emit("Normal", "Step", "step 2/3 at 30%", key="fedcba9876543210")) is True
    long = act.event_body(BODY, Emit("Warning", "AnalysisFailed", "x" * 5000, key="k"), __import__("datetime").datetime.now())
    assert len(long["message"]) <= act.EVENT_MESSAGE_CHARS


def test_an_event_the_api_server_refuses_is_logged_not_raised(caplog) -> None:
    from kubernetes.client.exceptions import ApiException

    from recserve.operator import act

    with caplog.at_level(logging.WARNING, logger="recserve.operator"):
        act.post_event(FakeEvents(ApiException(status=403, reason="Forbidden")), BODY, Emit("Normal", "Step", "m", key="k"))
        act.post_event(FakeEvents(ConnectionRefusedError("refused")), BODY, Emit("Normal", "Step", "m", key="k"))
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["could not post the Event Normal Step"] * 2


def test_the_tick_interval_comes_from_the_environment_at_import() -> None:
    code = ("import kopf, recserve.operator.handlers as h; "
            "t = [x for x in kopf.get_default_registry()._spawning.get_all_handlers() if x.id == 'on_tick']; "
            "print(h.TICK_SECONDS, t[0].interval, t[0].initial_delay)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RECSERVE_OPERATOR_TICK_SECONDS": "0.25"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.25", "0.25", "0.5"]


def test_named_namespaces_run_without_cluster_wide_scanning(handlers) -> None:
    """The chart's namespaced Role may not list namespaces: with --namespace kopf must not try (it retried about a
    minute of 403s before it handled any rollout); --all-namespaces keeps kopf's scanning."""
    assert handlers.operator_settings(scan_namespaces=False).scanning.disabled is True
    assert handlers.operator_settings(scan_namespaces=True).scanning.disabled is False


def test_operator_logs_are_lines_on_stdout(handlers) -> None:
    import io
    import logging

    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        handlers.configure_logging(out)
        logging.getLogger("kopf.objects").info("loading failed; retrying")
        ref = {"k8s_ref": {"name": "ranker-v2", "namespace": "shop"}}
        logging.getLogger("kopf.objects").warning("actions failed", extra=ref)
        logging.getLogger("kopf.objects").info("Timer 'on_tick' succeeded.", extra=ref)  # every tick: dropped
    finally:
        root.handlers, root.level = saved
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("INFO kopf.objects: loading failed; retrying")
    assert lines[1].endswith("WARNING kopf.objects: [shop/ranker-v2] actions failed")


def test_ticks_get_a_thread_each_and_the_chart_lets_one_under_way_finish(handlers) -> None:
    import yaml

    assert handlers.operator_settings(scan_namespaces=False).execution.max_workers >= 32
    values = yaml.safe_load((Path(__file__).resolve().parents[2] / "helm/recserve/values.yaml").read_text())
    assert values["operator"]["terminationGracePeriodSeconds"] > handlers.STOP_WAIT_S > handlers.act.TRITON_TIMEOUT_S


def test_a_deleted_rollout_is_released_soon_after_its_tick_ends_however_kopf_is_started(handlers) -> None:
    """kopf keeps the finalizer until a tick under way has ended and looks again only every
    ``cancellation_polling`` seconds (60 by default: a rollout deleted mid-tick stayed a minute); both ways of
    starting the handlers (``recserve operator run``, ``kopf run -m``: its startup hook) poll often."""
    import kopf

    assert handlers.operator_settings(scan_namespaces=False).background.cancellation_polling <= 1.0
    settings = kopf.OperatorSettings()
    assert settings.background.cancellation_polling == 60, "kopf's default (what this guards against)"
    handlers.on_startup(settings=settings)
    assert settings.background.cancellation_polling <= 1.0 and settings.execution.max_workers >= 32


def test_the_spec_kopf_remembers_leaves_out_the_compression_report(handlers) -> None:
    """kopf stores the last handled spec in an annotation (256 KiB at most for all of them): a large report
    must not go there."""
    import kopf

    storage = handlers.operator_settings(scan_namespaces=False).persistence.diffbase_storage
    report = {"gate": {"passed": True}, "pareto": [{"name": f"c{i}", "stages": ["x" * 1000]} for i in range(300)]}
    body = kopf.Body({**BODY, "spec": {**SPEC, "compressionReport": report}})
    essence = storage.build(body=body)
    assert "compressionReport" not in essence["spec"] and essence["spec"]["model"] == "ranker"
    assert len(str(essence)) < 2000
