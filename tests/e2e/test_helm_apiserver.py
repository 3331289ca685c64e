"""The chart, installed by the real ``helm`` into the real kube-apiserver of ``apiserver_fixtures`` (``make
k8s-tools``; skipped without), for the default values and every ``helm/recserve/ci/*-values.yaml``.

Each scenario goes into its own namespace labelled ``pod-security.kubernetes.io/enforce: restricted`` (and
``warn``, so the server also judges the pod templates of Deployments and Jobs and says so to helm):

1. every rendered object, hooks and the CRD included, is accepted by a server-side dry run;
2. ``helm install`` succeeds with no PodSecurity warning, and every object it made is on the server;
3. a Pod made from each pod template the chart renders is admitted under ``restricted`` (no kubelet runs, so it
   stays Pending), while a privileged pod in the same namespace is refused: the admission is live;
4. ``helm upgrade`` makes revision 2 with the new value on the server, ``helm uninstall`` removes every object
   but the model repository PVC the chart keeps (``modelRepository.pvc.keep``).

The ServiceMonitor (prometheus-operator) and RayService (KubeRay) kinds are not Kubernetes' own: their CRDs
come with those operators' charts, which are not installed here. Small stand-in CRDs (same group, version and
kind, any fields) let the server store them; what their own operators validate is not checked here. Likewise
the ``nvidia`` RuntimeClass the GPU scenario names, which the NVIDIA GPU operator installs on a GPU cluster.
Hooks: helm waits for a hook Job to finish, and no controller runs a Job here, so scenarios with hooks are
installed with ``--no-hooks`` (their hook objects are still dry-run in step 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import apiserver_fixtures
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_helm_chart import CHART, SCENARIOS, helm, pod_templates, run_helm, values_args  # noqa: E402

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

apiserver = apiserver_fixtures.apiserver
helm = helm  # the fixture, re-exported for pytest

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}
STAND_INS = [("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors"),
             ("ray.io", "v1", "RayService", "rayservices"), ("ray.io", "v1", "RayCluster", "rayclusters")]


def _stand_in_crd(group: str, version: str, kind: str, plural: str) -> dict:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                     "versions": [{"name": version, "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


@pytest.fixture(scope="module")
def admin(apiserver):
    client = apiserver.client()
    for group, version, kind, plural in STAND_INS:
        apiserver_fixtures.ensure_crd(client, _stand_in_crd(group, version, kind, plural))
    from kubernetes.client import NodeV1Api
    from kubernetes.client.exceptions import ApiException

    try:  # what the NVIDIA GPU operator installs: pods naming it are refused without it
        NodeV1Api(client).create_runtime_class({"metadata": {"name": "nvidia"}, "handler": "nvidia"})
    except ApiException as e:
        assert e.status == 409, e
    crd = yaml.safe_load((CHART / "crds" / "modelrollouts.recserve.io.yaml").read_text())
    apiserver_fixtures.ensure_crd(client, crd)
    return client


@pytest.fixture(scope="module")
def dynamic(admin):
    from kubernetes.dynamic import DynamicClient

    return DynamicClient(admin)


def _namespace(core, name: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        core.create_namespace({"metadata": {"name": name, "labels": RESTRICTED}})
        core.create_namespaced_service_account(name, {"metadata": {"name": "default"}})  # no controller-manager
    except ApiException as e:
        assert e.status == 409, e


def _helm(apiserver, helm_bin: str, *args: str) -> subprocess.CompletedProcess:
    return run_helm(helm_bin, *args, "--kubeconfig", str(apiserver.kubeconfig))


def _resource(dynamic, doc: dict):
    return dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])


def _is_hook(doc: dict) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


def _kept(doc: dict) -> bool:
    """Objects helm leaves on uninstall (``modelRepository.pvc.keep``: the models outlive the release)."""
    return (doc["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == "keep"


@pytest.mark.parametrize("scenario", list(dict.fromkeys(SCENARIOS)))  # ci/default-values.yaml is the default
def test_the_chart_installs_upgrades_and_uninstalls_under_restricted(apiserver, admin, dynamic, helm, scenario):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(admin)
    ns, release = f"helm-{scenario}-{uuid.uuid4().hex[:4]}", f"rs-{scenario}"
    _namespace(core, ns)
    values = values_args(scenario)
    rendered = [d for d in yaml.safe_load_all(run_helm(helm, "template", release, str(CHART), "--namespace", ns,
                                                       "--include-crds", *values).stdout) if d]
    for extra in {d["metadata"].get("namespace") for d in rendered} - {None, ns}:
        _namespace(core, extra)  # the Roles of the namespaces the operator watches

    # 1. a server-side dry run of every object
    refused = []
    for doc in rendered:
        res = _resource(dynamic, doc)
        try:
            res.create(body=doc, namespace=(doc["metadata"].get("namespace") or ns) if res.namespaced else None,
                       dry_run="All")
        except ApiException as e:
            if not (doc["kind"] == "CustomResourceDefinition" and e.status == 409):  # installed before: fine
                refused.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.status} {e.body}")
    assert refused == []

    # 2. a real install
    hooks = any(_is_hook(d) for d in rendered)
    installed = _helm(apiserver, helm, "install", release, str(CHART), "--namespace", ns, "--timeout", "60s",
                      *(["--no-hooks"] if hooks else []), *values)
    assert "PodSecurity" not in installed.stderr, installed.stderr
    objects = [d for d in rendered if d["kind"] != "CustomResourceDefinition" and not (hooks and _is_hook(d))]
    for doc in objects:
        res = _resource(dynamic, doc)
        got = res.get(name=doc["metadata"]["name"],
                      namespace=(doc["metadata"].get("namespace") or ns) if res.namespaced else None)
        assert got.metadata.labels["app.kubernetes.io/instance"] == release, doc["metadata"]["name"]

    # 3. the pods the chart would make are admitted under restricted; a privileged one is not
    pods = dynamic.resources.get(api_version="v1", kind="Pod")
    templates = pod_templates(rendered)
    assert templates
    for i, (what, _meta, spec) in enumerate(templates):
        name = f"template-{i}"
        try:
            pods.create(body={"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}, namespace=ns)
        except ApiException as e:
            pytest.fail(f"a pod of {what} was refused in a restricted namespace: {e.status} {e.body}")
        pods.delete(name=name, namespace=ns, grace_period_seconds=0)
    with pytest.raises(ApiException) as privileged:
        pods.create(namespace=ns, body={"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "privileged"},
                                        "spec": {"containers": [{"name": "c", "image": "busybox",
                                                                 "securityContext": {"privileged": True}}]}})
    assert privileged.value.status == 403 and "PodSecurity" in privileged.value.body, privileged.value.body

    # 4. upgrade, then uninstall
    _helm(apiserver, helm, "upgrade", release, str(CHART), "--namespace", ns, "--timeout", "60s",
          *(["--no-hooks"] if hooks else []), *values, "--set", "triton.logVerbose=1")
    (listed,) = json.loads(_helm(apiserver, helm, "list", "--namespace", ns, "--output", "json").stdout)
    assert (listed["revision"], listed["status"]) == ("2", "deployed"), listed
    triton = next(d for d in objects if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-triton"))
    args = client.AppsV1Api(admin).read_namespaced_deployment(triton["metadata"]["name"], ns) \
        .spec.template.spec.containers[0].args
    assert "--log-verbose=1" in args, args
    _helm(apiserver, helm, "uninstall", release, "--namespace", ns, "--timeout", "60s")
    left, kept = [], []
    for doc in objects:
        res = _resource(dynamic, doc)
        try:
            res.get(name=doc["metadata"]["name"],
                    namespace=(doc["metadata"].get("namespace") or ns) if res.namespaced else None)
            (kept if _kept(doc) else left).append(f"{doc['kind']}/{doc['metadata']['name']}")
        except ApiException as e:
            assert e.status == 404, e
    assert left == [], f"helm uninstall left {left}"
    assert kept == [f"{d['kind']}/{d['metadata']['name']}" for d in objects if _kept(d)]  # the model repository
