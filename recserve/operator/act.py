"""Carrying out the state machine's actions: Triton model control and the routing policy."""

from __future__ import annotations

import json
from pathlib import Path

from recserve.operator.machine import LoadVersions, SetWeights
from recserve.operator.spec import ModelRolloutSpec
from recserve.serving.policy import Assignment, ModelPolicy, RoutingPolicy, parse_policy, write_policy
from recserve.triton.client import TritonClient

POLICY_KEY = "policy.json"


def load_versions(spec: ModelRolloutSpec, action: LoadVersions) -> None:
    """(Re)load the model serving exactly ``action.versions``: a config override of the version policy."""
    with TritonClient(spec.triton.grpc_url, timeout=30.0) as client:
        if not client.model_ready(action.model):
            client.load(action.model)
        config = client.config(action.model)
        config["version_policy"] = {"specific": {"versions": sorted(int(v) for v in action.versions)}}
        client.load(action.model, config=json.dumps(config))


def merged_policy(current: RoutingPolicy, action: SetWeights) -> RoutingPolicy:
    """The policy with this model's entry replaced; other models untouched. The assignment keeps its key
    and mode and is salted with the rollout's versions: each rollout draws its own canary users, and a
    user stays on one version through every step of it."""
    models = dict(current.models)
    previous = current.models.get(action.model)
    assignment = previous.assignment if previous is not None else Assignment()
    salt = f"{action.model}:" + ",".join(sorted(v for v, _ in action.weights))
    models[action.model] = ModelPolicy(
        assignment=assignment.model_copy(update={"salt": salt}),
        versions={v: float(w) for v, w in action.weights},
        shadow_percent=action.shadow_percent if action.shadow_version else 0.0,
        shadow_version=action.shadow_version if action.shadow_percent > 0 else None)
    return current.model_copy(update={"models": models})


def set_weights_file(path: Path, action: SetWeights) -> RoutingPolicy:
    current = parse_policy(path.read_text(), str(path)) if path.exists() else RoutingPolicy()
    policy = merged_policy(current, action)
    write_policy(policy, path)
    return policy


def set_weights_configmap(api, namespace: str, name: str, action: SetWeights) -> RoutingPolicy:
    """Read-modify-write the ConfigMap the router mounts (``kubernetes.client.CoreV1Api``)."""
    from kubernetes.client.exceptions import ApiException

    try:
        cm = api.read_namespaced_config_map(name, namespace)
        current = parse_policy((cm.data or {}).get(POLICY_KEY, "{}"), f"configmap {namespace}/{name}")
        exists = True
    except ApiException as e:
        if e.status != 404:
            raise
        current, exists = RoutingPolicy(), False
    policy = merged_policy(current, action)
    body = {"metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "recserve-operator"}},
            "data": {POLICY_KEY: json.dumps(policy.model_dump(exclude_none=True), indent=2)}}
    if exists:
        api.patch_namespaced_config_map(name, namespace, body)
    else:
        api.create_namespaced_config_map(namespace, body)
    return policy
