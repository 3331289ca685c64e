"""Carrying out the state machine's actions: Triton model control, the routing policy, Events, and the status
recorded before them (``machine.intended``)."""

from __future__ import annotations

import datetime
import json
import logging
import threading
from pathlib import Path
from typing import Any

from recserve.operator.machine import Emit, LoadVersions, SetWeights
from recserve.operator.pods import TritonPod
from recserve.operator.spec import GROUP, PLURAL, VERSION, ModelRolloutSpec
from recserve.serving.policy import Assignment, ModelPolicy, RoutingPolicy, parse_policy, write_policy
from recserve.triton.client import TritonClient

POLICY_KEY = "policy.json"


log = logging.getLogger("recserve.operator")

TRITON_TIMEOUT_S = 30.0
"""How long one model-control call to Triton (a load with its config override) may take."""


def load_versions(spec: ModelRolloutSpec, action: LoadVersions, pods: list[TritonPod]) -> None:
    """On each Triton (``pods``; only ``action.pod`` when it names one): (re)load the model serving exactly
    ``action.versions``, a config override of its version policy; no versions: unload the model (the other model
    of a cross-model rollout). A final unload of a model a Triton does not serve (it was removed meanwhile) has
    nothing to do there. The first Triton that fails stops the action (it is carried out again, on every one:
    each load is idempotent)."""
    targets = [p for p in pods if not action.pod or p.name == action.pod]
    if action.pod and not targets:
        log.warning("Triton %s is gone: no %s to load there", action.pod, action.model)
    for pod in targets:
        _load_on(pod, action)


def _load_on(pod: TritonPod, action: LoadVersions) -> None:
    with TritonClient(pod.grpc_url, timeout=TRITON_TIMEOUT_S) as client:
        if not client.model_ready(action.model):
            if action.final or not action.versions:
                log.warning("%s is not loaded in Triton %s: nothing to unload after the rollout", action.model,
                            pod.name)
                return
            client.load(action.model)
        if not action.versions:
            client.unload(action.model)
            return
        config = client.config(action.model)
        config["version_policy"] = {"specific": {"versions": sorted(int(v) for v in action.versions)}}
        client.load(action.model, config=json.dumps(config))
        if action.pod:
            log.info("Triton %s serves %s version(s) %s again", pod.name, action.model, ", ".join(action.versions))


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


_LOCKS: dict[object, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(target: object) -> threading.Lock:
    """One lock per policy target: kopf handles different rollouts at once, and two rollouts of different models
    may share one policy; their read-modify-writes take turns, so neither update is lost."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(target, threading.Lock())


def set_weights_file(path: Path, action: SetWeights) -> RoutingPolicy:
    with _lock(("file", Path(path).resolve())):
        current = parse_policy(path.read_text(), str(path)) if path.exists() else RoutingPolicy()
        policy = merged_policy(current, action)
        if policy != current or not path.exists():  # what is there already is not written again
            write_policy(policy, path)
        return policy


CONFLICT_RETRIES = 10


def set_weights_configmap(api, namespace: str, name: str, action: SetWeights) -> RoutingPolicy:
    """Read-modify-write the ConfigMap the router mounts (``kubernetes.client.CoreV1Api``): a patch that carries
    the resourceVersion it read (a precondition), so a write another operator (or replica) made meanwhile is a 409
    Conflict and the merge is done again on the new contents, never lost; a create that lost a race is redone as
    an update."""
    from kubernetes.client.exceptions import ApiException

    with _lock(("configmap", namespace, name)):
        for _ in range(CONFLICT_RETRIES):
            try:
                cm = api.read_namespaced_config_map(name, namespace)
            except ApiException as e:
                if e.status != 404:
                    raise
                cm = None
            current = parse_policy((cm.data or {}).get(POLICY_KEY, "{}") if cm is not None else "{}",
                                   f"configmap {namespace}/{name}")
            policy = merged_policy(current, action)
            if cm is not None and policy == current:  # what is there already is not written again
                return policy
            data = {POLICY_KEY: json.dumps(policy.model_dump(exclude_none=True), indent=2)}
            labels = {"app.kubernetes.io/managed-by": "recserve-operator"}
            try:
                if cm is None:
                    api.create_namespaced_config_map(namespace, {"metadata": {"name": name, "labels": labels},
                                                                 "data": data})
                else:  # a patch (strategic merge: the client's choice for a dict) carrying resourceVersion: the
                    # API server applies it only to that version (409 otherwise)
                    api.patch_namespaced_config_map(name, namespace, {
                        "metadata": {"resourceVersion": cm.metadata.resource_version, "labels": labels}, "data": data})
                return policy
            except ApiException as e:
                if e.status != 409:  # 409: changed since we read it, or created meanwhile: merge again
                    raise
        raise ApiException(status=409, reason=f"configmap {namespace}/{name} kept changing: {CONFLICT_RETRIES} "
                                              "conflicting writes in a row")


EVENT_MESSAGE_CHARS = 1024
"""Longer Event messages are cut in the middle (as kopf does): the API server refuses long ones."""


def event_body(owner: dict[str, Any], emit: Emit, now: datetime.datetime) -> dict[str, Any]:
    """A core/v1 Event about ``owner`` (the ModelRollout), named after the decision (``Emit.key``)."""
    meta = owner["metadata"]
    message = emit.message
    if len(message) > EVENT_MESSAGE_CHARS:
        half = EVENT_MESSAGE_CHARS // 2 - 3
        message = f"{message[:half]} … {message[-half:]}"
    stamp = now.isoformat()
    return {
        "metadata": {"name": f"{meta['name'][:200]}.{emit.key}", "namespace": meta["namespace"],
                     "labels": {"app.kubernetes.io/managed-by": "recserve-operator"}},
        "involvedObject": {"apiVersion": owner.get("apiVersion", f"{GROUP}/{VERSION}"),
                           "kind": owner.get("kind", "ModelRollout"), "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid")},
        "type": emit.type, "reason": emit.reason, "message": message, "action": emit.reason,
        "reportingComponent": "recserve-operator", "reportingInstance": "recserve-operator",
        "source": {"component": "recserve-operator"},
        "firstTimestamp": stamp, "lastTimestamp": stamp, "eventTime": stamp, "count": 1,
    }


def post_event(api, owner: dict[str, Any], emit: Emit) -> bool:
    """Post the Event (``kubernetes.client.CoreV1Api``); False when one of that name exists already (the same
    decision carried out again: not posted twice). Events are auxiliary: other failures are logged, not raised."""
    from kubernetes.client.exceptions import ApiException

    body = event_body(owner, emit, datetime.datetime.now(datetime.UTC))
    try:
        api.create_namespaced_event(body["metadata"]["namespace"], body)
        return True
    except ApiException as e:
        if e.status == 409:
            return False
        log.warning("could not post the Event %s %s (%s %s): %s", emit.type, emit.reason, e.status, e.reason,
                    emit.message)
    except OSError as e:
        log.warning("could not post the Event %s %s (%s): %s", emit.type, emit.reason, e, emit.message)
    return True


def record_status(api, owner: dict[str, Any], status: dict[str, Any]) -> None:
    """Write the status now, before the actions it records (``kubernetes.client.CustomObjectsApi``): a merge
    patch of the status subresource, as kopf writes it after the handler."""
    meta = owner["metadata"]
    api.patch_namespaced_custom_object_status(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"],
                                              {"status": status}, _content_type="application/merge-patch+json")
