"""The ModelRollout spec (pydantic, camelCase) and the CRD generated from it.

The CRD's OpenAPI schema must be a Kubernetes structural schema, identical to the checked-in Helm copy, and
must accept what the operator accepts and reject what it rejects where a schema can say it (checked with
``jsonschema``: OpenAPI v3.0 is JSON Schema draft 4 plus ``nullable``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from recserve.operator.crd import crd, crd_yaml, spec_schema
from recserve.operator.spec import GROUP, KIND, PLURAL, VERSION, ModelRolloutSpec

ROOT = Path(__file__).resolve().parents[2]
HELM_CRD = ROOT / "helm" / "recserve" / "crds" / "modelrollouts.recserve.io.yaml"

GOOD: dict[str, Any] = {
    "model": "ranker", "stableVersion": "1", "candidateVersion": "2",
    "steps": [{"weight": 10, "pauseSeconds": 60}, {"weight": 10}, {"weight": 50, "pauseSeconds": 0}],
    "analysis": {"intervalSeconds": 30, "failureLimit": 2, "minRequests": 20,
                 "thresholds": {"maxErrorRate": 0.01, "maxP99LatencyMs": 25.5, "minShadowAgreement": 0.8}},
    "triton": {"grpcUrl": "triton.recserve:8001", "metricsUrl": "http://triton.recserve:8002/metrics"},
    "router": {"configMap": "recserve-routing", "metricsUrl": "http://router:9000/metrics", "shadowPercent": 5},
    "compressionReport": {"gate": {"passed": True, "reasons": []}, "stages": [{"name": "fp16"}]},
    "paused": False, "abort": False,
}
MINIMAL: dict[str, Any] = {
    "model": "m", "stableVersion": "3", "candidateVersion": "4", "steps": [{"weight": 100}],
    "triton": {"grpcUrl": "t:8001", "metricsUrl": "http://t:8002/metrics"}, "router": {"policyFile": "/p.json"},
}


def edit(base: dict, path: str, value: Any = ...) -> dict:
    """A copy of ``base`` with ``a.b.0.c`` set to ``value`` (or deleted with ``...``)."""
    out = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


# --- the pydantic spec -----------------------------------------------------------------------------------------------


def test_a_good_spec_parses_with_camel_case_aliases() -> None:
    s = ModelRolloutSpec.model_validate(GOOD)
    assert (s.stable_version, s.candidate_version) == ("1", "2")
    assert [(st.weight, st.pause_seconds) for st in s.steps] == [(10, 60.0), (10, 60.0), (50, 0.0)]
    assert s.analysis.thresholds.max_p99_latency_ms == 25.5
    assert s.router.config_map == "recserve-routing" and s.router.policy_file is None
    dumped = s.model_dump(by_alias=True, exclude_none=True)
    assert ModelRolloutSpec.model_validate(dumped) == s
    assert "stableVersion" in dumped and "stable_version" not in dumped


def test_defaults_of_a_minimal_spec() -> None:
    s = ModelRolloutSpec.model_validate(MINIMAL)
    assert s.steps[0].pause_seconds == 60.0
    assert (s.analysis.interval_seconds, s.analysis.failure_limit, s.analysis.min_requests) == (30.0, 2, 20)
    assert s.analysis.thresholds.max_error_rate == 0.01
    assert s.analysis.thresholds.max_p99_latency_ms is None and s.analysis.thresholds.min_shadow_agreement is None
    assert (s.paused, s.abort, s.compression_report, s.router.shadow_percent) == (False, False, None, 0.0)


def test_snake_case_names_are_accepted_too() -> None:
    raw = {"model": "m", "stable_version": "1", "candidate_version": "2", "steps": [{"weight": 5, "pause_seconds": 1}],
           "triton": {"grpc_url": "t:1", "metrics_url": "http://t"}, "router": {"policy_file": "/p"}}
    assert ModelRolloutSpec.model_validate(raw).steps[0].pause_seconds == 1


INVALID = [
    ("equal versions", edit(GOOD, "candidateVersion", "1"), "candidateVersion must differ from stableVersion"),
    ("decreasing step weights", edit(GOOD, "steps", [{"weight": 50}, {"weight": 10}]), "must not decrease"),
    ("weight 0", edit(GOOD, "steps.0.weight", 0), "greater than or equal to 1"),
    ("weight over 100", edit(GOOD, "steps.2.weight", 101), "less than or equal to 100"),
    ("negative weight", edit(GOOD, "steps.0.weight", -5), "greater than or equal to 1"),
    ("no steps", edit(GOOD, "steps", []), "at least 1 item"),
    ("router without a target", edit(edit(GOOD, "router.configMap"), "router.shadowPercent", 1),
     "router needs configMap or policyFile"),
    ("router with null targets", edit(edit(GOOD, "router.configMap", None), "router.policyFile", None),
     "router needs configMap or policyFile"),
    ("non-numeric stable version", edit(GOOD, "stableVersion", "v1"), "should match pattern"),
    ("non-numeric candidate version", edit(GOOD, "candidateVersion", "2-rc"), "should match pattern"),
    ("empty version", edit(GOOD, "candidateVersion", ""), "should match pattern"),
    ("leading zero", edit(GOOD, "candidateVersion", "02"), "should match pattern"),
    ("integer version", edit(GOOD, "stableVersion", 1), "valid string"),
    ("empty model", edit(GOOD, "model", ""), "at least 1 character"),
    ("zero analysis interval", edit(GOOD, "analysis.intervalSeconds", 0), "greater than 0"),
    ("failure limit 0", edit(GOOD, "analysis.failureLimit", 0), "greater than or equal to 1"),
    ("error rate over 1", edit(GOOD, "analysis.thresholds.maxErrorRate", 1.5), "less than or equal to 1"),
    ("p99 threshold 0", edit(GOOD, "analysis.thresholds.maxP99LatencyMs", 0), "greater than 0"),
    ("negative pause", edit(GOOD, "steps.0.pauseSeconds", -1), "greater than or equal to 0"),
    ("shadow percent over 100", edit(GOOD, "router.shadowPercent", 150), "less than or equal to 100"),
    ("missing triton", edit(GOOD, "triton"), "Field required"),
    ("missing metrics url", edit(GOOD, "triton.metricsUrl"), "triton needs service"),
    ("a bad service name", edit(GOOD, "triton.service", "Triton_Pods"), "should match pattern"),
    ("unknown field", edit(GOOD, "stepz", []), "Extra inputs are not permitted"),
    ("unknown nested field", edit(GOOD, "analysis.interval", 5), "Extra inputs are not permitted"),
]


@pytest.mark.parametrize("raw,why", [(r, w) for _, r, w in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_specs_raise_validation_error(raw, why) -> None:
    with pytest.raises(ValidationError, match=why):
        ModelRolloutSpec.model_validate(raw)


def test_equal_step_weights_are_allowed() -> None:
    assert len(ModelRolloutSpec.model_validate(edit(GOOD, "steps", [{"weight": 20}, {"weight": 20}])).steps) == 2


def test_the_operator_turns_a_validation_error_into_one_readable_permanent_error() -> None:
    import kopf

    from recserve.operator.handlers import parse_spec

    with pytest.raises(kopf.PermanentError) as e:
        parse_spec(edit(edit(GOOD, "stableVersion", "v1"), "steps.0.weight", 0))
    msg = str(e.value)
    assert "spec.stableVersion: String should match pattern '^[1-9][0-9]{0,17}$'" in msg
    assert "spec.steps.0.weight: Input should be greater than or equal to 1" in msg
    with pytest.raises(kopf.PermanentError, match="candidateVersion must differ from stableVersion"):
        parse_spec(edit(GOOD, "candidateVersion", "1"))
    assert parse_spec(GOOD) == ModelRolloutSpec.model_validate(GOOD)


# --- the CRD ---------------------------------------------------------------------------------------------------------


def test_the_generated_crd_equals_the_checked_in_helm_copy() -> None:
    assert HELM_CRD.exists()
    assert yaml.safe_load(HELM_CRD.read_text()) == crd(), \
        "helm/recserve/crds is stale: regenerate it with `recserve operator crd > " + str(HELM_CRD.relative_to(ROOT)) + "`"
    assert yaml.safe_load(crd_yaml()) == crd()
    assert crd_yaml() == HELM_CRD.read_text()  # byte for byte, header included


def test_recserve_operator_crd_prints_the_crd() -> None:
    proc = subprocess.run([sys.executable, "-c", "from recserve.cli import main; main()", "operator", "crd"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == crd_yaml()


def test_the_crd_names_scope_status_subresource_and_printer_columns() -> None:
    c = crd()
    assert c["apiVersion"] == "apiextensions.k8s.io/v1" and c["kind"] == "CustomResourceDefinition"
    assert c["metadata"]["name"] == f"{PLURAL}.{GROUP}" == "modelrollouts.recserve.io"
    spec = c["spec"]
    assert spec["group"] == GROUP and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": KIND, "listKind": "ModelRolloutList", "plural": PLURAL,
                             "singular": "modelrollout", "shortNames": ["mro"]}
    (v,) = spec["versions"]
    assert (v["name"], v["served"], v["storage"]) == (VERSION, True, True)
    assert v["subresources"] == {"status": {}}
    columns = {col["name"]: (col["type"], col["jsonPath"]) for col in v["additionalPrinterColumns"]}
    assert columns == {
        "Model": ("string", ".spec.model"), "Stable": ("string", ".spec.stableVersion"),
        "Candidate": ("string", ".spec.candidateVersion"), "Phase": ("string", ".status.phase"),
        "Weight": ("integer", ".status.weight"), "Step": ("integer", ".status.step"),
        "Age": ("date", ".metadata.creationTimestamp"),
    }
    root = v["schema"]["openAPIV3Schema"]
    assert root["type"] == "object" and root["required"] == ["spec"]
    assert root["properties"]["spec"] == spec_schema()
    status = root["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True  # the operator's status (and kopf's) is kept


def walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def schema_nodes(schema: dict, path: str = "spec"):
    """Every schema node (not every dict: ``properties`` maps names to nodes)."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from schema_nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_nodes(schema["additionalProperties"], f"{path}{{}}")
    for sub in schema.get("anyOf", []) + schema.get("allOf", []) + schema.get("oneOf", []):
        yield from schema_nodes(sub, f"{path}|")


def test_the_spec_schema_is_structural() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert "$ref" not in node and "$defs" not in node and "definitions" not in node, path
        assert "title" not in node and "default" not in node, path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node:
                assert isinstance(node[key], bool), f"{path}.{key}: OpenAPI v3.0 wants a boolean"
                assert ("minimum" if key == "exclusiveMinimum" else "maximum") in node, path
        if "anyOf" in node:
            assert all(o.get("type") != "null" for o in node["anyOf"]), f"{path}: null belongs in nullable"
        if node.get("additionalProperties") is False:
            raise AssertionError(f"{path}: additionalProperties: false is not allowed in a CRD")
    for path, node in schema_nodes(schema["properties"]["spec"]):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        if node.get("type") == "object":
            assert "properties" in node or "additionalProperties" in node \
                or node.get("x-kubernetes-preserve-unknown-fields"), path
            assert not ("properties" in node and isinstance(node.get("additionalProperties"), dict)), path
    interval = schema["properties"]["spec"]["properties"]["analysis"]["properties"]["intervalSeconds"]
    assert (interval["minimum"], interval["exclusiveMinimum"]) == (0, True)
    p99 = schema["properties"]["spec"]["properties"]["analysis"]["properties"]["thresholds"]["properties"][
        "maxP99LatencyMs"]
    assert p99["nullable"] is True and p99["type"] == "number"
    assert set(schema["properties"]["spec"]["required"]) == \
        {"model", "stableVersion", "candidateVersion", "steps", "triton", "router"}


def as_draft4(node: Any) -> Any:
    """OpenAPI v3.0 -> JSON Schema draft 4: ``nullable: true`` becomes a ``null`` alternative."""
    if isinstance(node, list):
        return [as_draft4(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_draft4(v) if k not in ("properties",) else {n: as_draft4(p) for n, p in v.items()}
           for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft4Validator:
    schema = as_draft4(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def resource(spec: dict) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "r", "namespace": "ns"},
            "spec": spec}


@pytest.mark.parametrize("spec", [GOOD, MINIMAL, edit(GOOD, "analysis.thresholds.maxP99LatencyMs", None),
                                  edit(GOOD, "compressionReport", None), edit(GOOD, "router.policyFile", "/p.json")],
                         ids=["full", "minimal", "null-p99", "null-report", "both-targets"])
def test_the_schema_accepts_good_rollouts(validator, spec) -> None:
    ModelRolloutSpec.model_validate(spec)
    errors = [e.message for e in validator.iter_errors(resource(spec))]
    assert errors == []
    with_status = resource(spec) | {"status": {"phase": "Progressing", "step": 1, "weight": 50,
                                               "lastAnalysis": {"verdict": "passed"}, "kopf": {"progress": {}}}}
    assert list(validator.iter_errors(with_status)) == []


SCHEMA_REJECTS = [i for i in INVALID if i[0] not in (
    # what a schema cannot express (or the generator leaves to the operator): only pydantic refuses these
    "equal versions", "decreasing step weights", "router without a target", "router with null targets",
    "missing metrics url",  # a CEL rule: the real API server refuses it (tests/e2e/test_apiserver.py)
    "unknown field", "unknown nested field",  # Kubernetes prunes unknown fields of a structural schema
)] + [
    ("fractional weight", edit(GOOD, "steps.0.weight", 12.5), ""),
    ("steps not a list", edit(GOOD, "steps", {"weight": 10}), ""),
    ("missing spec", None, ""),
]


@pytest.mark.parametrize("spec", [s for _, s, _ in SCHEMA_REJECTS], ids=[i for i, _, _ in SCHEMA_REJECTS])
def test_the_schema_rejects_what_the_operator_rejects(validator, spec) -> None:
    body = resource(spec) if spec is not None else {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                                                    "metadata": {"name": "r"}}
    assert list(validator.iter_errors(body)), json.dumps(spec)[:300]
    with pytest.raises(ValidationError):
        ModelRolloutSpec.model_validate(spec)


@pytest.mark.parametrize("spec", [edit(GOOD, "steps.0.weight", "10"), edit(GOOD, "paused", "yes"),
                                  edit(GOOD, "analysis.minRequests", 2.0)], ids=["string-weight", "string-bool", "float-int"])
def test_the_schema_is_stricter_than_pydantic_lax_coercion(validator, spec) -> None:
    """pydantic coerces "10" and "yes"; the API server refuses them before the operator sees them (fine)."""
    ModelRolloutSpec.model_validate(spec)
    assert list(validator.iter_errors(resource(spec)))


@pytest.mark.parametrize("case", ["equal versions", "decreasing step weights", "router without a target"])
def test_rules_the_schema_cannot_express_are_left_to_the_operator(validator, case) -> None:
    (spec,) = [s for i, s, _ in INVALID if i == case]
    assert list(validator.iter_errors(resource(spec))) == []
    with pytest.raises(ValidationError):
        ModelRolloutSpec.model_validate(spec)


def test_every_spec_field_is_in_the_schema_under_its_camel_case_name() -> None:
    props = spec_schema()["properties"]
    assert set(props) == {f.alias for f in ModelRolloutSpec.model_fields.values()}
    assert set(props["steps"]["items"]["properties"]) == {"weight", "pauseSeconds"}
    assert set(props["analysis"]["properties"]["thresholds"]["properties"]) == \
        {"maxErrorRate", "maxP99LatencyMs", "minShadowAgreement"}
    assert set(props["router"]["properties"]) == {"configMap", "policyFile", "metricsUrl", "shadowPercent",
                                                  "drainSeconds"}


def test_free_form_objects_are_kept_whole_by_the_api_server() -> None:
    """A real API server prunes what a structural schema does not declare: the compression report (any JSON
    object) must say x-kubernetes-preserve-unknown-fields, and no schema may carry a boolean additionalProperties
    (false is refused by Kubernetes, true would not stop the pruning)."""
    from recserve.operator.crd import spec_schema

    schema = spec_schema()
    report = schema["properties"]["compressionReport"]
    assert report == {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "nullable": True,
                      "description": report["description"]}

    def walk(node):
        if isinstance(node, dict):
            assert not isinstance(node.get("additionalProperties"), bool), node
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)


def test_the_crds_cel_rules_say_what_the_specs_validators_say() -> None:
    """The API server runs these (tests/e2e/test_apiserver.py checks it refuses both): the same refusals as the
    operator's own pydantic spec, in the same words."""
    import pytest
    from pydantic import ValidationError

    from recserve.operator.crd import RULES, spec_schema
    from recserve.operator.spec import ModelRolloutSpec

    assert spec_schema()["x-kubernetes-validations"] == RULES
    base = {"model": "ranker", "stableVersion": "1", "candidateVersion": "2", "steps": [{"weight": 10}],
            "triton": {"grpcUrl": "t:1", "metricsUrl": "http://t:2/metrics"}, "router": {"policyFile": "p.json"}}
    for bad, rule in (({"candidateVersion": "1"}, RULES[0]), ({"steps": [{"weight": 50}, {"weight": 10}]}, RULES[1])):
        with pytest.raises(ValidationError, match=re.escape(rule["message"])):
            ModelRolloutSpec.model_validate({**base, **bad})
