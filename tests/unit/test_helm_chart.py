"""The Helm chart (helm/recserve) as a real `helm` renders it.

`helm lint --strict` and `helm template` run on the default values and on every scenario under
helm/recserve/ci/; the manifests are validated against the Kubernetes 1.37 schemas (kubernetes-validate,
strict), a sample ModelRollout against the CRD's openAPIV3Schema, and the properties that matter in
operation are asserted: GPUs, hardening, exact RBAC, stable selectors, no secrets, ports, and that the
router config and the operator's names fit recserve's own code.

helm comes from PATH or .tools/bin (`make tools`, scripts/fetch_helm.sh). Without it these tests fail
under `make test` and CI, and skip with a hint elsewhere.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "recserve"
CI = CHART / "ci"
RELEASE, NAMESPACE = "rs", "recserve"
FULLNAME = f"{RELEASE}-recserve"
K8S_VERSION = "1.37"
CUSTOM_KINDS = {"RayService", "RayCluster", "ServiceMonitor", "ModelRollout"}  # CRD-typed: no Kubernetes schema for them
SCENARIOS = ["default"] + sorted(p.name.removesuffix("-values.yaml") for p in CI.glob("*-values.yaml"))
OPERATOR_RULES = [
    {"apiGroups": ["recserve.io"], "resources": ["modelrollouts"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": ["recserve.io"], "resources": ["modelrollouts/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
]
PODS_RULE = {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]}
"""The Triton pods behind a rollout's ``triton.service``."""


# ---------------------------------------------------------------------------------------------- helm


def _find_helm() -> str | None:
    local = ROOT / ".tools" / "bin" / "helm"
    return shutil.which("helm") or (str(local) if os.access(local, os.X_OK) else None)


@pytest.fixture(scope="session")
def helm() -> str:
    path = _find_helm()
    if path is None:
        message = "no helm binary on PATH or in .tools/bin: run `make tools` (scripts/fetch_helm.sh)"
        if os.environ.get("MAKELEVEL") or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HELM_CACHE_HOME": "/tmp/recserve-helm/cache",
                               "HELM_CONFIG_HOME": "/tmp/recserve-helm/config",
                               "HELM_DATA_HOME": "/tmp/recserve-helm/data"})
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def values_args(scenario: str) -> list[str]:
    return [] if scenario == "default" else ["-f", str(CI / f"{scenario}-values.yaml")]


def template(helm: str, *args: str, chart: Path = CHART, check: bool = True) -> subprocess.CompletedProcess:
    return run_helm(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, "--include-crds", *args,
                    check=check)


@functools.cache
def _rendered(helm: str, scenario: str) -> tuple[dict, ...]:
    out = template(helm, *values_args(scenario)).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


@pytest.fixture(params=SCENARIOS)
def scenario(request) -> str:
    return request.param


@pytest.fixture
def docs(helm, scenario) -> list[dict]:
    return copy.deepcopy(list(_rendered(helm, scenario)))


def render(helm: str, scenario: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(helm, scenario)))


def values_of(scenario: str) -> dict:
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    if scenario != "default":
        _merge(base, yaml.safe_load((CI / f"{scenario}-values.yaml").read_text()) or {})
    return base


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_templates(docs) -> list[tuple[str, dict, dict]]:
    """(what, pod metadata, pod spec) of every pod the release creates, RayService pods included."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            t = d["spec"]["template"]
            out.append((name, t["metadata"], t["spec"]))
        elif d["kind"] in ("RayService", "RayCluster"):
            cluster = d["spec"]["rayClusterConfig"] if d["kind"] == "RayService" else d["spec"]
            t = cluster["headGroupSpec"]["template"]
            out.append((f"{name} head", t["metadata"], t["spec"]))
            for g in cluster["workerGroupSpecs"]:
                t = g["template"]
                out.append((f"{name} workers {g['groupName']}", t["metadata"], t["spec"]))
    return out


def container(docs, kind: str, name: str, container_name: str) -> dict:
    spec = one(docs, kind, name)["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == container_name]
    return c


# ------------------------------------------------------------------------------------ lint + schemas


def test_helm_lint_strict(helm, scenario):
    proc = run_helm(helm, "lint", "--strict", str(CHART), *values_args(scenario))
    assert "0 chart(s) failed" in proc.stdout


def test_scenarios_cover_what_the_chart_can_be(helm):
    assert {"default", "rayservice", "gpu-s3", "all-namespaces", "monitoring"} <= set(SCENARIOS)


@pytest.fixture(scope="module")
def k8s_validate():
    import kubernetes_validate
    import kubernetes_validate.utils as utils

    # the schema files are the same for every object: read each once
    if not hasattr(utils.schema_contents, "cache_info"):
        utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)
    return kubernetes_validate


def test_manifests_match_the_kubernetes_schemas(docs, k8s_validate):
    validated = 0
    for d in docs:
        if d["kind"] in CUSTOM_KINDS:
            continue
        try:
            k8s_validate.validate(d, K8S_VERSION, strict=True)
        except k8s_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            pytest.fail(f"{d['kind']}/{d['metadata']['name']}: {path}: {e.message}")
        validated += 1
    assert validated >= 15


def test_the_validator_is_strict(helm, k8s_validate):
    """A misspelled field in a rendered Deployment is caught: the validation above is not vacuous."""
    deploy = copy.deepcopy(one(render(helm, "default"), "Deployment", f"{FULLNAME}-triton"))
    deploy["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(k8s_validate.ValidationError):
        k8s_validate.validate(deploy, K8S_VERSION, strict=True)


def test_every_kind_is_known(docs, k8s_validate):
    """Only the CRD-typed kinds lack a Kubernetes schema (a typo in apiVersion or kind would too)."""
    for d in docs:
        try:
            k8s_validate.validate(d, K8S_VERSION, strict=True)
        except k8s_validate.SchemaNotFoundError:
            assert d["kind"] in CUSTOM_KINDS, f"no schema for {d['apiVersion']} {d['kind']}"
        except k8s_validate.ValidationError:
            pass  # reported by test_manifests_match_the_kubernetes_schemas


def test_values_yaml_and_scenarios_match_values_schema(scenario):
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values_of(scenario))


@pytest.mark.parametrize("bad, needle", [
    ("router: {config: {triton_url: 'x:1'}}", "triton_url"),
    ("triton: {gpus: two}", "gpus"),
    ("triton: {summaryQuantiles: '99th'}", "summaryQuantiles"),
    ("router: {drainSeconds: -1}", "drainSeconds"),
    ("modelRepository: {type: nfs}", "type"),
    ("operator: {rbac: {verbs: ['*']}}", "verbs"),
    ("engineBuild: {models: [{name: ranker, source: relative/path}]}", "source"),
])
def test_values_schema_rejects_mistakes(helm, tmp_path, bad, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(bad)
    proc = template(helm, "-f", str(f), check=False)
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr


@pytest.mark.parametrize("values, needle", [
    ({"modelRepository": {"type": "objectStorage", "objectStorage": {"url": "s3://b/m"}}},
     "router.artifacts.existingClaim is required"),
    ({"modelRepository": {"type": "objectStorage"}, "router": {"artifacts": {"existingClaim": "a"}}},
     "modelRepository.objectStorage.url is required"),
    ({"modelRepository": {"type": "objectStorage", "objectStorage": {"url": "s3://b/m"}},
      "router": {"artifacts": {"existingClaim": "a"}}, "engineBuild": {"enabled": True}},
     "engineBuild needs modelRepository.type=pvc"),
    ({"engineBuild": {"enabled": True, "hook": True}}, "engineBuild.hook needs modelRepository.pvc.existingClaim"),
    ({"router": {"config": {"default_model": "nope"}}}, 'default_model "nope" is not among'),
    ({"router": {"config": {"num_replicas": 2}}}, "ingress replica serves from one replica per pod, got num_replicas 2"),
    ({"router": {"config": {"num_replicas": 2, "ingress": "direct"}}},
     "ingress direct serves from one replica per pod, got num_replicas 2"),
    ({"router": {"config": {"autoscaling": {"max_replicas": 4}}}}, "router.config.autoscaling needs ingress proxy"),
    ({"router": {"drainSeconds": 30}}, "router.drainSeconds (30) must be less than router.terminationGracePeriodSeconds (30)"),
])
def test_impossible_combinations_say_what_to_do(helm, tmp_path, values, needle):
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump(values))
    proc = template(helm, "-f", str(f), check=False)
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------- the CRD


def _openapi_to_jsonschema(node):
    """OpenAPI v3.0 (draft-4 semantics: boolean exclusiveMinimum) -> JSON Schema draft 4, with nullable."""
    if isinstance(node, dict):
        out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if out.pop("nullable", False) and "type" in out:
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(node, list):
        return [_openapi_to_jsonschema(v) for v in node]
    return node


def sample_rollout(docs) -> dict:
    triton = one(docs, "Service", f"{FULLNAME}-triton")
    router = one(docs, "Service", f"{FULLNAME}-router")
    ports = {s["metadata"]["name"]: {p["name"]: p["port"] for p in s["spec"]["ports"]} for s in (triton, router)}
    policy = _router_policy_configmap(docs)
    return {
        "apiVersion": "recserve.io/v1alpha1", "kind": "ModelRollout",
        "metadata": {"name": "ranker-v2", "namespace": NAMESPACE},
        "spec": {
            "model": "ranker", "stableVersion": "1", "candidateVersion": "2",
            "steps": [{"weight": 10, "pauseSeconds": 60}, {"weight": 50, "pauseSeconds": 60}, {"weight": 100}],
            "analysis": {"intervalSeconds": 0.5, "failureLimit": 2, "thresholds": {"maxErrorRate": 0.01}},
            "triton": {"service": triton["metadata"]["name"]},
            "router": {"configMap": policy,
                       "metricsUrl": f"http://{router['metadata']['name']}.{NAMESPACE}:"
                                     f"{ports[router['metadata']['name']]['http']}/metrics"},
        },
    }


def test_crd_ships_and_a_modelrollout_fits_it(helm):
    import jsonschema

    from recserve.operator.spec import GROUP, KIND, PLURAL, VERSION, ModelRolloutSpec

    docs = render(helm, "default")
    crd = one(docs, "CustomResourceDefinition", f"{PLURAL}.{GROUP}")
    assert crd["spec"]["names"]["kind"] == KIND
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    validator = jsonschema.Draft4Validator(_openapi_to_jsonschema(version["schema"]["openAPIV3Schema"]))
    rollout = sample_rollout(docs)
    validator.validate(rollout)
    ModelRolloutSpec.model_validate(rollout["spec"])  # and the operator takes it

    bad = copy.deepcopy(rollout)
    bad["spec"]["steps"][0]["weight"] = 101
    assert not validator.is_valid(bad)
    del bad["spec"]["triton"]
    assert any("triton" in e.message for e in validator.iter_errors(bad))


def test_crd_is_the_generated_one():
    """crds/ holds what `recserve operator crd` prints (generated from the operator's pydantic spec)."""
    from recserve.operator.crd import crd_yaml

    assert yaml.safe_load((CHART / "crds" / "modelrollouts.recserve.io.yaml").read_text()) == yaml.safe_load(crd_yaml())


# ----------------------------------------------------------------------------------------------- GPU


def test_triton_requests_gpus_on_gpu_nodes(docs, scenario):
    values = values_of(scenario)
    spec = one(docs, "Deployment", f"{FULLNAME}-triton")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    gpus = values["triton"]["gpus"]
    assert gpus >= 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert spec["nodeSelector"] == values["triton"]["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    if scenario == "gpu-s3":
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms[0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.product"
        assert spec["runtimeClassName"] == "nvidia"


def test_triton_runs_explicit_model_control_with_health_probes(docs, scenario):
    values = values_of(scenario)
    c = container(docs, "Deployment", f"{FULLNAME}-triton", "triton")
    args = c["args"]
    assert args[0] == "tritonserver"
    assert "--model-control-mode=explicit" in args
    assert [a.split("=", 1)[1] for a in args if a.startswith("--load-model=")] == values["triton"]["loadModels"]
    assert "--metrics-config=summary_latencies=true" in args  # the operator's p99 reads these
    assert "--metrics-config=summary_quantiles=0.5:0.05,0.99:0.005" in args
    assert "--strict-readiness=true" in args
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["image"].endswith("-triton") or "triton" in c["image"]
    (repo,) = [a.split("=", 1)[1] for a in args if a.startswith("--model-repository=")]
    if scenario == "gpu-s3":
        assert repo == "s3://recserve-models/production"
        assert c["envFrom"] == [{"secretRef": {"name": "recserve-s3-credentials"}}]
        assert not find(docs, "PersistentVolumeClaim")
        assert "--cache-config=local,size=1073741824" in args
    else:
        assert repo == "/models"
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True


def test_engine_build_job_compiles_tensorrt_on_a_gpu_node(helm):
    docs = render(helm, "rayservice")  # a Helm hook, two models, an existing PVC
    (job,) = find(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    spec = job["spec"]["template"]["spec"]
    builds = spec.get("initContainers", []) + spec["containers"]
    assert [c["name"] for c in builds] == ["build-ranker", "build-user-tower"]
    for c in builds:
        assert c["args"][:2] == ["recserve", "build"] and "--target=tensorrt" in c["args"]
        assert "--repository=/models" in c["args"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert c["image"] == container(docs, "Deployment", f"{FULLNAME}-triton", "triton")["image"]
        assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]  # writable
    assert "--precision=int8" in builds[0]["args"] and "--version=2" in builds[1]["args"]
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "recserve-models"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["restartPolicy"] == "Never"
    cm = one(docs, "ConfigMap", f"{FULLNAME}-engine-build")
    assert cm["metadata"]["annotations"]["helm.sh/hook-weight"] == "-5"  # before the Job
    assert yaml.safe_load(cm["data"]["profile.yaml"])["max_batch_size"] == 256


def test_plain_engine_build_job_reruns_only_when_what_it_builds_changes(helm, tmp_path):
    def job_name(extra: dict) -> str:
        f = tmp_path / "v.yaml"
        f.write_text(yaml.safe_dump({"engineBuild": {"enabled": True, **extra}}))
        docs = [d for d in yaml.safe_load_all(template(helm, "-f", str(f)).stdout) if d]
        (job,) = find(docs, "Job")
        assert "helm.sh/hook" not in job["metadata"].get("annotations", {})
        return job["metadata"]["name"]

    first = job_name({})
    assert first == job_name({}) and first.startswith(f"{FULLNAME}-engine-build-")
    assert first != job_name({"profile": {"max_batch_size": 128}})
    assert "engineBuild" not in json.dumps(render(helm, "default"))  # off by default
    assert not find(render(helm, "default"), "Job")


# ---------------------------------------------------------------------------------------- hardening


def test_every_pod_and_container_is_hardened(docs):
    pods = pod_templates(docs)
    assert len(pods) >= 3
    for what, _, spec in pods:
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) > 0, what
        assert psc.get("seccompProfile") == {"type": "RuntimeDefault"}, what
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), what
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            where = f"{what} container {c['name']}"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", psc.get("runAsUser", 0)) > 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert sc.get("seccompProfile", psc.get("seccompProfile")) == {"type": "RuntimeDefault"}, where
            # a read-only root filesystem needs a writable /tmp (Python, Ray, TensorRT)
            (tmp,) = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]], where
            for v in c.get("volumeMounts", []):
                assert "hostPath" not in volumes[v["name"]], where


def test_only_the_operator_gets_an_api_token(docs):
    for what, _, spec in pod_templates(docs):
        if "operator" in what:
            assert spec["automountServiceAccountToken"] is True
        elif "RayService" in what and "head" in what:
            continue  # KubeRay gives the head its own ServiceAccount for the in-tree autoscaler
        else:
            assert spec["automountServiceAccountToken"] is False, what
    for sa in find(docs, "ServiceAccount"):
        if not sa["metadata"]["name"].endswith("-operator"):
            assert sa["automountServiceAccountToken"] is False


# --------------------------------------------------------------------------------------------- RBAC


def _policy_rule(names):
    return {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": names, "verbs": ["get", "patch"]}


def test_operator_rbac_is_exactly_what_it_touches(docs, scenario):
    values = values_of(scenario)
    policy_names = values["operator"]["rbac"]["policyConfigMapNames"] or [f"{FULLNAME}-routing-policy"]
    expected = OPERATOR_RULES + [_policy_rule(policy_names), PODS_RULE]
    sa = f"{FULLNAME}-operator"
    subject = [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    args = container(docs, "Deployment", sa, "operator")["args"]
    roles, cluster_roles = find(docs, "Role"), find(docs, "ClusterRole")
    if values["operator"]["allNamespaces"]:
        assert not roles and not find(docs, "RoleBinding")
        (cr,) = cluster_roles
        assert cr["rules"] == expected
        (crb,) = find(docs, "ClusterRoleBinding")
        assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cr["metadata"]["name"]}
        assert crb["subjects"] == subject
        assert "--all-namespaces" in args and not any(a.startswith("--namespace") for a in args)
    else:
        assert not cluster_roles and not find(docs, "ClusterRoleBinding")
        watched = values["operator"]["watchNamespaces"] or [NAMESPACE]
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(watched)
        for r in roles:
            assert r["rules"] == expected
        bindings = find(docs, "RoleBinding")
        assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(watched)
        for b in bindings:
            assert b["roleRef"]["kind"] == "Role" and b["subjects"] == subject
        assert [a for a in args if a.startswith("--namespace")] == [f"--namespace={ns}" for ns in watched]
    for rule in expected:  # nothing broad anywhere
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]


def test_operator_can_write_the_configmap_the_router_mounts(docs):
    """The policy ConfigMap the router mounts is one the operator may get and patch, under the key it writes."""
    from recserve.operator.act import POLICY_KEY

    name = _router_policy_configmap(docs)
    rules = (find(docs, "Role") or find(docs, "ClusterRole"))[0]["rules"]
    assert any(name in r.get("resourceNames", []) and {"get", "patch"} <= set(r["verbs"]) for r in rules)
    cfg = _router_config(docs)
    assert Path(cfg["policy_file"]).name == POLICY_KEY
    # the chart does not own it (an upgrade would reset a rollout's weights); the router starts without it
    assert not find(docs, "ConfigMap", name)


def _router_pods(docs) -> list[tuple[str, dict, dict]]:
    return [p for p in pod_templates(docs) if "router" in p[0]]


def _router_policy_configmap(docs) -> str:
    names = set()
    for _, _, spec in _router_pods(docs):
        (vol,) = [v for v in spec["volumes"] if v["name"] == "policy"]
        assert vol["configMap"]["optional"] is True
        names.add(vol["configMap"]["name"])
        for c in spec["containers"]:
            (m,) = [m for m in c["volumeMounts"] if m["name"] == "policy"]
            assert "subPath" not in m  # subPath mounts never see ConfigMap updates
    (name,) = names
    return name


def _router_config(docs) -> dict:
    cm = one(docs, "ConfigMap", f"{FULLNAME}-router")
    return yaml.safe_load(cm["data"]["router.yaml"])


# ------------------------------------------------------------------------------------------- router


def test_proxy_ingress_takes_several_replicas_per_pod(helm, tmp_path):
    from recserve.serving.config import RouterConfig

    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump({"router": {"config": {"num_replicas": 3, "ingress": "proxy"}}}))
    docs = list(yaml.safe_load_all(template(helm, "-f", str(f)).stdout))
    cfg = RouterConfig.model_validate(_router_config([d for d in docs if d]))
    assert (cfg.ingress, cfg.num_replicas) == ("proxy", 3)


def test_router_serves_text_searches_set_in_values(helm, tmp_path):
    """``router.config.searches`` reaches the router's config as recserve reads it, next to the rankers or alone;
    a search entry the router would refuse is refused by the chart's schema first."""
    from recserve.serving.config import RouterConfig

    search = {"edge_encoder": "/models/query_encoder/1", "edge_index": "/models/product_index/1",
              "edge_ranker": "/models/search_ranker/1", "top_k": 20}
    for models, default in (({}, "ranker"), ({"ranker": None}, "search")):
        f = tmp_path / "v.yaml"
        f.write_text(yaml.safe_dump({"router": {"config": {"models": models, "searches": {"search": search},
                                                           "default_model": default}}}))
        docs = [d for d in yaml.safe_load_all(template(helm, "-f", str(f)).stdout) if d]
        cfg = RouterConfig.model_validate(_router_config(docs))
        assert cfg.searches["search"].triton_model == "search" and cfg.searches["search"].top_k == 20
        assert str(cfg.searches["search"].edge_index) == "/models/product_index/1"
        assert str(cfg.searches["search"].edge_ranker) == "/models/search_ranker/1"
        assert ("ranker" in cfg.models) == (models == {})
    f.write_text(yaml.safe_dump({"router": {"config": {"searches": {"search": {"edge_encoder": "/m/e"}}}}}))
    refused = template(helm, "-f", str(f), check=False)
    assert refused.returncode != 0 and "edge_index" in refused.stderr
    f.write_text(yaml.safe_dump({"router": {"config": {"models": {"ranker": None}}}}))  # serves nothing
    assert template(helm, "-f", str(f), check=False).returncode != 0


def test_router_config_is_valid_for_recserve(docs):
    from recserve.serving.config import RouterConfig

    raw = _router_config(docs)
    cfg = RouterConfig.model_validate(raw)
    triton = one(docs, "Service", f"{FULLNAME}-triton")
    grpc = {p["name"]: p["port"] for p in triton["spec"]["ports"]}["grpc"]
    assert cfg.triton_url == f"{triton['metadata']['name']}:{grpc}"
    for what, _, spec in _router_pods(docs):
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert str(cfg.policy_file).startswith(mounts["/etc/recserve/policy"]["mountPath"] + "/"), what
            assert mounts["/etc/recserve/router.yaml"]["subPath"] == "router.yaml"
            for ranker in cfg.models[cfg.default_model].rankers:  # edge models are on the mounted volume
                assert str(ranker.edge_model).startswith(mounts["/models"]["mountPath"] + "/")


def test_router_deployment_or_rayservice(docs, scenario):
    from recserve.serving.config import RouterConfig

    values = values_of(scenario)
    name = f"{FULLNAME}-router"
    if values["router"]["rayService"]["enabled"]:
        assert not find(docs, "Deployment", name) and not find(docs, "HorizontalPodAutoscaler")
        rs = one(docs, "RayService", name)
        assert rs["apiVersion"] == "ray.io/v1"
        serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
        assert serve["http_options"] == {"host": "0.0.0.0", "port": values["router"]["ports"]["http"]}
        assert serve["grpc_options"]["port"] == values["router"]["ports"]["grpc"]
        (app,) = serve["applications"]
        assert app["import_path"] == "recserve.serving.app:app"
        assert rs["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
        cluster = rs["spec"]["rayClusterConfig"]
        for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:  # replicas at niceness 0, not Ray's 15
            (ray,) = pod["template"]["spec"]["containers"]
            assert {"name": "RAY_worker_niceness", "value": "0"} in ray["env"]
        assert _router_config(docs)["ingress"] == "proxy"  # KubeRay runs Serve's proxies
        scaling = values["router"]["rayService"]["serveAutoscaling"]
        if scaling["enabled"]:  # Serve scales the router replicas on ongoing requests
            cfg = RouterConfig.model_validate(_router_config(docs))
            assert (cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas) == (scaling["minReplicas"],
                                                                                     scaling["maxReplicas"])
        return
    assert _router_config(docs)["ingress"] == values["router"]["config"]["ingress"]
    deploy = one(docs, "Deployment", name)
    c = container(docs, "Deployment", name, "router")
    assert c["command"] + c["args"] == ["recserve", "route", "--config=/etc/recserve/router.yaml",
                                        f"--drain-s={values['router']['drainSeconds']}"]
    assert values["router"]["drainSeconds"] < deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert c["startupProbe"]["tcpSocket"]["port"] == "grpc" and c["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    assert "/healthz" in " ".join(c["readinessProbe"]["exec"]["command"])
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])  # config changes roll the pods
    if values["router"]["autoscaling"]["enabled"]:
        hpa = one(docs, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpa["spec"]["minReplicas"] == values["router"]["autoscaling"]["minReplicas"]
        target = values["router"]["autoscaling"].get("inflightRequestsTarget")
        pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        if target:  # a custom metric from the router's /metrics, through a metrics adapter
            assert pods == [{"metric": {"name": "recserve_router_inflight_requests"},
                             "target": {"type": "AverageValue", "averageValue": str(target)}}]
        else:
            assert not pods
        assert "replicas" not in deploy["spec"]  # the HPA owns it
    else:
        assert not find(docs, "HorizontalPodAutoscaler")
        assert deploy["spec"]["replicas"] == values["router"]["replicas"]


def test_rayservice_imports_a_valid_serve_builder(helm):
    """The builder the RayService imports is recserve's, takes exactly one argument (Ray Serve's rule),
    and the gRPC servicer function it names exists in recserve."""
    import importlib

    docs = render(helm, "rayservice")
    rs = one(docs, "RayService", f"{FULLNAME}-router")
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    module, func = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), func)
    assert len(inspect.signature(builder).parameters) == 1
    assert app["args"]["config"] == "/etc/recserve/router.yaml"
    (servicer,) = serve["grpc_options"]["grpc_servicer_functions"]
    mod, _, attr = servicer.rpartition(".")
    assert callable(getattr(importlib.import_module(mod), attr))


# ------------------------------------------------------------------------------------------ services


def _pod_labels_for(docs, selector: dict) -> list[str]:
    return [what for what, meta, _ in pod_templates(docs)
            if all(meta.get("labels", {}).get(k) == v for k, v in selector.items() if not k.startswith("ray.io/"))]


def test_services_expose_the_right_ports(docs, scenario):
    values = values_of(scenario)
    triton = one(docs, "Service", f"{FULLNAME}-triton")
    assert {p["name"]: p["port"] for p in triton["spec"]["ports"]} == {"grpc": 8001, "http": 8000, "metrics": 8002}
    router = one(docs, "Service", f"{FULLNAME}-router")
    assert {p["name"]: p["port"] for p in router["spec"]["ports"]} == {"grpc": 9000, "http": 8010}
    for svc in (triton, router):
        pods = _pod_labels_for(docs, svc["spec"]["selector"])
        assert pods, f"Service {svc['metadata']['name']} selects no pods"
        for what, _, spec in pod_templates(docs):
            if what not in pods:
                continue
            named = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
            for p in svc["spec"]["ports"]:
                assert named.get(p["targetPort"]) == p["port"], (what, p)
    triton_c = container(docs, "Deployment", f"{FULLNAME}-triton", "triton")
    assert {p["name"]: p["containerPort"] for p in triton_c["ports"]} == values["triton"]["ports"]


def test_selector_labels_are_stable_across_chart_versions(helm, tmp_path):
    """Selectors are immutable on Deployments: they must not carry the chart or app version."""
    chart = tmp_path / "recserve"
    shutil.copytree(CHART, chart)
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta.update(version="9.9.9", appVersion="9.9.9")
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta))
    bumped = [d for d in yaml.safe_load_all(template(helm, chart=chart).stdout) if d]

    def selectors(docs):
        out = {}
        for d in docs:
            key = f"{d['kind']}/{d['metadata']['name']}"
            spec = d.get("spec", {})
            if d["kind"] in ("Deployment", "PodDisruptionBudget", "Job"):
                out[key] = spec.get("selector", {}).get("matchLabels") or spec["template"]["metadata"]["labels"]
            elif d["kind"] == "Service":
                out[key] = spec["selector"]
            elif d["kind"] == "NetworkPolicy":
                out[key] = spec["podSelector"]
        return out

    before, after = selectors(render(helm, "default")), selectors(bumped)
    assert before == after and len(before) >= 8
    for labels in before.values():
        text = json.dumps(labels)
        assert "helm.sh/chart" not in text and "app.kubernetes.io/version" not in text and "0.1.0" not in text
    for d in render(helm, "default"):
        if d["kind"] == "Deployment":
            assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()


# ---------------------------------------------------------------------------------- network policies


def test_network_policies_say_who_reaches_triton_and_the_router(docs, scenario):
    values = values_of(scenario)
    tnp = one(docs, "NetworkPolicy", f"{FULLNAME}-triton")
    assert tnp["spec"]["policyTypes"] == ["Ingress"]
    components = []
    for rule in tnp["spec"]["ingress"]:
        assert rule.get("from"), "a Triton ingress rule without `from` would open it to everyone"
        for peer in rule["from"]:
            labels = peer.get("podSelector", {}).get("matchLabels", {})
            components.append(labels.get("app.kubernetes.io/component"))
    assert "router" in components and "operator" in components
    allowed_ports = {p["port"] for r in tnp["spec"]["ingress"] for p in r["ports"]}
    assert allowed_ports <= {"grpc", "http", "metrics"}
    metrics_from = values["networkPolicy"]["metricsFrom"]
    metrics_open = any({"port": "metrics", "protocol": "TCP"} in r["ports"] and r["from"] == metrics_from
                       for r in tnp["spec"]["ingress"])
    assert metrics_open == values["serviceMonitor"]["enabled"]

    rnp = one(docs, "NetworkPolicy", f"{FULLNAME}-router")
    client_rule = rnp["spec"]["ingress"][0]
    assert {p["port"] for p in client_rule["ports"]} == {9000, 8010}
    if values["networkPolicy"]["router"]["from"]:
        assert client_rule["from"] == values["networkPolicy"]["router"]["from"]
    else:
        assert "from" not in client_rule


def test_servicemonitors_only_when_asked(docs, scenario):
    values = values_of(scenario)
    monitors = find(docs, "ServiceMonitor")
    if not values["serviceMonitor"]["enabled"]:
        assert not monitors
        return
    by_name = {m["metadata"]["name"]: m for m in monitors}
    assert by_name[f"{FULLNAME}-triton"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert by_name[f"{FULLNAME}-router"]["spec"]["endpoints"][0] == {
        "port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    for m in monitors:
        assert m["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_pdbs_never_block_a_single_replica_drain(docs):
    for pdb in find(docs, "PodDisruptionBudget"):
        spec = pdb["spec"]
        assert ("maxUnavailable" in spec) != ("minAvailable" in spec)


# ------------------------------------------------------------------------------------------ secrets

SECRETISH = re.compile(r"pass(word|wd)?|token|secret|api[_-]?key|access[_-]?key|private[_-]?key|credential", re.I)
SECRET_REFERENCES = {"existingSecret", "credentialsFileKey", "imagePullSecrets"}  # names of Secrets, not secrets
SECRET_VALUES = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|eyJ[A-Za-z0-9_-]{10,}\.eyJ|"
                           r"gh[pousr]_[A-Za-z0-9]{20,}|xox[baprs]-[A-Za-z0-9-]{10,}")


def _walk(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, str(i)))
    else:
        yield path, node


def test_no_secret_values_anywhere(docs, scenario):
    assert not find(docs, "Secret"), "the chart must not create Secrets from values"
    for path, value in _walk(values_of(scenario)):
        key = next((p for p in reversed(path) if not p.isdigit()), "")
        if SECRETISH.search(key) and key not in SECRET_REFERENCES:
            assert value in (None, "", False), f"{'.'.join(path)} looks like a secret in values"
        assert not (isinstance(value, str) and SECRET_VALUES.search(value)), f"{'.'.join(path)} holds a credential"
    text = json.dumps(docs)
    assert not SECRET_VALUES.search(text)
    for what, _, spec in pod_templates(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]) and env["name"] != "GOOGLE_APPLICATION_CREDENTIALS":
                    assert "value" not in env, f"{what}: env {env['name']} holds a literal"


# ------------------------------------------------------------------------------------ documentation


def _comment_above(lines: list[str], line: int) -> bool:
    i = line - 1
    block = []
    while i >= 0 and lines[i].strip().startswith("#"):
        block.append(lines[i].strip())
        i -= 1
    return any(b.startswith("# --") for b in block)


def test_every_value_is_commented():
    """Each key has a `# --` comment, or all the keys under it do."""
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    root = yaml.compose(text)
    missing = []

    def documented(key_node, value_node, path) -> bool:
        if _comment_above(lines, key_node.start_mark.line):
            return True
        if isinstance(value_node, yaml.MappingNode) and value_node.value:
            results = [documented(k, v, f"{path}.{k.value}") for k, v in value_node.value]
            return all(results)
        missing.append(path)
        return False

    for k, v in root.value:
        documented(k, v, k.value)
    assert not missing, f"values without a comment: {missing}"


def test_notes_render_with_a_usable_modelrollout(helm):
    proc = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"{FULLNAME}-router.{NAMESPACE}:9000" in notes
    lines = notes.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "apiVersion: recserve.io/v1alpha1")
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    spec = yaml.safe_load(textwrap.dedent("\n".join(lines[start:end])))["spec"]
    from recserve.operator.spec import ModelRolloutSpec

    rollout = ModelRolloutSpec.model_validate(spec)
    assert rollout.router.config_map == f"{FULLNAME}-routing-policy"
    assert rollout.triton.service == f"{FULLNAME}-triton"


# ------------------------------------------------------------------------------------ image + tools


def test_dockerfile_targets_match_the_chart():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M)
    names = [s for _, s in stages]
    assert names[-1] == "runtime" and "triton" in names  # the last stage is the default target
    assert dict((s, b) for b, s in stages)["triton"] == "nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3"
    assert dict((s, b) for b, s in stages)["runtime"] == "python:${PYTHON_VERSION}-slim"
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", text, re.M)
    assert '.[compress,serve,operator,train]' in text and "https://download.pytorch.org/whl/cpu" in text
    runtime = text.split("AS runtime", 1)[1]
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    uid = int(users[-1].split(":")[0])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["router"]["securityContext"]["runAsUser"] == uid == values["operator"]["securityContext"]["runAsUser"]
    triton_users = re.findall(r"^USER\s+(\S+)", text.split("AS triton", 1)[1].split("AS runtime", 1)[0], re.M)
    assert int(triton_users[-1].split(":")[0]) == values["triton"]["securityContext"]["runAsUser"]


def test_fetch_helm_script_is_sound():
    script = ROOT / "scripts" / "fetch_helm.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "--require-hashes" in text and re.search(r'SHA256="[0-9a-f]{64}"', text)
    assert ".tools/bin" in text


def test_the_model_pvc_is_read_write_once_by_default(helm):
    (pvc,) = find(render(helm, "default"), "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"], "what every default storage class offers"
    many = template(helm, "--set", "modelRepository.pvc.accessModes={ReadWriteMany}")
    assert "ReadWriteMany" in many.stdout


def test_model_sync_fills_the_pvc_before_triton_starts(helm):
    docs = render(helm, "model-sync")
    triton = one(docs, "Deployment", f"{FULLNAME}-triton")["spec"]["template"]["spec"]
    (sync,) = triton["initContainers"]
    assert sync["name"] == "model-sync" and sync["image"] == "amazon/aws-cli:2.22.35"
    assert sync["command"][:3] == ["aws", "s3", "sync"] and sync["command"][-2] == "/models"
    assert sync["envFrom"] == [{"secretRef": {"name": "recserve-s3-credentials"}}]
    mounts = {m["name"]: m for m in sync["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and not mounts["models"].get("readOnly")
    # Triton itself still reads the repository read-only; the claim is writable for the init container
    (server,) = triton["containers"]
    assert {m["name"]: m.get("readOnly") for m in server["volumeMounts"]}["models"] is True
    claim = next(v for v in triton["volumes"] if v["name"] == "models")["persistentVolumeClaim"]
    assert not claim.get("readOnly")
    # restricted like the rest: non-root, no escalation, read-only root filesystem, no capabilities
    sc = sync["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_model_sync_refuses_what_cannot_work(helm):
    bad = template(helm, "--set", "modelRepository.sync.enabled=true", check=False)
    assert bad.returncode != 0 and "needs image and command" in bad.stderr
    s3 = template(helm, "--set", "modelRepository.type=objectStorage", "--set",
                  "modelRepository.objectStorage.url=s3://b/m", "--set", "modelRepository.sync.enabled=true",
                  "--set", "modelRepository.sync.image=x", "--set", "modelRepository.sync.command={sync}", check=False)
    assert s3.returncode != 0 and "needs modelRepository.type=pvc" in s3.stderr


def test_a_pod_asking_for_a_gpu_runs_a_gpu_config(helm, tmp_path):
    """The Triton pod holds nvidia.com/gpu; the models it loads are built by the chart's Job with the chart's
    profile for TensorRT: their config has KIND_GPU instance groups (not a CPU config on a GPU node)."""
    from onnx import TensorProto, helper
    from tritonclient.grpc import model_config_pb2 as mc

    from recserve.converters.build import load_profile
    from recserve.converters.triton_config import model_config

    docs = render(helm, "monitoring")  # a scenario with the engine-compile Job
    triton = one(docs, "Deployment", f"{FULLNAME}-triton")["spec"]["template"]["spec"]["containers"][0]
    assert int(triton["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    (job,) = find(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    builds = pod.get("initContainers", []) + pod["containers"]
    assert builds and all("--target=tensorrt" in c["args"] for c in builds)
    assert all(int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for c in builds)
    (cm,) = [d for d in find(docs, "ConfigMap") if "profile.yaml" in d.get("data", {})]
    (tmp_path / "profile.yaml").write_text(cm["data"]["profile.yaml"])
    profile = load_profile(tmp_path / "profile.yaml", {})
    graph = helper.make_graph([helper.make_node("Identity", ["dense"], ["score"])], "g",
                              [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["B", 3])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B", 3])])
    cfg = model_config("ranker", helper.make_model(graph), "tensorrt", profile)
    assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


def test_a_cpu_profile_for_gpu_pods_is_refused(helm):
    bad = template(helm, "--set", "engineBuild.enabled=true", "--set", "engineBuild.profile.instance_kind=cpu",
                   check=False)
    assert bad.returncode != 0 and "would run the models on CPU" in bad.stderr


def test_the_operator_mounts_the_model_repository_read_only_only_when_asked(helm):
    docs = render(helm, "default")
    assert "volumeMounts" not in container(docs, "Deployment", "rs-recserve-operator", "operator") or all(
        m["name"] != "models" for m in container(docs, "Deployment", "rs-recserve-operator", "operator")["volumeMounts"])
    out = template(helm, "--set", "operator.mountModelRepository=true")
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    c = container(docs, "Deployment", "rs-recserve-operator", "operator")
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    pod = one(docs, "Deployment", "rs-recserve-operator")["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert vol["persistentVolumeClaim"]["readOnly"] is True
    s3 = template(helm, "--set", "operator.mountModelRepository=true", "-f", str(CI / "gpu-s3-values.yaml"))
    assert "name: models" not in [d for d in s3.stdout.split("---") if "name: rs-recserve-operator\n" in d
                                  and "kind: Deployment" in d][0], "object storage: nothing to mount"


def test_the_training_raycluster_is_off_by_default_and_hardened_when_on(helm):
    """Issue 20: a KubeRay RayCluster for `recserve train --workers N --address ray://...-training-head-svc:10001`."""
    assert not find(render(helm, "default"), "RayCluster")
    docs = render(helm, "rayservice")
    rc = one(docs, "RayCluster", f"{FULLNAME}-training")
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training work on the head
    assert {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]} >= {6379, 10001}
    for what, _, spec in pod_templates([rc]):
        assert spec["automountServiceAccountToken"] is False and spec["serviceAccountName"] == f"{FULLNAME}-training"
        c = spec["containers"][0]
        assert c["securityContext"]["readOnlyRootFilesystem"] and {m["mountPath"] for m in c["volumeMounts"]} >= {
            "/tmp", "/dev/shm", "/data"}, what
    sa = one(docs, "ServiceAccount", f"{FULLNAME}-training")
    assert sa["automountServiceAccountToken"] is False
    assert not [b for b in find(docs, "RoleBinding") + find(docs, "ClusterRoleBinding")
                if any(s.get("name") == f"{FULLNAME}-training" for s in b.get("subjects", []))]
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-training")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "training"
