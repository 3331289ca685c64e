"""The ModelRollout CRD, generated from the pydantic spec the operator validates with.

``recserve operator crd`` prints it; ``helm/recserve/crds/`` holds the generated copy (a test keeps
them identical). The generator turns pydantic's JSON schema into a Kubernetes structural schema:
references inlined, ``null`` alternatives turned into ``nullable``, titles dropped.
"""

from __future__ import annotations

from typing import Any

import yaml

from recserve.operator.spec import GROUP, KIND, PLURAL, VERSION, ModelRolloutSpec

DROP = {"title", "default"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _structural(defs[node["$ref"].split("/")[-1]], defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        out = _structural(options[0] if len(options) == 1 else {"anyOf": options}, defs)
        out = dict(out)
        if nullable:
            out["nullable"] = True
        if "description" in node:
            out["description"] = node["description"]
        return out
    out = {}
    for k, v in node.items():
        if k in DROP or k == "$defs":
            continue
        if k == "additionalProperties" and isinstance(v, bool):
            # false: Kubernetes forbids it (unknown fields are pruned anyway); true (any JSON object): a real API
            # server prunes what a schema does not declare unless told to keep it (below)
            continue
        if k in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(v, bool):
            # JSON Schema 2020 numbers -> OpenAPI v3.0 (Kubernetes): the bound plus a boolean flag
            out["minimum" if k == "exclusiveMinimum" else "maximum"] = v
            out[k] = True
        elif k == "properties":
            out[k] = {name: _structural(p, defs) for name, p in v.items()}
        else:
            out[k] = _structural(v, defs)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out \
            and node.get("additionalProperties") is not False:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


RULES = [
    {"rule": "self.stableVersion != self.candidateVersion || (has(self.candidateModel) && self.candidateModel != "
             "self.model)", "message": "candidateVersion must differ from stableVersion (or name another candidateModel)"},
    {"rule": "self.steps.map(s, s.weight).isSorted()", "message": "step weights must not decrease"},
    {"rule": "has(self.triton.service) || (has(self.triton.grpcUrl) && has(self.triton.metricsUrl))",
     "message": "triton needs service (every pod behind it), or grpcUrl and metricsUrl (one server)"},
]
"""CEL rules (``x-kubernetes-validations``) for what the schema alone cannot say; the same checks as the pydantic
spec's validators, so the API server refuses those rollouts too (``isSorted`` is Kubernetes' list library)."""


def spec_schema() -> dict[str, Any]:
    schema = ModelRolloutSpec.model_json_schema(by_alias=True)
    return {**_structural(schema, schema.get("$defs", {})), "x-kubernetes-validations": RULES}


STATUS_SCHEMA = {
    "type": "object",
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "phase": {"type": "string", "description": "Pending, Progressing, Paused, Promoted, RolledBack, Aborted, Rejected"},
        "step": {"type": "integer"},
        "weight": {"type": "integer", "description": "percent of traffic on the candidate"},
        "message": {"type": "string"},
        "conditions": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    },
}


def crd() -> dict[str, Any]:
    columns = [
        ("Model", ".spec.model"), ("Stable", ".spec.stableVersion"), ("Candidate", ".spec.candidateVersion"),
        ("Phase", ".status.phase"), ("Weight", ".status.weight"), ("Step", ".status.step"),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": "modelrollout",
                      "shortNames": ["mro"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": n, "type": "integer" if n in ("Weight", "Step") else "string", "jsonPath": p}
                    for n, p in columns] + [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                        "spec": spec_schema(), "status": STATUS_SCHEMA,
                    },
                }},
            }],
        },
    }


def crd_yaml() -> str:
    return "# Generated by `recserve operator crd` from recserve/operator/spec.py: do not edit.\n" + \
        yaml.safe_dump(crd(), sort_keys=False)
