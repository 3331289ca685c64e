"""kopf handlers: gather observations, run the state machine, carry out its actions, record status.

A decision that changes the status is written first with its actions pending (``machine.intended``), then
carried out, then the status is written again without them. If an action fails (or the operator stops
in between), the next look finds them pending and carries out exactly those again (kopf retries with
backoff): a step is neither skipped nor entered twice, and each Event is posted once.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import kopf
from pydantic import ValidationError

from recserve.errors import RecserveError
from recserve.operator import act
from recserve.operator.machine import Emit, LoadVersions, SetWeights, Status, intended, loads, reconcile
from recserve.operator.observe import observe
from recserve.operator.pods import TritonPod, triton_pods
from recserve.operator.spec import GROUP, PLURAL, VERSION, ModelRolloutSpec

TICK_SECONDS = float(os.environ.get("RECSERVE_OPERATOR_TICK_SECONDS", "2"))
"""How often every rollout is looked at; analyses and steps keep their own intervals."""


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(rollout)s%(message)s"
"""The operator's log lines on stdout (kopf's and its own), as a container's logs are read; a line about one
rollout names it (``[namespace/name] ``)."""

WORKERS = 32
"""Threads for the handlers: every rollout's tick holds one while it waits for Triton (a load can take
seconds); kopf's default (CPU count + 4: 6 on 2 cores) made ten rollouts wait for each other."""

STOP_WAIT_S = act.TRITON_TIMEOUT_S + 10.0
"""The longest a tick under way may still run after SIGTERM: kopf leaves it ("did not exit in time. Leaving it
orphaned."), but its thread finishes before the process exits (Python joins the executor's threads), bounded by
its Triton call's timeout. The chart's terminationGracePeriodSeconds (60) is longer, so the kubelet never kills
a tick half-done."""


TICK_EXIT_POLL_S = 0.5
"""How often kopf looks again at a tick still under way once its rollout is deleted (kopf's default: 60 s). The
finalizer stays until the tick has ended, so with the default a rollout deleted during a tick stayed Terminating
for a minute (CI caught it: the finalizer released after 60 s, when its test stopped waiting)."""


def tune(settings: kopf.OperatorSettings) -> None:
    """The settings every way of running the handlers shares (``recserve operator run``, ``kopf run -m``)."""
    settings.execution.max_workers = WORKERS
    settings.background.cancellation_polling = TICK_EXIT_POLL_S
    # kopf keeps the spec it last handled in an annotation (the API server caps annotations at 256 KiB); the
    # compression report, which can be large, is left out of it: no handler reacts to its changes
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(ignored_fields=["spec.compressionReport"])


@kopf.on.startup()
def on_startup(settings: kopf.OperatorSettings, **_) -> None:
    """:func:`tune` under ``kopf run -m recserve.operator.handlers`` too, where no settings are handed in."""
    tune(settings)


def operator_settings(*, scan_namespaces: bool) -> kopf.OperatorSettings:
    """kopf's settings for ``recserve operator run`` (handed to ``kopf.run``). With namespaces named explicitly,
    no cluster-wide scanning: a namespaced Role (the chart's default) may not list namespaces, and kopf retried
    that list, 403 after 403, for about a minute before it started to handle rollouts."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = not scan_namespaces
    tune(settings)
    return settings


class _RolloutLines:
    """A logging filter: names the rollout a record is about (kopf's ``k8s_ref``), and drops kopf's line for
    every tick that went well (one per rollout per tick: noise that hid the lines that matter)."""

    def filter(self, record) -> bool:
        if record.name == "kopf.objects" and str(record.msg).startswith("Timer 'on_tick' succeeded"):
            return False
        ref = getattr(record, "k8s_ref", None) or {}
        name, namespace = ref.get("name"), ref.get("namespace")
        record.rollout = (f"[{namespace}/{name}] " if namespace else f"[{name}] ") if name else ""
        return True


def configure_logging(stream=None) -> None:
    """Every log record of the operator (kopf's included) as one line on ``stream`` (stdout)."""
    import logging
    import sys

    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_RolloutLines())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)


def _api_client():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _core_api():
    from kubernetes import client

    return client.CoreV1Api(_api_client())


def _custom_api():
    from kubernetes import client

    return client.CustomObjectsApi(_api_client())


def _discovery_api():
    from kubernetes import client

    return client.DiscoveryV1Api(_api_client())


def pods_of(rollout: ModelRolloutSpec, namespace: str, logger) -> list[TritonPod]:
    """The rollout's Tritons now (``pods.triton_pods``); none when the API server would not list them (RBAC, say):
    the state machine then sees Triton unreachable and backs off."""
    if rollout.triton.service is None:
        return triton_pods(rollout, namespace)
    try:
        return triton_pods(rollout, namespace, _discovery_api())
    except Exception as e:  # noqa: BLE001 (ApiException, a connection error: logged, looked at again)
        logger.warning("cannot list the pods of Service %s (EndpointSlices): %s", rollout.triton.service, e)
        return []


def parse_spec(spec: dict) -> ModelRolloutSpec:
    try:
        return ModelRolloutSpec.model_validate(dict(spec))
    except ValidationError as e:
        problems = "; ".join(f"spec.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise kopf.PermanentError(problems) from e


def carry_out(spec: ModelRolloutSpec, actions, body, namespace: str, pods: list[TritonPod]) -> None:
    for a in actions:
        if isinstance(a, LoadVersions):
            act.load_versions(spec, a, pods)
        elif isinstance(a, SetWeights):
            if spec.router.policy_file:
                act.set_weights_file(Path(spec.router.policy_file), a)
            if spec.router.config_map:
                act.set_weights_configmap(_core_api(), namespace, spec.router.config_map, a)
        elif isinstance(a, Emit):
            act.post_event(_core_api(), body, a)


TERMINAL = ("Promoted", "RolledBack", "Aborted", "Rejected")


def _generation(body) -> int | None:
    try:
        return body["metadata"].get("generation")
    except (KeyError, TypeError, AttributeError):
        return None


def step(body, spec, status, patch, namespace, retry, logger, superseded: bool = False) -> None:
    generation = _generation(body)
    status = dict(status or {})
    try:
        rollout = parse_spec(spec)
    except kopf.PermanentError as e:
        if status.get("phase") != "Rejected" or status.get("message") != str(e):
            patch.status.update({"phase": "Rejected", "message": str(e), "weight": 0, "observedGeneration": generation})
            kopf.event(body, type="Warning", reason="InvalidSpec", message=str(e))
        return  # nothing to retry until the spec changes
    fresh = status.get("phase") == "Rejected" and status.get("observedGeneration") != generation
    current = Status() if fresh else Status.from_dict(status)  # a fixed spec or report: start over
    pods = pods_of(rollout, namespace, logger)
    result = reconcile(rollout, current, replace(observe(rollout, pods), superseded=superseded), time.time())
    recorded = intended(current, result)
    try:
        if recorded is not None:  # the decision first: carried out again, not decided again, after a failure
            act.record_status(_custom_api(), body, recorded.to_dict() | {"observedGeneration": generation})
        carry_out(rollout, result.actions, body, namespace, pods)
    except (RecserveError, OSError, Exception) as e:  # Triton or the API server failed: retry with backoff
        delay = min(60.0, 2.0 ** min(retry, 5))
        logger.warning("actions failed (%s), retrying in %.0fs", e, delay)
        if result.status.phase == "Pending":  # nothing routed yet; the load clock (loadTimeoutSeconds) must run,
            # and the loading actions are decided again at the next look (nothing pending to carry out)
            patch.status.update(result.status.to_dict() | {"message": f"loading failed ({type(e).__name__}: {e}); "
                                                                      f"retrying", "observedGeneration": generation})
        raise kopf.TemporaryError(f"{type(e).__name__}: {e}", delay=delay) from e
    if result.status != current or status.get("observedGeneration") != generation:
        patch.status.update(result.status.to_dict() | {"observedGeneration": generation})


RESYNC_SECONDS = 10.0
"""How often a finished rollout looks at its Tritons (every tick while it runs): a Triton that restarted since
(it loads its repository's default versions) is given the versions the rollout ended on again."""


def _driven(namespace: str, spec) -> set[tuple[str, str]]:
    """The Triton models a rollout drives, keyed by its namespace."""
    return {(namespace, m) for m in (spec.get("model"), spec.get("candidateModel") or spec.get("model")) if m}


@kopf.index(GROUP, VERSION, PLURAL)
def rollouts_by_model(namespace, name, spec, meta, **_) -> dict:
    """Every rollout under each Triton model it drives: (namespace, model) -> (creation time, name)."""
    return {key: (meta.get("creationTimestamp") or "", name) for key in _driven(namespace, spec)}


def superseded(index, namespace: str, name: str, spec, meta) -> bool:
    """Whether a rollout created after this one drives one of its models (``index``: ``rollouts_by_model``): that
    one decides which versions Triton serves now, and a finished rollout must not load its own back."""
    mine = (meta.get("creationTimestamp") or "", name)
    return any(other > mine for key in _driven(namespace, spec) for other in index.get(key, ()))


# One timer drives every rollout (creation, spec changes, pause/abort, analyses, steps): kopf runs
# it serially per object with the latest status, so no two decisions race on a stale status.
@kopf.timer(GROUP, VERSION, PLURAL, interval=TICK_SECONDS, initial_delay=0.5)
def on_tick(body, spec, meta, status, patch, namespace, name, retry, logger, memo, rollouts_by_model, **_) -> None:
    status = status or {}
    unchanged = status.get("observedGeneration") is not None and status.get("observedGeneration") == _generation(body)
    # a finished rollout (its last actions known to be carried out) changes nothing until its spec changes (a new
    # candidate, a fixed spec or report); it looks at its Tritons every RESYNC_SECONDS, for one that restarted
    if status.get("phase") in TERMINAL and status.get("unloadAfter") is None and unchanged \
            and not status.get("pending"):
        if status.get("phase") == "Rejected" or time.monotonic() - memo.get("resynced", -RESYNC_SECONDS) < RESYNC_SECONDS:
            return
        memo["resynced"] = time.monotonic()
    # Triton was unreachable: the machine's backoff says when to look again (a spec change looks at once)
    elif unchanged and status.get("nextLookAt") is not None and time.time() < status["nextLookAt"]:
        return
    step(body, spec, status, patch, namespace, retry, logger,
         superseded=superseded(rollouts_by_model, namespace, name, spec, meta))


@kopf.on.delete(GROUP, VERSION, PLURAL, retries=5, backoff=2)
def on_delete(body, spec, status, namespace, logger, **_) -> None:
    """Finalizer: a rollout deleted before promotion leaves the stable version serving alone."""
    if (status or {}).get("phase") in TERMINAL:
        return
    try:
        rollout = ModelRolloutSpec.model_validate(dict(spec))
    except ValidationError:
        return
    from recserve.operator.machine import weights

    carry_out(rollout, [weights(rollout, 0)], body, namespace, [])
    time.sleep(min(rollout.router.drain_seconds, 30.0))  # routers pick up the policy before the candidate goes
    carry_out(rollout, loads(rollout, (rollout.stable_version,), final=True), body, namespace,
              pods_of(rollout, namespace, logger))
    logger.info("deleted before promotion: version %s serves all traffic", rollout.stable_version)
