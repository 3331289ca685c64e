"""The operator against a real Kubernetes cluster: the one ``KUBECONFIG`` names, else the local kube-apiserver of
``apiserver_fixtures`` as its admin (skipped only when neither is there: ``make k8s-tools`` builds it).

Applies the CRD from ``helm/recserve/crds`` with the kubernetes client, checks the API server validates
ModelRollouts with its schema, creates a rollout in a fresh namespace, runs the operator (``kopf run`` of
``recserve.operator.handlers`` in a thread, as ``recserve operator run --namespace NS`` does) against a local
embedded Triton, and waits for a terminal phase. The routing policy goes to a local file and to a ConfigMap
in the cluster. Everything the test created is deleted afterwards (the CRD only if the test installed it).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import apiserver_fixtures
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

apiserver = apiserver_fixtures.apiserver  # the local one, used only without KUBECONFIG

CRD_FILE = ROOT / "helm" / "recserve" / "crds" / "modelrollouts.recserve.io.yaml"
GROUP, VERSION, PLURAL = "recserve.io", "v1alpha1", "modelrollouts"


LOCAL_APISERVER_WITHOUT_KUBECONFIG = True
"""Read by tests/conftest.py: without KUBECONFIG these tests run against the local kube-apiserver."""


@pytest.fixture(scope="module")
def k8s(request):
    """The ``kubernetes.client`` module, its default configuration logged in to the cluster (and KUBECONFIG, which
    kopf's login reads, naming it); both restored afterwards."""
    from kubernetes import client, config
    from operator_fixtures import use_kubeconfig

    path = os.environ.get("KUBECONFIG") or str(request.getfixturevalue("apiserver").kubeconfig)
    previous = client.Configuration.get_default_copy()
    with pytest.MonkeyPatch.context() as mp:
        use_kubeconfig(path, mp)
        config.load_kube_config(config_file=path)
        yield client
    client.Configuration.set_default(previous)


@pytest.fixture(scope="module")
def crd(k8s):
    """The CRD applied from the Helm chart; removed afterwards only if this test installed it."""
    from kubernetes.client.exceptions import ApiException

    body = yaml.safe_load(CRD_FILE.read_text())
    ext = k8s.ApiextensionsV1Api()
    created = False
    try:
        ext.create_custom_resource_definition(body)
        created = True
    except ApiException as e:
        if e.status != 409:
            raise
        current = ext.read_custom_resource_definition(body["metadata"]["name"])
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(body["metadata"]["name"], body)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        conditions = ext.read_custom_resource_definition(body["metadata"]["name"]).status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the ModelRollout CRD was not established within 60 s")
    time.sleep(1)  # discovery catches up
    yield body
    if created:
        ext.delete_custom_resource_definition(body["metadata"]["name"])


@pytest.fixture
def namespace(k8s):
    name = f"recserve-e2e-{uuid.uuid4().hex[:6]}"
    core = k8s.CoreV1Api()
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from operator_fixtures import Triton, trained_ranker

    t = Triton(tmp_path_factory.mktemp("e2e-repo"), trained_ranker(tmp_path_factory))
    t.server.start()
    try:
        t.add_model("ranker")
        yield t
    finally:
        t.server.stop()


def test_a_rollout_on_a_real_cluster_reaches_a_terminal_phase(k8s, crd, namespace, triton, tmp_path) -> None:
    from kubernetes.client.exceptions import ApiException
    from operator_fixtures import Traffic, import_handlers, read_policy, wait_for

    import_handlers()  # a 0.5 s tick
    from kopf.testing import KopfRunner

    objects = k8s.CustomObjectsApi()
    policy = tmp_path / "policy.json"
    spec = {
        "model": "ranker", "stableVersion": "1", "candidateVersion": "2",
        "steps": [{"weight": 30, "pauseSeconds": 1}, {"weight": 60, "pauseSeconds": 1}],
        "analysis": {"intervalSeconds": 1, "failureLimit": 2, "minRequests": 3,
                     "thresholds": {"maxErrorRate": 0.0, "minShadowAgreement": 0.9}},
        "triton": {"grpcUrl": triton.grpc_url, "metricsUrl": triton.metrics_url},
        "router": {"policyFile": str(policy), "configMap": "recserve-routing", "shadowPercent": 50},
        "compressionReport": {"gate": {"passed": True, "reasons": []}, "stages": [{"name": "fp16"}]},
    }

    def body(name: str, s: dict) -> dict:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRollout",
                "metadata": {"name": name, "namespace": namespace}, "spec": s}

    # the API server refuses what the schema can express
    bad = {**spec, "steps": [{"weight": 0}], "candidateVersion": "v2"}
    with pytest.raises(ApiException) as refused:
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body("refused", bad))
    assert refused.value.status == 422, refused.value.body

    with Traffic(triton, "ranker", "1", policy) as traffic:
        spec["router"]["metricsUrl"] = traffic.metrics_url
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body("canary", spec))
        stored = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "canary")
        assert stored["spec"]["compressionReport"] == spec["compressionReport"]  # not pruned by the schema
        args = ["run", "--standalone", "--namespace", namespace, "-m", "recserve.operator.handlers"]
        with KopfRunner(args, timeout=60) as runner:
            def status() -> dict:
                return objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "canary").get(
                    "status") or {}

            st = wait_for(lambda: status().get("phase") in ("Promoted", "RolledBack", "Aborted", "Rejected")
                          and status(), 120, lambda: f"a terminal phase: {status()}\n{runner.output[-3000:]}")
            objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "canary")

            def gone() -> bool:
                try:
                    objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "canary")
                except ApiException as e:
                    return e.status == 404
                return False

            wait_for(gone, 60, "the finalizer to release the rollout")
        assert runner.exit_code == 0, runner.output[-3000:]

    assert st["phase"] == "Promoted", st
    assert st["weight"] == 100
    assert read_policy(policy, "ranker") == {"1": 0.0, "2": 100.0}
    cm = k8s.CoreV1Api().read_namespaced_config_map("recserve-routing", namespace)
    assert yaml.safe_load(cm.data["policy.json"])["models"]["ranker"]["versions"] == {"1": 0.0, "2": 100.0}
    events = k8s.CoreV1Api().list_namespaced_event(namespace, field_selector="involvedObject.name=canary").items
    assert {"Started", "Step", "Promoted"} <= {e.reason for e in events}
    promotion = min(t for t, w, _ in traffic.policy_changes if w.get("2") == 100)
    assert traffic.failures("1", until=promotion) == []
