"""The operator on the real kube-apiserver of ``apiserver_fixtures`` (``make k8s-tools``; skipped without), as
the chart's ServiceAccount with exactly the chart's Role and RoleBinding, against the real embedded Triton.

The chart is installed by the real ``helm`` (release ``recserve`` in namespace ``recserve``, labelled Pod
Security ``restricted``); its ServiceAccount ``recserve-operator`` logs in with a static token of that identity
(no controller-manager mints ServiceAccount tokens here), and ``recserve operator run --namespace recserve``
runs in its own process as a user runs it (``test_operator_process.operator_process``). The test plays the
router (``operator_fixtures.Traffic``: it follows the policy file the operator writes, next to the ConfigMap).

Checked: a good candidate promoted through every step and its rollout's finalizer run on deletion; a failing
candidate rolled back by the first or second analysis; an operator SIGKILLed mid-rollout and started again
goes on from the step it was at, neither repeating nor skipping one; every request the operator made was
allowed (the server's audit log), and the same identity is denied what the chart does not grant.
"""

from __future__ import annotations

import datetime
import json
import sys
import threading
import time
from pathlib import Path

import apiserver_fixtures
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from operator_fixtures import (  # noqa: E402
    GROUP,
    NAMESPACE,
    PLURAL,
    VERSION,
    Traffic,
    Triton,
    only_loaded,
    phases,
    read_policy,
    report,
    rollout,
    rollout_spec,
    trained_ranker,
    wait_for,
)
from test_helm_chart import CHART, helm, run_helm  # noqa: E402
from test_operator_process import (  # noqa: E402
    TERMINAL,
    FailingCandidate,
    assert_healthy,
    folded,
    operator_process,
    spec,
    wait_phase,
)

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

apiserver = apiserver_fixtures.apiserver
helm = helm  # the fixture, re-exported for pytest

RELEASE = "recserve"
CONFIGMAP = f"{RELEASE}-routing-policy"
"""The chart's routing-policy ConfigMap (router.policyConfigMap's default): the only one its Role lets the
operator read and patch."""


class Kube:
    """The synchronous view of rollouts the operator tests use (``operator_fixtures.ApiServer``'s methods), on
    the real server: ``history`` is every version a watch saw, from before the first rollout was created."""

    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.custom, self.core, self.ns = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client), namespace
        self._versions: dict[str, list[dict]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        self._since = listed["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._watch, name="rollout-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            w = watch.Watch()
            for event in w.stream(self.custom.list_namespaced_custom_object, GROUP, VERSION, self.ns, PLURAL,
                                  resource_version=self._since, timeout_seconds=5):
                obj = event["object"]
                self._since = obj["metadata"]["resourceVersion"]
                if event["type"] in ("ADDED", "MODIFIED"):
                    with self._lock:
                        self._versions.setdefault(obj["metadata"]["name"], []).append(obj)
                if self._stop.is_set():
                    w.stop()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def create(self, body: dict) -> dict:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def get(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def status(self, name: str) -> dict:
        return (self.get(name) or {}).get("status") or {}

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def history(self, name: str) -> list[dict]:
        with self._lock:
            return list(self._versions.get(name, []))

    def events(self, name: str) -> list[dict]:
        """The Events about the rollout, the operator's own (kopf's ``Logging`` ones left out)."""
        items = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        return [{"reason": e.reason, "message": e.message} for e in items if e.reason != "Logging"]


@pytest.fixture(scope="module")
def cluster(apiserver, helm):
    """The chart installed into ``recserve`` (restricted); the operator identity's kubeconfig; a ``Kube``."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    admin = apiserver.client()
    core = client.CoreV1Api(admin)
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    try:
        core.create_namespace({"metadata": {"name": NAMESPACE, "labels": labels}})
    except ApiException as e:
        assert e.status == 409, e
        core.patch_namespace(NAMESPACE, {"metadata": {"labels": labels}})
    run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kubeconfig", str(apiserver.kubeconfig),
)
    sa = core.read_namespaced_service_account(f"{RELEASE}-operator", NAMESPACE)
    assert f"system:serviceaccount:{NAMESPACE}:{sa.metadata.name}" == apiserver_fixtures.OPERATOR_USER
    op = client.CustomObjectsApi(apiserver.client(apiserver_fixtures.OPERATOR_USER))
    wait_for(lambda: _can(lambda: op.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)), 10,
             "the chart's RoleBinding to reach the RBAC authorizer (it reads bindings from an informer)")
    kube = Kube(admin, NAMESPACE)
    yield apiserver, kube
    kube.close()
    run_helm(helm, "uninstall", RELEASE, "--namespace", NAMESPACE, "--kubeconfig", str(apiserver.kubeconfig))


def _can(call) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        call()
        return True
    except ApiException as e:
        assert e.status == 403, e
        return False


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    t = Triton(tmp_path_factory.mktemp("operator-apiserver-repo"), trained_ranker(tmp_path_factory))
    t.server.start()
    try:
        yield t
    finally:
        t.server.stop()


def _denied(apiserver, since: float) -> list[str]:
    """The operator identity's requests since ``since`` (wall clock) that the server refused (401, 403)."""
    def at(e: dict) -> float:
        return datetime.datetime.fromisoformat(e["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()

    return [f"{e['verb']} {e.get('requestURI')}: {e['responseStatus']['code']}" for e in apiserver.audit()
            if at(e) >= since and e["responseStatus"]["code"] in (401, 403)]


def _operator_kubeconfig(apiserver) -> Path:
    return apiserver.kubeconfig_for(apiserver_fixtures.OPERATOR_USER)


def _used_and_granted(apiserver, helm_bin: str) -> tuple[set, set]:
    """What the operator identity was allowed to do so far, by the audit log, as (verb, resource), and what the
    chart's Role grants."""
    rendered = run_helm(helm_bin, "template", RELEASE, str(CHART), "--namespace", NAMESPACE).stdout
    (role,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Role"]
    granted = {(verb, resource) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}

    def resource(e: dict) -> str:
        ref = e["objectRef"]
        return ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")

    allowed = [e for e in apiserver.audit() if e["responseStatus"]["code"] < 400 and e.get("objectRef")]
    used = {(e["verb"], resource(e)) for e in allowed}
    report(test="real-apiserver-rbac", operator_requests_allowed=len(allowed),
           used=json.dumps(sorted(f"{v} {r}" for v, r in used)))
    return used, granted


def _host_address() -> str:
    """This machine's address on its default route, as a pod IP stands in an EndpointSlice (the API server refuses
    loopback addresses there); 127.0.0.1 on a machine without one. Triton listens on every address."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: nothing is sent; the kernel picks the source address
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _triton_pod(kube: Kube, triton: Triton) -> str:
    """The chart's Triton Service, with an EndpointSlice that names the test's Triton as its one ready pod (no
    EndpointSlice controller runs here: the test writes what it would write); the Service's name."""
    from kubernetes import client

    from recserve.operator.pods import SERVICE_LABEL

    (svc,) = kube.core.list_namespaced_service(NAMESPACE, label_selector="app.kubernetes.io/component=triton").items
    ports = {p.name: p.port for p in svc.spec.ports}
    s = triton.server.settings
    assert set(ports) >= {"grpc", "metrics"}, ports
    body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{svc.metadata.name}-test", "labels": {SERVICE_LABEL: svc.metadata.name}},
            "endpoints": [{"addresses": [_host_address()], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": "triton-test", "namespace": NAMESPACE}}],
            "ports": [{"name": "grpc", "port": s.grpc_port, "protocol": "TCP"},
                      {"name": "metrics", "port": s.metrics_port, "protocol": "TCP"}]}
    client.DiscoveryV1Api(kube.core.api_client).create_namespaced_endpoint_slice(NAMESPACE, body)
    return svc.metadata.name


def test_a_good_candidate_is_promoted_and_its_finalizer_runs(cluster, triton, tmp_path, helm):
    """A good candidate goes through every step to Promoted, deleting the rollout runs its finalizer, and the
    operator used every permission the chart's Role grants and no other (least privilege, measured by the
    audit log rather than argued). Triton is reached as the chart's Service's pods (its EndpointSlices)."""
    apiserver, kube = cluster
    since = time.time()
    model = triton.add_model("e2egood")
    policy = tmp_path / "policy.json"
    service = _triton_pod(kube, triton)
    with Traffic(triton, model, "1", policy) as traffic:
        body = rollout("good", rollout_spec(triton, model, policy, traffic, router={"configMap": CONFIGMAP}))
        body["spec"]["triton"] = {"service": service}
        with operator_process(_operator_kubeconfig(apiserver), tmp_path / "operator.log") as op:
            kube.create(body)
            st = wait_phase(kube, "good", TERMINAL, 120, op)
            only_loaded(triton, model, "2")
            kube.delete("good")
            wait_for(lambda: kube.get("good") is None, 60, lambda: f"the finalizer to release the rollout:\n{op.tail()}")
            assert_healthy(op)
    assert st["phase"] == "Promoted" and st["weight"] == 100, st
    assert phases(kube.history("good")) == ["Pending", "Progressing", "Promoted"]
    assert read_policy(policy, model) == {"1": 0.0, "2": 100.0}
    cm = kube.core.read_namespaced_config_map(CONFIGMAP, NAMESPACE)
    assert yaml.safe_load(cm.data["policy.json"])["models"][model]["versions"] == {"1": 0.0, "2": 100.0}
    assert {"Started", "Step", "Promoted"} <= {e["reason"] for e in kube.events("good")}
    assert folded(traffic.candidate_weights("2")) == [0.0, 30.0, 60.0, 100.0]
    promotion = min(t for t, w, _ in traffic.policy_changes if w.get("2") == 100)
    assert traffic.failures("1", until=promotion) == []
    assert _denied(apiserver, since) == []
    used, granted = _used_and_granted(apiserver, helm)
    assert used == granted, f"used but not granted: {used - granted}; granted but not used: {granted - used}"


def test_a_failing_candidate_is_rolled_back_by_its_first_or_second_analysis(cluster, triton, tmp_path):
    apiserver, kube = cluster
    since = time.time()
    model = triton.add_model("e2ebad")
    policy = tmp_path / "policy.json"
    interval = 2.0
    with FailingCandidate(triton, model, "1", policy, rate_hz=20) as traffic:
        body = rollout("bad", spec(triton, model, policy, traffic, steps=[{"weight": 20, "pauseSeconds": 600}],
                                   analysis={"intervalSeconds": interval, "failureLimit": 1, "minRequests": 3},
                                   router={"configMap": CONFIGMAP}))
        with operator_process(_operator_kubeconfig(apiserver), tmp_path / "operator.log") as op:
            kube.create(body)
            st = wait_phase(kube, "bad", TERMINAL, 90, op)
            only_loaded(triton, model, "1")
            assert_healthy(op)
    assert st["phase"] == "RolledBack" and st["weight"] == 0, st
    analyses = {a["at"]: a for v in kube.history("bad") if (a := (v.get("status") or {}).get("lastAnalysis"))}
    verdicts = [analyses[t] for t in sorted(analyses)]
    assert 1 <= len(verdicts) <= 2 and verdicts[-1]["verdict"] == "failed", verdicts
    started = next(t for t, w, _ in traffic.policy_changes if w.get("2") == 20)
    back = next(t for t, w, _ in traffic.policy_changes if t > started and w.get("2") == 0)
    first_bad = verdicts[-1]["at"]  # the operator's clock (epoch seconds), as the policy file's mtime
    assert traffic.failures("1") == []
    assert _denied(apiserver, since) == []
    report(test="real-apiserver-rollback", analyses=len(verdicts), interval_s=interval,
           seconds_step_start_to_weight_0=round(back - started, 2),
           seconds_failed_analysis_to_weight_0=round(back - first_bad, 2),
           stable_requests=traffic.requests("1"), stable_failures=len(traffic.failures("1")))


def test_an_operator_killed_mid_rollout_resumes_at_its_step(cluster, triton, tmp_path):
    apiserver, kube = cluster
    since = time.time()
    model = triton.add_model("e2ekill")
    policy = tmp_path / "policy.json"
    steps = [{"weight": 20, "pauseSeconds": 4}, {"weight": 50, "pauseSeconds": 4}, {"weight": 80, "pauseSeconds": 4}]
    with Traffic(triton, model, "1", policy) as traffic:
        body = rollout("resume", rollout_spec(triton, model, policy, traffic, steps=steps,
                                              router={"configMap": CONFIGMAP}))
        kubeconfig = _operator_kubeconfig(apiserver)
        with operator_process(kubeconfig, tmp_path / "operator-1.log") as first:
            kube.create(body)
            at = wait_for(lambda: first.running() and kube.status("resume").get("weight") == 50
                          and kube.status("resume"), 60, lambda: f"step 2: {kube.status('resume')}\n{first.tail()}")
            first.proc.kill()  # SIGKILL: no graceful stop, whatever it was doing
            first.proc.wait(10)
        with operator_process(kubeconfig, tmp_path / "operator-2.log") as second:
            st = wait_phase(kube, "resume", TERMINAL, 120, second)
            assert_healthy(second)
    assert at["phase"] == "Progressing", at
    assert st["phase"] == "Promoted", st
    assert folded(traffic.candidate_weights("2")) == [0.0, 20.0, 50.0, 80.0, 100.0]
    weights = folded([(v.get("status") or {}).get("weight") for v in kube.history("resume")
                      if (v.get("status") or {}).get("weight") is not None])
    assert weights == sorted(weights) and {20, 50, 80, 100} <= set(weights), weights
    steps_events = [e for e in kube.events("resume") if e["reason"] == "Step"]
    assert len(steps_events) == len({e["message"] for e in steps_events}), steps_events  # no step twice
    assert traffic.failures("1") == []
    assert _denied(apiserver, since) == []


def test_the_operator_identity_is_denied_what_the_chart_does_not_grant(cluster):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    apiserver, _ = cluster
    op = apiserver.client(apiserver_fixtures.OPERATOR_USER)
    core, custom = client.CoreV1Api(op), client.CustomObjectsApi(op)
    calls = {
        "list secrets": lambda: core.list_namespaced_secret(NAMESPACE),
        "read another ConfigMap": lambda: core.read_namespaced_config_map("kube-root-ca.crt", NAMESPACE),
        "create a ModelRollout": lambda: custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, rollout("x", {})),
        "delete a ModelRollout": lambda: custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "x"),
        "list ModelRollouts elsewhere": lambda: custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL),
        "list pods": lambda: core.list_namespaced_pod(NAMESPACE),
        "get a ModelRollout": lambda: custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "x"),
    }
    statuses = {}
    for what, call in calls.items():
        try:
            call()
            statuses[what] = 200
        except ApiException as e:
            statuses[what] = e.status
    assert statuses == dict.fromkeys(calls, 403), statuses
