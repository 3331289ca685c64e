"""The CRD, the operator's API calls, PodSecurity and RBAC against a real kube-apiserver + etcd on loopback
(``apiserver_fixtures.apiserver``; ``make k8s-tools`` builds them, skipped without; no KUBECONFIG needed).

Nothing here runs a controller: objects are stored, validated and admitted by the real server only.
"""

from __future__ import annotations

import copy
import datetime
import json
import threading
import time
import uuid
from pathlib import Path

import apiserver_fixtures
import pytest
import yaml

from recserve.operator import act
from recserve.operator.machine import Analysis, Emit, SetWeights, Status

pytestmark = [pytest.mark.k8s]

apiserver = apiserver_fixtures.apiserver

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "helm" / "recserve" / "crds" / "modelrollouts.recserve.io.yaml"
GROUP, VERSION, PLURAL = "recserve.io", "v1alpha1", "modelrollouts"

COMPRESSION_REPORT = {
    "model_sha256": "3f" * 32,
    "gate": {"passed": True, "reasons": [],
             "limits": {"min_recall_at_10": 0.4, "max_p99_ms": 12.5, "max_size_ratio": 0.5, "extra": None}},
    "stages": [
        {"name": "baseline", "recall_at_10": 0.4312, "p99_ms": 20.25, "size_bytes": 104857600, "dtype": "fp32"},
        {"name": "prune", "sparsity": 0.3, "recall_at_10": 0.4287, "p99_ms": 17.0, "size_bytes": 73400320,
         "kept": {"layers": [0, 1, 2], "heads": {"0": 8, "1": 6}}},
        {"name": "int8", "recall_at_10": 0.4201, "p99_ms": 9.75, "size_bytes": 26214400, "calibration": {
            "batches": 64, "method": "entropy", "skipped": False}},
    ],
    "pareto": [{"stage": "int8", "recall_at_10": 0.4201, "p99_ms": 9.75}, {"stage": "baseline", "p99_ms": 20.25}],
    "created": "2026-12-03T12:00:00Z",
}


def _rollout(name: str, **spec) -> dict:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRollout", "metadata": {"name": name},
            "spec": {"model": "ranker", "stableVersion": "1", "candidateVersion": "2",
                     "steps": [{"weight": 10, "pauseSeconds": 30}, {"weight": 50, "pauseSeconds": 60}],
                     "triton": {"grpcUrl": "triton.recserve:8001", "metricsUrl": "http://triton.recserve:8002/metrics"},
                     "router": {"configMap": "recserve-routing"},
                     "compressionReport": copy.deepcopy(COMPRESSION_REPORT)}}
    body["spec"].update(spec)
    return body


@pytest.fixture(scope="module")
def admin(apiserver):
    return apiserver.client()


@pytest.fixture(scope="module")
def core(admin):
    from kubernetes import client

    return client.CoreV1Api(admin)


@pytest.fixture(scope="module")
def custom(admin):
    from kubernetes import client

    return client.CustomObjectsApi(admin)


@pytest.fixture
def namespace(core):
    """A fresh namespace (deleting it only marks it Terminating here: no namespace controller runs)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture(scope="module")
def crd(admin, custom):
    """The chart's CRD, installed and Established, and its endpoint serving."""
    body = yaml.safe_load(CRD_FILE.read_text())
    apiserver_fixtures.ensure_crd(admin, body)
    return body


def _status_of(e) -> tuple[int, dict]:
    try:
        return e.status, json.loads(e.body)
    except (TypeError, ValueError):
        return e.status, {}


# ---- a. the CRD


def test_crd_established_and_compression_report_round_trips(crd, custom, namespace):
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _rollout("ranker-2"))
    got = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "ranker-2")
    assert got["metadata"]["uid"] == created["metadata"]["uid"]
    assert got["spec"]["compressionReport"] == COMPRESSION_REPORT
    assert got["spec"] == _rollout("ranker-2")["spec"]


def test_crd_prunes_undeclared_field(crd, custom, namespace):
    body = _rollout("ranker-pruned")
    body["spec"]["notInSchema"] = {"x": 1}
    body["spec"]["triton"]["notInSchemaEither"] = "y"
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    got = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "ranker-pruned")
    for obj in (created, got):
        assert "notInSchema" not in obj["spec"]
        assert "notInSchemaEither" not in obj["spec"]["triton"]
        assert obj["spec"]["compressionReport"] == COMPRESSION_REPORT  # preserve-unknown-fields: kept whole


@pytest.mark.parametrize("spec, field", [
    ({"stableVersion": "02"}, "spec.stableVersion"),
    ({"steps": [{"weight": 5}] * 21}, "spec.steps"),
    ({"steps": [{"weight": 101}]}, "spec.steps[0].weight"),
    ({"candidateVersion": "1"}, "candidateVersion must differ from stableVersion"),
    ({"candidateVersion": "1", "candidateModel": "ranker"}, "candidateVersion must differ from stableVersion"),
    ({"steps": [{"weight": 50}, {"weight": 10}]}, "step weights must not decrease"),
    ({"triton": {"grpcUrl": "triton.recserve:8001"}}, "triton needs service"),
    ({"triton": {"service": "Triton_Pods"}}, "spec.triton.service"),
], ids=["leading-zero-version", "21-steps", "weight-101", "same-versions (CEL)", "same-model-named (CEL)",
        "decreasing-weights (CEL)", "no-metrics-url (CEL)", "bad-service-name"])
def test_crd_refuses_invalid(crd, custom, namespace, spec, field):
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as exc:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _rollout("bad", **spec))
    status, body = _status_of(exc.value)
    assert status == 422, body
    assert body["reason"] == "Invalid"
    assert field in body["message"], body["message"]
    if field.startswith("spec."):  # a schema error names its field; a CEL rule's names the object and says why
        assert any(c.get("field") == field for c in body["details"]["causes"]), body["details"]


def test_crd_accepts_a_service_in_place_of_the_urls(crd, custom, namespace):
    made = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _rollout(
        "pods", triton={"service": "recserve-triton"}))
    assert made["spec"]["triton"] == {"service": "recserve-triton"}


def test_crd_accepts_the_same_version_number_of_another_model(crd, custom, namespace):
    """An ONNX -> TensorRT canary: version 1 of ranker_trt against version 1 of ranker (CEL allows it)."""
    made = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _rollout(
        "cross", candidateVersion="1", candidateModel="ranker_trt"))
    assert (made["spec"]["candidateModel"], made["spec"]["candidateVersion"]) == ("ranker_trt", "1")


# ---- b. status and events as the operator writes them


def test_record_status_and_post_event(crd, core, custom, namespace):
    from kubernetes.client.exceptions import ApiException

    body = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _rollout("ranker-2"))
    status = Status(phase="Progressing", stable_version="1", candidate_version="2", step=1, weight=10,
                    step_started_at=1764763200.5, baseline_success=1200.0, failures=0,
                    last_analysis=Analysis(at=1764763230.25, requests=512.0, error_rate=0.001953125,
                                           verdict="pass", reasons=["error rate 0.20% <= 1.00%"]),
                    message="step 1/2 at 10%",
                    conditions=[{"type": "Ready", "status": "True", "reason": "Step", "message": "at 10%"}],
                    pending=[{"kind": "SetWeights", "model": "ranker", "weights": [["1", 90], ["2", 10]]}])
    act.record_status(custom, body, status.to_dict())
    got = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "ranker-2")
    expected = json.loads(json.dumps(status.to_dict()))
    # a merge patch's null removes the key; nothing else may differ
    expected = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
                for k, v in expected.items() if v is not None}
    assert got["status"] == expected
    assert Status.from_dict(got["status"]) == status
    assert got["spec"] == body["spec"]  # the status subresource leaves spec alone
    assert got["metadata"]["generation"] == body["metadata"]["generation"]

    # the status subresource: a status in a write to the main resource is ignored
    got["status"]["phase"] = "Promoted"
    custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "ranker-2", got)
    assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                               "ranker-2")["status"]["phase"] == "Progressing"

    emit = Emit("Normal", "Step", "step 1/2 at 10%: " + "x" * 2000, key="0123456789abcdef")
    assert act.post_event(core, body, emit) is True
    assert act.post_event(core, body, emit) is False  # same name: 409 AlreadyExists
    # and a 409 is what the server says for it
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_event(namespace, act.event_body(body, emit, datetime.datetime.now(datetime.UTC)))
    status_code, err = _status_of(exc.value)
    assert (status_code, err.get("reason")) == (409, "AlreadyExists"), err

    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=ranker-2").items
    assert [e.metadata.name for e in events] == ["ranker-2.0123456789abcdef"]
    ev = events[0]
    io = ev.involved_object
    assert (io.api_version, io.kind, io.name, io.namespace, io.uid) == (
        f"{GROUP}/{VERSION}", "ModelRollout", "ranker-2", namespace, body["metadata"]["uid"])
    assert (ev.type, ev.reason, ev.count, ev.reporting_component) == ("Normal", "Step", 1, "recserve-operator")
    assert len(ev.message) <= act.EVENT_MESSAGE_CHARS and ev.message.startswith("step 1/2 at 10%")


# ---- c. the routing ConfigMap from many writers at once


@pytest.mark.parametrize("replicas", [False, True], ids=["one-operator", "separate-replicas"])
def test_set_weights_configmap_concurrent(apiserver, core, namespace, monkeypatch, replicas):
    """8 threads, 8 models, one ConfigMap that does not exist yet. ``separate-replicas``: without the in-process
    lock (as 8 operator processes would be), so the creates race and the patches conflict on resourceVersion:
    only the server's preconditions keep every model's weights."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    if replicas:
        monkeypatch.setattr(act, "_lock", lambda target: threading.Lock())
    conflicts: list[tuple[str, int]] = []
    models = [f"model-{i}" for i in range(8)]
    barrier = threading.Barrier(len(models))
    errors: list[BaseException] = []

    def counted(op: str, call):
        """``call``, recording the status of each ApiException it raises (as ``(op, status)``)."""
        def wrapper(self, *a, **kw):
            try:
                return call(self, *a, **kw)
            except ApiException as e:
                conflicts.append((op, e.status))
                raise
        return wrapper

    class Counting(client.CoreV1Api):
        create_namespaced_config_map = counted("create", client.CoreV1Api.create_namespaced_config_map)
        patch_namespaced_config_map = counted("patch", client.CoreV1Api.patch_namespaced_config_map)

    def write(i: int) -> None:
        api = Counting(apiserver.client())
        try:
            barrier.wait()
            act.set_weights_configmap(api, namespace, "recserve-routing",
                                      SetWeights(models[i], (("1", 100 - 10 * i), ("2", 10 * i))))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    cm = core.read_namespaced_config_map("recserve-routing", namespace)
    policy = json.loads(cm.data[act.POLICY_KEY])
    assert sorted(policy["models"]) == models
    for i, m in enumerate(models):
        assert policy["models"][m]["versions"] == {"1": 100 - 10 * i, "2": 10 * i}
    assert cm.metadata.labels == {"app.kubernetes.io/managed-by": "recserve-operator"}
    assert all(code == 409 for _, code in conflicts), conflicts
    if replicas:
        assert conflicts, "8 writers without the lock and not one conflict: the race was not exercised"
    else:
        assert conflicts == []  # the in-process lock: they take turns
    print(f"\nconflicts ({'replicas' if replicas else 'one operator'}): {conflicts}")


# ---- d. Pod Security admission


def test_pod_security_restricted_enforced(core):
    from kubernetes.client.exceptions import ApiException

    ns = f"psa-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    core.create_namespaced_service_account(ns, {"metadata": {"name": "default"}})  # no controller-manager here
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_pod(ns, {"metadata": {"name": "plain"},
                                        "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    status, body = _status_of(exc.value)
    assert status == 403, body
    assert "PodSecurity" in body["message"] and '"restricted' in body["message"], body["message"]
    ok = core.create_namespaced_pod(ns, {
        "metadata": {"name": "restricted"},
        "spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                     "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{"name": "c", "image": "busybox", "securityContext": {
                     "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}})
    assert ok.metadata.uid
    assert [p.metadata.name for p in core.list_namespaced_pod(ns).items] == ["restricted"]


# ---- e. RBAC


def test_rbac_operator_identity(apiserver, admin, crd, core):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ns = "recserve"
    try:
        core.create_namespace({"metadata": {"name": ns}})
    except ApiException as e:
        assert e.status == 409, e
    op = apiserver.client(apiserver_fixtures.OPERATOR_USER)
    op_custom, op_core = client.CustomObjectsApi(op), client.CoreV1Api(op)

    def forbidden(call) -> dict:
        with pytest.raises(ApiException) as exc:
            call()
        status, body = _status_of(exc.value)
        assert (status, body.get("reason")) == (403, "Forbidden"), body
        assert apiserver_fixtures.OPERATOR_USER in body["message"], body["message"]
        return body

    body = forbidden(lambda: op_custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL))
    assert body["details"] == {"group": GROUP, "kind": PLURAL}, body

    rbac = client.RbacAuthorizationV1Api(admin)
    rbac.create_namespaced_role(ns, {"metadata": {"name": "modelrollouts-reader"}, "rules": [
        {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch"]}]})
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "recserve-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "modelrollouts-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "recserve-operator", "namespace": ns}]})
    try:
        deadline = time.monotonic() + 10
        while True:  # the RBAC authorizer reads bindings from an informer: a moment's lag
            try:
                listed = op_custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
                break
            except ApiException as e:
                assert e.status == 403 and time.monotonic() < deadline, e
                time.sleep(0.1)
        assert listed["items"] == [] and listed["kind"] == "ModelRolloutList"
        forbidden(lambda: op_core.list_namespaced_secret(ns))
        forbidden(lambda: op_custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _rollout("r")))
        forbidden(lambda: op_custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL))
    finally:  # the namespace is the chart's in test_operator_apiserver: it installs its own Role and binding
        rbac.delete_namespaced_role_binding("recserve-operator", ns)
        rbac.delete_namespaced_role("modelrollouts-reader", ns)
