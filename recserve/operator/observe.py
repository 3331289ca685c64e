"""Observations for the state machine: each Triton's loaded versions and the candidate's counters (summed over
the Tritons), the router's shadow agreement. Read-only I/O; every failure becomes ``triton_reachable=False`` or a missing
value."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from recserve.errors import RecserveError
from recserve.operator.machine import Observations, VersionCounters
from recserve.operator.pods import TritonPod
from recserve.operator.spec import ModelRolloutSpec
from recserve.provenance import source_sha256
from recserve.serving.policy import target_key
from recserve.triton.client import TritonClient


def scrape(url: str, timeout: float = 3.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> sample name -> [(labels, value)]."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            # the parser names counter samples "<name>_total"; key them by the name Triton wrote too
            name = s.name[:-len("_total")] if family.type == "counter" and s.name.endswith("_total") else s.name
            out.setdefault(name, []).append((s.labels, s.value))
    return out


def _sum(samples, **labels) -> float:
    return sum(v for lab, v in samples if all(lab.get(k) == val for k, val in labels.items()))


def version_counters(metrics: dict, model: str, version: str) -> VersionCounters:
    """Success/failure counts and p99 (Triton's summary latencies, when enabled) of one version."""
    success = _sum(metrics.get("nv_inference_request_success", []), model=model, version=version)
    failure = _sum(metrics.get("nv_inference_request_failure", []), model=model, version=version)
    p99 = None
    for labels, value in metrics.get("nv_inference_request_summary_us", []):
        if labels.get("model") == model and labels.get("version") == version and labels.get("quantile") == "0.99":
            p99 = value / 1e3 if value == value else None  # NaN before the first request
    return VersionCounters(success, failure, p99)


def router_counters(metrics: dict, model: str, version: str, p99_ms: float | None) -> VersionCounters:
    """The router's view of one Triton version: successful cloud calls and failed ones (timeouts, errors).

    Preferred when the router's metrics are known: it is what users got, and it also counts errors
    that the python-based CPU backend reports to Triton's statistics as successes.
    """
    success = _sum(metrics.get("recserve_router_cloud_seconds_count", []), model=model, version=version)
    failure = _sum(metrics.get("recserve_router_cloud_failures", []), model=model, version=version)
    return VersionCounters(success, failure, p99_ms)


def shadow_agreement(metrics: dict, model: str, version: str) -> float | None:
    total = _sum(metrics.get("recserve_router_shadow_overlap_sum", []), model=model, version=version)
    count = _sum(metrics.get("recserve_router_shadow_overlap_count", []), model=model, version=version)
    return total / count if count else None


def candidate_source(spec: ModelRolloutSpec) -> tuple[str | None, str | None]:
    """(sha256 the candidate version was built from or ``""``, None) from its manifest in the model repository;
    (None, why) when it cannot be read; (None, None) without ``triton.modelRepository``."""
    if not spec.triton.model_repository:
        return None, None
    try:
        return source_sha256(Path(spec.triton.model_repository) / spec.candidate_model_name / spec.candidate_version), None
    except (OSError, ValueError) as e:
        return None, str(e)


def observe(spec: ModelRolloutSpec, pods: list[TritonPod]) -> Observations:
    """What the Tritons (``pods.triton_pods``) and the router say now. A Triton that does not answer is left out of
    this look (a pod that is restarting; its Service drops it once its readiness fails); none answering is
    ``triton_reachable=False``."""
    source, error = candidate_source(spec) if spec.compression_report else (None, None)
    return replace(_observe_tritons(spec, pods), candidate_source=source, source_error=error)


@dataclass(frozen=True)
class _PodView:
    loaded: frozenset[str]
    unavailable: dict[str, str]
    counters: VersionCounters


def _observe_pod(spec: ModelRolloutSpec, pod: TritonPod) -> _PodView | None:
    try:
        with TritonClient(pod.grpc_url, timeout=5.0) as client:
            # liveness, not readiness: with strict readiness one broken model elsewhere makes Triton "not ready"
            if not client.server_live():
                return None
            index = client.repository_index()
        metrics = scrape(pod.metrics_url)
    except (RecserveError, urllib.error.URLError, OSError, ValueError):
        return None

    def key(m: dict) -> str:  # a version as the routing policy names it (spec.candidate_key)
        return target_key(spec.model, str(m.get("name")), str(m.get("version")))

    mine = [m for m in index if m.get("name") in (spec.model, spec.candidate_model_name)]
    return _PodView(frozenset(key(m) for m in mine if m.get("state") == "READY"),
                    {key(m): m.get("reason") or "unavailable" for m in mine
                     if m.get("state") == "UNAVAILABLE" and m.get("version")},
                    version_counters(metrics, spec.candidate_model_name, spec.candidate_version))


def _observe_tritons(spec: ModelRolloutSpec, pods: list[TritonPod]) -> Observations:
    views = {p.name: v for p in pods if (v := _observe_pod(spec, p)) is not None}
    if not views:
        return Observations(triton_reachable=False)
    loaded = frozenset.intersection(*(v.loaded for v in views.values()))
    unavailable = {k: why for v in views.values() for k, why in v.unavailable.items()}
    p99s = [v.counters.p99_ms for v in views.values() if v.counters.p99_ms is not None]
    counters = VersionCounters(sum(v.counters.success for v in views.values()),
                               sum(v.counters.failure for v in views.values()), max(p99s) if p99s else None)
    per_pod = {name: v.loaded for name, v in views.items()}
    agreement = None
    if spec.router.metrics_url:
        try:
            router = scrape(spec.router.metrics_url)
        except (urllib.error.URLError, OSError, ValueError):  # no judgement without the router's numbers
            return Observations(True, loaded, pods=per_pod, unavailable=unavailable)
        agreement = shadow_agreement(router, spec.candidate_model_name, spec.candidate_version)
        counters = router_counters(router, spec.candidate_model_name, spec.candidate_version, counters.p99_ms)
    return Observations(True, loaded, counters, agreement, unavailable, pods=per_pod)
