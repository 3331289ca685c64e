"""The operator's I/O edges without a cluster or a Triton: the routing policy it writes (file and ConfigMap),
the Triton model-control calls it makes, and the observations it reads from Prometheus text."""

from __future__ import annotations

import json
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recserve.errors import ConfigError, ServerError
from recserve.operator import act, observe
from recserve.operator.machine import LoadVersions, SetWeights, VersionCounters
from recserve.operator.pods import SERVICE_LABEL, TritonPod, pods_from_slices, triton_pods
from recserve.operator.spec import ModelRolloutSpec
from recserve.serving.metrics import RouterMetrics
from recserve.serving.policy import Assignment, ModelPolicy, RoutingPolicy, parse_policy, write_policy


def make_spec(**router) -> ModelRolloutSpec:
    return ModelRolloutSpec.model_validate({
        "model": "ranker", "stableVersion": "1", "candidateVersion": "2", "steps": [{"weight": 10}],
        "triton": {"grpcUrl": "127.0.0.1:1", "metricsUrl": "http://127.0.0.1:1/metrics"},
        "router": {"policyFile": "/tmp/p.json", **router}})


OTHERS = RoutingPolicy(models={
    "two_tower": ModelPolicy(versions={"3": 100.0}),
    "reranker": ModelPolicy(versions={"1": 70.0, "2": 30.0}, shadow_percent=5.0, shadow_version="2"),
})


# --- merged_policy ---------------------------------------------------------------------------------------------------


def test_merged_policy_replaces_this_model_and_keeps_the_others() -> None:
    current = OTHERS.model_copy(update={"models": {**OTHERS.models, "ranker": ModelPolicy(
        versions={"0": 100.0}, assignment=Assignment(key="session", salt="old"))}, "unknown_inputs": "refuse"})
    merged = act.merged_policy(current, SetWeights("ranker", (("1", 90), ("2", 10)), "2", 20.0))
    assert merged.models["two_tower"] == OTHERS.models["two_tower"]
    assert merged.models["reranker"] == OTHERS.models["reranker"]
    assert merged.unknown_inputs == "refuse", "the policy's other settings are kept"
    # the assignment keeps the user's key and is salted anew for this rollout (its own canary users)
    assert merged.models["ranker"] == ModelPolicy(versions={"1": 90.0, "2": 10.0}, shadow_percent=20.0,
                                                  shadow_version="2",
                                                  assignment=Assignment(key="session", salt="ranker:1,2"))
    assert "0" not in merged.models["ranker"].versions  # the entry is replaced, not merged
    assert current.models["ranker"].versions == {"0": 100.0}  # the input is untouched


@pytest.mark.parametrize("shadow_version,percent,expected", [
    (None, 0.0, (0.0, None)), ("2", 0.0, (0.0, None)), (None, 10.0, (0.0, None)), ("2", 10.0, (10.0, "2"))])
def test_merged_policy_never_writes_half_a_shadow_setting(shadow_version, percent, expected) -> None:
    merged = act.merged_policy(RoutingPolicy(), SetWeights("ranker", (("1", 100), ("2", 0)), shadow_version, percent))
    p = merged.models["ranker"]
    assert (p.shadow_percent, p.shadow_version) == expected
    ModelPolicy.model_validate(p.model_dump())  # still a valid policy


def test_the_promotion_policy_is_valid_with_the_stable_version_at_0() -> None:
    merged = act.merged_policy(RoutingPolicy(), SetWeights("ranker", (("1", 0), ("2", 100))))
    assert merged.models["ranker"].versions == {"1": 0.0, "2": 100.0}


# --- set_weights_file ------------------------------------------------------------------------------------------------


def test_set_weights_file_creates_the_file_and_round_trips_through_parse_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    written = act.set_weights_file(path, SetWeights("ranker", (("1", 90), ("2", 10)), "2", 5.0))
    assert parse_policy(path.read_text(), str(path)) == written
    assert json.loads(path.read_text()) == {"models": {"ranker": {
        "assignment": {"by": "hash", "key": "user_id", "salt": "ranker:1,2"},
        "versions": {"1": 90.0, "2": 10.0}, "shadow_percent": 5.0, "shadow_version": "2"}}, "unknown_inputs": "report"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.json"]  # no temporary file left behind


def test_set_weights_file_keeps_the_other_models(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    write_policy(OTHERS, path)
    act.set_weights_file(path, SetWeights("ranker", (("1", 50), ("2", 50))))
    act.set_weights_file(path, SetWeights("ranker", (("1", 0), ("2", 100))))
    policy = parse_policy(path.read_text())
    assert policy.models["two_tower"] == OTHERS.models["two_tower"]
    assert policy.models["reranker"] == OTHERS.models["reranker"]
    assert policy.models["ranker"].versions == {"1": 0.0, "2": 100.0}


def test_set_weights_file_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    act.set_weights_file(path, SetWeights("ranker", (("1", 100), ("2", 0))))
    before_inode = path.stat().st_ino
    with open(path) as held:  # a reader that opened the old file keeps reading the old, whole file
        act.set_weights_file(path, SetWeights("ranker", (("1", 50), ("2", 50))))
        assert parse_policy(held.read()).models["ranker"].versions == {"1": 100.0, "2": 0.0}
    assert path.stat().st_ino != before_inode  # a rename, not a rewrite in place
    assert parse_policy(path.read_text()).models["ranker"].versions == {"1": 50.0, "2": 50.0}


def test_a_concurrent_reader_never_sees_a_partial_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    write_policy(OTHERS, path)
    stop, bad, reads = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                parse_policy(path.read_text(), str(path))
                reads[0] += 1
            except (ConfigError, FileNotFoundError) as e:  # pragma: no cover - the failure being tested for
                bad.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(150):
            w = i % 101
            act.set_weights_file(path, SetWeights("ranker", (("1", 100 - w), ("2", w)), "2", 1.0))
    finally:
        stop.set()
        t.join()
    assert bad == [] and reads[0] > 0


def test_a_corrupt_policy_file_is_refused_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"models": {"ranker": {"versions": {}}}}')
    with pytest.raises(ConfigError, match="versions must name at least one version"):
        act.set_weights_file(path, SetWeights("ranker", (("1", 100), ("2", 0))))
    assert path.read_text() == '{"models": {"ranker": {"versions": {}}}}'


# --- set_weights_configmap -------------------------------------------------------------------------------------------


class FakeCoreV1:
    """ConfigMaps as an API server keeps them: a resourceVersion per write, 409 for a replace carrying a stale one
    and for a create of one that exists. ``interfere`` runs between a read and the write that follows it (another
    writer's update)."""

    def __init__(self, data: dict | None = None, status: int = 404):
        self.data, self.status, self.calls, self.rv = data, status, [], 1
        self.interfere = None
        self.lock = threading.Lock()

    def _cm(self):
        meta = type("Meta", (), {"resource_version": str(self.rv), "labels": {}, "annotations": {}})()
        return type("CM", (), {"data": dict(self.data), "metadata": meta})()

    def read_namespaced_config_map(self, name, namespace):
        from kubernetes.client.exceptions import ApiException

        with self.lock:
            self.calls.append(("read", name, namespace))
            if self.data is None:
                raise ApiException(status=self.status, reason="nope")
            cm = self._cm()
        if self.interfere is not None:
            self.interfere(self)
        return cm

    def create_namespaced_config_map(self, namespace, body):
        from kubernetes.client.exceptions import ApiException

        with self.lock:
            self.calls.append(("create", namespace, body))
            if self.data is not None:
                raise ApiException(status=409, reason="AlreadyExists")
            self.data, self.rv = dict(body["data"]), self.rv + 1

    def patch_namespaced_config_map(self, name, namespace, body):
        from kubernetes.client.exceptions import ApiException

        with self.lock:
            self.calls.append(("patch", name, namespace, body))
            if body["metadata"].get("resourceVersion", str(self.rv)) != str(self.rv):
                raise ApiException(status=409, reason="Conflict")
            self.data, self.rv = {**self.data, **body["data"]}, self.rv + 1


def test_set_weights_configmap_creates_a_missing_configmap() -> None:
    api = FakeCoreV1()
    act.set_weights_configmap(api, "serving", "routing", SetWeights("ranker", (("1", 90), ("2", 10))))
    (_, (op, ns, body)) = api.calls
    assert (op, ns) == ("create", "serving")
    assert body["metadata"]["name"] == "routing"
    assert body["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "recserve-operator"}
    assert parse_policy(body["data"][act.POLICY_KEY]).models["ranker"].versions == {"1": 90.0, "2": 10.0}


def test_weights_already_in_place_are_not_written_again(tmp_path: Path) -> None:
    """The operator writes a held step's weight with every analysis: only a policy that differs is written (a
    router reloads a policy whose file changed)."""
    path = tmp_path / "policy.json"
    action = SetWeights("ranker", (("1", 90), ("2", 10)))
    act.set_weights_file(path, action)
    inode = path.stat().st_ino
    act.set_weights_file(path, action)
    assert path.stat().st_ino == inode
    write_policy(OTHERS, path)  # someone overwrote it: the next write puts the step's weight back
    assert act.set_weights_file(path, action).models["ranker"].versions == {"1": 90.0, "2": 10.0}
    assert parse_policy(path.read_text()).models["ranker"].versions == {"1": 90.0, "2": 10.0}
    api = FakeCoreV1()
    act.set_weights_configmap(api, "serving", "routing", action)
    calls = len(api.calls)
    act.set_weights_configmap(api, "serving", "routing", action)
    assert [c[0] for c in api.calls[calls:]] == ["read"]


def test_set_weights_configmap_patches_an_existing_one_keeping_other_models() -> None:
    api = FakeCoreV1({act.POLICY_KEY: json.dumps(OTHERS.model_dump(exclude_none=True))})
    act.set_weights_configmap(api, "serving", "routing", SetWeights("ranker", (("1", 0), ("2", 100))))
    op, name, ns, body = api.calls[-1]
    assert (op, name, ns) == ("patch", "routing", "serving")
    assert body["metadata"]["resourceVersion"] == "1"  # the precondition: what it read
    policy = parse_policy(body["data"][act.POLICY_KEY])
    assert set(policy.models) == {"two_tower", "reranker", "ranker"}
    assert policy.models["reranker"] == OTHERS.models["reranker"]


def test_set_weights_configmap_with_no_data_starts_an_empty_policy() -> None:
    api = FakeCoreV1({})
    act.set_weights_configmap(api, "ns", "cm", SetWeights("ranker", (("1", 100), ("2", 0))))
    assert api.calls[-1][0] == "patch"


def test_set_weights_configmap_raises_other_api_errors() -> None:
    from kubernetes.client.exceptions import ApiException

    api = FakeCoreV1(status=403)
    with pytest.raises(ApiException):
        act.set_weights_configmap(api, "ns", "cm", SetWeights("ranker", (("1", 100), ("2", 0))))
    assert [c[0] for c in api.calls] == ["read"]


def test_a_write_that_lost_a_race_is_merged_again_not_lost() -> None:
    """Another writer (another operator replica, a person with kubectl) changed the ConfigMap between our read and
    our write: the stale write is refused (409), and the merge is redone on what is there now."""
    api = FakeCoreV1({act.POLICY_KEY: "{}"})

    def other_writer(fake) -> None:
        fake.interfere = None  # once
        with fake.lock:
            fake.data = {act.POLICY_KEY: json.dumps({"models": {"reranker": {"versions": {"3": 100}}}})}
            fake.rv += 1

    api.interfere = other_writer
    act.set_weights_configmap(api, "ns", "cm", SetWeights("ranker", (("1", 80), ("2", 20))))
    policy = parse_policy(api.data[act.POLICY_KEY])
    assert set(policy.models) == {"reranker", "ranker"}  # both writes landed
    assert [c[0] for c in api.calls] == ["read", "patch", "read", "patch"]


def test_a_create_that_lost_a_race_becomes_an_update() -> None:
    api = FakeCoreV1()
    original = api.read_namespaced_config_map
    state = {"first": True}

    def read(name, namespace):
        try:
            return original(name, namespace)
        finally:
            if state.pop("first", False):  # after our 404, someone else creates it
                api.data, api.rv = {act.POLICY_KEY: json.dumps({"models": {"x": {"versions": {"1": 100}}}})}, 5

    api.read_namespaced_config_map = read
    act.set_weights_configmap(api, "ns", "cm", SetWeights("ranker", (("1", 100), ("2", 0))))
    assert set(parse_policy(api.data[act.POLICY_KEY]).models) == {"x", "ranker"}


@pytest.mark.parametrize("target", ["file", "configmap"])
def test_concurrent_rollouts_lose_no_weight(tmp_path: Path, target: str) -> None:
    """Ten rollouts of ten models write one policy at once, each stepping through its weights: every model's last
    weight is what the policy says at the end, and the file is never unreadable."""
    from concurrent.futures import ThreadPoolExecutor

    path, api = tmp_path / "policy.json", FakeCoreV1()

    def rollout(i: int) -> None:
        for w in (10, 30, 60, 100 - i):
            action = SetWeights(f"model{i}", (("1", 100 - w), ("2", w)))
            if target == "file":
                act.set_weights_file(path, action)
            else:
                act.set_weights_configmap(api, "ns", "cm", action)

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(rollout, range(10)))
    text = path.read_text() if target == "file" else api.data[act.POLICY_KEY]
    policy = parse_policy(text)
    assert {m: p.versions["2"] for m, p in policy.models.items()} == {f"model{i}": float(100 - i) for i in range(10)}
    assert sorted(p.name for p in tmp_path.iterdir()) == (["policy.json"] if target == "file" else [])


# --- load_versions ---------------------------------------------------------------------------------------------------


class FakeTriton:
    instances: list = []

    def __init__(self, url, timeout=10.0, ready=False):
        self.url, self.ready, self.loads = url, ready, []
        FakeTriton.instances.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def model_ready(self, model, version=""):
        return self.ready

    def load(self, model, config=None):
        self.loads.append((model, None if config is None else json.loads(config)))
        self.ready = True

    def config(self, model, version=""):
        return {"name": model, "max_batch_size": 256, "version_policy": {"latest": {"num_versions": 1}}}


@pytest.mark.parametrize("ready", [False, True])
def test_load_versions_overrides_the_version_policy(monkeypatch, ready) -> None:
    FakeTriton.instances = []
    monkeypatch.setattr(act, "TritonClient", lambda url, timeout: FakeTriton(url, timeout, ready))
    act.load_versions(make_spec(), LoadVersions("ranker", ("10", "9")), triton_pods(make_spec(), "recserve"))
    (client,) = FakeTriton.instances
    assert client.url == "127.0.0.1:1"
    loads = client.loads if ready else client.loads[1:]
    if not ready:
        assert client.loads[0] == ("ranker", None)  # load it first (the repository's config), then override
    assert loads == [("ranker", {"name": "ranker", "max_batch_size": 256,
                                 "version_policy": {"specific": {"versions": [9, 10]}}})]


def test_a_final_unload_of_a_model_triton_does_not_serve_does_nothing_and_a_load_still_loads(monkeypatch) -> None:
    """After a rollout of a model since removed from Triton, the unload has nothing to do (it used to load the
    model, fail, and be retried forever: the rollout never rested)."""
    FakeTriton.instances = []
    monkeypatch.setattr(act, "TritonClient", lambda url, timeout: FakeTriton(url, timeout, False))
    act.load_versions(make_spec(), LoadVersions("ranker", ("1",), final=True), triton_pods(make_spec(), "recserve"))
    act.load_versions(make_spec(), LoadVersions("ranker", ("1", "2")), triton_pods(make_spec(), "recserve"))
    final, rollout = FakeTriton.instances
    assert final.loads == [] and rollout.loads[0] == ("ranker", None)


# --- observe ---------------------------------------------------------------------------------------------------------

TRITON_TEXT = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ranker",version="2"} 51
nv_inference_request_success{model="ranker",version="1"} 40
nv_inference_request_success{model="other",version="2"} 999
# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="ranker",version="2",reason="BACKEND"} 3
nv_inference_request_failure{model="ranker",version="2",reason="REJECTED"} 1
nv_inference_request_failure{model="other",version="2",reason="BACKEND"} 50
# HELP nv_inference_request_summary_us Summary of inference request duration in microseconds
# TYPE nv_inference_request_summary_us summary
nv_inference_request_summary_us_count{model="ranker",version="2"} 55
nv_inference_request_summary_us_sum{model="ranker",version="2"} 52148
nv_inference_request_summary_us{model="ranker",version="2",quantile="0.5"} 624
nv_inference_request_summary_us{model="ranker",version="2",quantile="0.99"} 1188
nv_inference_request_summary_us{model="ranker",version="1",quantile="0.99"} NaN
"""


class Served:
    """A tiny local HTTP server with fixed /metrics bodies (real HTTP for ``scrape``)."""

    def __init__(self, bodies: dict[str, bytes]):
        bodies_ = bodies

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = bodies_.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_scrape_and_version_counters_read_triton_metrics() -> None:
    with Served({"/metrics": TRITON_TEXT.encode()}) as s:
        metrics = observe.scrape(s.url("/metrics"))
    assert observe.version_counters(metrics, "ranker", "2") == VersionCounters(51.0, 4.0, 1.188)
    assert observe.version_counters(metrics, "ranker", "1") == VersionCounters(40.0, 0.0, None)  # NaN: no request yet
    assert observe.version_counters(metrics, "ranker", "7") == VersionCounters(0.0, 0.0, None)


def test_scrape_keys_counters_by_their_name_without_total() -> None:
    m = RouterMetrics()
    m.cloud_failures.labels("ranker", "2", "timeout").inc(3)
    m.cloud_latency.labels("ranker", "2").observe(0.004)
    m.shadow_overlap.labels("ranker", "2").observe(0.8)
    m.shadow_overlap.labels("ranker", "2").observe(0.6)
    with Served({"/metrics": m.exposition()}) as s:
        metrics = observe.scrape(s.url("/metrics"))
    assert observe.router_counters(metrics, "ranker", "2", 1.5) == VersionCounters(1.0, 3.0, 1.5)
    assert observe.router_counters(metrics, "other", "2", 1.5) == VersionCounters(0.0, 0.0, 1.5)
    assert observe.shadow_agreement(metrics, "ranker", "2") == pytest.approx(0.7)
    assert observe.shadow_agreement(metrics, "ranker", "1") is None


def test_scrape_of_a_missing_endpoint_raises_url_error() -> None:
    with Served({}) as s, pytest.raises(urllib.error.URLError):
        observe.scrape(s.url("/metrics"))


class IndexClient:
    def __init__(self, url, timeout=5.0, ready=True, index=None, error=None):
        self.ready, self.index, self.error = ready, index or [], error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def server_ready(self):
        return self.ready

    def server_live(self):  # observe() asks for liveness: strict readiness falls with any broken model
        return self.ready

    def repository_index(self):
        if self.error:
            raise self.error
        return self.index


INDEX = [{"name": "ranker", "version": "1", "state": "READY"}, {"name": "ranker", "version": "2", "state": "READY"},
         {"name": "ranker", "version": "3", "state": "UNAVAILABLE"}, {"name": "other", "version": "4", "state": "READY"}]


def look(spec: ModelRolloutSpec):
    """``observe.observe`` of the rollout's one Triton."""
    return observe.observe(spec, triton_pods(spec, "recserve"))


def fake_triton(monkeypatch, **kw) -> None:
    monkeypatch.setattr(observe, "TritonClient", lambda url, timeout=5.0: IndexClient(url, timeout, **kw))


def test_observe_reads_loaded_versions_and_the_candidate_counters(monkeypatch) -> None:
    fake_triton(monkeypatch, index=INDEX)
    with Served({"/metrics": TRITON_TEXT.encode()}) as s:
        spec = make_spec().model_copy(update={"triton": make_spec().triton.model_copy(
            update={"metrics_url": s.url("/metrics")})})
        obs = look(spec)
    assert obs.triton_reachable and obs.loaded_versions == frozenset({"1", "2"})
    assert obs.candidate == VersionCounters(51.0, 4.0, 1.188)
    assert obs.shadow_agreement is None


@pytest.mark.parametrize("kw", [{"ready": False}, {"error": ServerError("down")}, {"error": OSError("refused")}])
def test_observe_turns_triton_failures_into_unreachable(monkeypatch, kw) -> None:
    fake_triton(monkeypatch, index=INDEX, **kw)
    obs = look(make_spec())
    assert obs.triton_reachable is False and obs.loaded_versions == frozenset() and obs.candidate is None


def test_observe_with_unreachable_triton_metrics_is_unreachable(monkeypatch) -> None:
    fake_triton(monkeypatch, index=INDEX)
    with Served({}) as s:
        spec = make_spec().model_copy(update={"triton": make_spec().triton.model_copy(
            update={"metrics_url": s.url("/metrics")})})
        assert look(spec).triton_reachable is False


def router_text(*rows: tuple[str, str, int, int, list[float]]) -> bytes:
    m = RouterMetrics()
    for model, version, ok, bad, overlaps in rows:
        for _ in range(ok):
            m.cloud_latency.labels(model, version).observe(0.002)
        if bad:
            m.cloud_failures.labels(model, version, "error").inc(bad)
        for o in overlaps:
            m.shadow_overlap.labels(model, version).observe(o)
    return m.exposition()


def spec_with(s: Served, router_path: str | None) -> ModelRolloutSpec:
    base = make_spec()
    return base.model_copy(update={
        "triton": base.triton.model_copy(update={"metrics_url": s.url("/metrics")}),
        "router": base.router.model_copy(update={"metrics_url": s.url(router_path) if router_path else None})})


def test_observe_prefers_the_routers_counts_and_keeps_tritons_p99(monkeypatch) -> None:
    fake_triton(monkeypatch, index=INDEX)
    with Served({"/metrics": TRITON_TEXT.encode(), "/router": router_text(("ranker", "2", 7, 2, [1.0, 0.5]))}) as s:
        obs = look(spec_with(s, "/router"))
    assert obs.candidate == VersionCounters(7.0, 2.0, 1.188)
    assert obs.shadow_agreement == pytest.approx(0.75)


def test_observe_without_the_routers_numbers_judges_nothing(monkeypatch) -> None:
    fake_triton(monkeypatch, index=INDEX)
    with Served({"/metrics": TRITON_TEXT.encode()}) as s:
        obs = look(spec_with(s, "/missing"))
    assert obs.triton_reachable and obs.loaded_versions == frozenset({"1", "2"})
    assert obs.candidate is None and obs.shadow_agreement is None


def test_the_routers_numbers_of_other_models_are_not_counted(monkeypatch) -> None:
    fake_triton(monkeypatch, index=INDEX)
    body = router_text(("ranker", "2", 10, 0, [1.0]), ("two_tower", "2", 90, 90, [0.0, 0.0, 0.0]))
    with Served({"/metrics": TRITON_TEXT.encode(), "/router": body}) as s:
        obs = look(spec_with(s, "/router"))
    assert obs.candidate == VersionCounters(10.0, 0.0, 1.188)
    assert obs.shadow_agreement == 1.0


# --- several Tritons (triton.service) --------------------------------------------------------------------------------


def pods_spec() -> ModelRolloutSpec:
    return make_spec().model_copy(update={"triton": make_spec().triton.model_copy(
        update={"service": "triton", "grpc_url": None, "metrics_url": None})})


def a_slice(service: str, endpoints: list[dict], grpc: int = 8001, metrics: int = 8002) -> dict:
    return {"metadata": {"name": f"{service}-x", "labels": {SERVICE_LABEL: service}},
            "ports": [{"name": "grpc", "port": grpc}, {"name": "http", "port": 8000}, {"name": "metrics", "port": metrics}],
            "endpoints": endpoints}


def test_the_pods_of_a_service_are_its_ready_endpoints_with_their_named_ports() -> None:
    slices = [
        a_slice("triton", [{"addresses": ["10.0.0.7"], "conditions": {"ready": True}, "targetRef": {"name": "t-b"}},
                           {"addresses": ["10.0.0.8"], "conditions": {"ready": False}, "targetRef": {"name": "t-c"}},
                           {"addresses": ["10.0.0.9"], "targetRef": {"name": "t-a"}}]),  # no conditions: ready
        a_slice("triton", [{"addresses": ["fd00::5"], "conditions": {"ready": True}}], grpc=9001, metrics=9002),
        a_slice("other", [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "targetRef": {"name": "o"}}]),
        {"metadata": {"labels": {SERVICE_LABEL: "triton"}}, "ports": [{"name": "http", "port": 8000}],
         "endpoints": [{"addresses": ["10.0.0.2"]}]},  # no grpc/metrics ports: not Triton's
    ]
    assert pods_from_slices(slices, "triton") == [
        TritonPod("fd00::5", "[fd00::5]:9001", "http://[fd00::5]:9002/metrics"),
        TritonPod("t-a", "10.0.0.9:8001", "http://10.0.0.9:8002/metrics"),
        TritonPod("t-b", "10.0.0.7:8001", "http://10.0.0.7:8002/metrics")]
    assert pods_from_slices([], "triton") == []


def test_triton_pods_lists_the_services_endpointslices_by_its_label() -> None:
    calls = []

    class Discovery:
        class api_client:  # noqa: N801 (the kubernetes client's attribute)
            @staticmethod
            def sanitize_for_serialization(obj):
                return obj

        def list_namespaced_endpoint_slice(self, namespace, label_selector):
            calls.append((namespace, label_selector))
            return type("List", (), {"items": [a_slice("triton", [{"addresses": ["10.1.2.3"]}])]})

    assert triton_pods(pods_spec(), "shop", Discovery()) == [
        TritonPod("10.1.2.3", "10.1.2.3:8001", "http://10.1.2.3:8002/metrics")]
    assert calls == [("shop", f"{SERVICE_LABEL}=triton")]
    assert triton_pods(make_spec(), "shop") == [TritonPod("127.0.0.1:1", "127.0.0.1:1", "http://127.0.0.1:1/metrics")]


def test_observe_sums_the_pods_counters_and_counts_a_version_loaded_only_where_every_pod_serves_it(monkeypatch):
    indexes = {"a:1": INDEX, "b:1": [{"name": "ranker", "version": "1", "state": "READY"},
                                     {"name": "ranker", "version": "2", "state": "LOADING"}], "c:1": None}
    other = TRITON_TEXT.replace(" 51\n", " 9\n").replace(" 3\n", " 2\n").replace(" 1188\n", " 4500\n")
    monkeypatch.setattr(observe, "TritonClient", lambda url, timeout=5.0: IndexClient(
        url, timeout, index=indexes[url], error=None if indexes[url] else OSError("refused")))
    with Served({"/a": TRITON_TEXT.encode(), "/b": other.encode()}) as s:
        pods = [TritonPod("a", "a:1", s.url("/a")), TritonPod("b", "b:1", s.url("/b")),
                TritonPod("c", "c:1", s.url("/c"))]  # c is restarting: it does not answer
        obs = observe.observe(pods_spec(), pods)
    assert obs.triton_reachable and obs.pods == {"a": frozenset({"1", "2"}), "b": frozenset({"1"})}
    assert obs.loaded_versions == frozenset({"1"}) and obs.served_anywhere("2")
    assert obs.unavailable == {"3": "unavailable"}
    assert obs.candidate == VersionCounters(51.0 + 9.0, 4.0 + 3.0, 4.5)  # summed; the slowest pod's p99
    assert observe.observe(pods_spec(), [pods[2]]).triton_reachable is False
    assert observe.observe(pods_spec(), []).triton_reachable is False


def test_load_versions_goes_to_every_pod_or_to_the_one_it_names(monkeypatch) -> None:
    FakeTriton.instances = []
    monkeypatch.setattr(act, "TritonClient", lambda url, timeout: FakeTriton(url, timeout, True))
    pods = [TritonPod("a", "a:1", ""), TritonPod("b", "b:1", "")]
    act.load_versions(pods_spec(), LoadVersions("ranker", ("2",)), pods)
    act.load_versions(pods_spec(), LoadVersions("ranker", ("2",), pod="b"), pods)
    act.load_versions(pods_spec(), LoadVersions("ranker", ("2",), pod="gone"), pods)  # it left meanwhile: nothing
    assert [c.url for c in FakeTriton.instances] == ["a:1", "b:1", "b:1"]
