"""The Triton servers a rollout drives: one (``triton.grpcUrl``), or every ready pod behind a Service
(``triton.service``), read from the Service's EndpointSlices (``discovery.k8s.io/v1``) as kube-proxy reads them.

Model control and metrics are per Triton process, not per Service: a load sent to the Service's address reaches
one pod, and the metrics it answers are that pod's. So the operator talks to each pod's own address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recserve.operator.spec import ModelRolloutSpec

SERVICE_LABEL = "kubernetes.io/service-name"
"""The label that ties an EndpointSlice to its Service."""
GRPC_PORT, METRICS_PORT = "grpc", "metrics"
"""The names of the Service's ports the operator uses (the chart's Triton Service names them so)."""


@dataclass(frozen=True)
class TritonPod:
    """One Triton server: its name (the pod's, or its address) and where to reach it."""

    name: str
    grpc_url: str
    metrics_url: str


def pods_from_slices(slices: list[dict[str, Any]], service: str) -> list[TritonPod]:
    """The ready endpoints of ``service``'s EndpointSlices (API objects as dicts), one per pod, sorted by name.

    An endpoint counts unless its ``conditions.ready`` is false (absent means ready, as the API documents); a
    slice without the ``grpc`` or ``metrics`` port is skipped (it is not a Triton Service's)."""
    pods: dict[str, TritonPod] = {}
    for s in slices:
        if ((s.get("metadata") or {}).get("labels") or {}).get(SERVICE_LABEL) != service:
            continue  # a server that ignored the label selector (kmock) answered with others' slices too
        ports = {p.get("name"): p.get("port") for p in s.get("ports") or []}
        if not ports.get(GRPC_PORT) or not ports.get(METRICS_PORT):
            continue
        for e in s.get("endpoints") or []:
            if (e.get("conditions") or {}).get("ready") is False or not e.get("addresses"):
                continue
            address = e["addresses"][0]
            host = f"[{address}]" if ":" in address else address
            name = (e.get("targetRef") or {}).get("name") or address
            pods[name] = TritonPod(name, f"{host}:{ports[GRPC_PORT]}", f"http://{host}:{ports[METRICS_PORT]}/metrics")
    return [pods[n] for n in sorted(pods)]


def triton_pods(spec: ModelRolloutSpec, namespace: str, discovery_api=None) -> list[TritonPod]:
    """The Triton servers of a rollout now. With ``triton.service``: its ready pods (``discovery_api``, a
    ``kubernetes.client.DiscoveryV1Api``; none while no pod is ready); else the one server of the URLs."""
    t = spec.triton
    if t.service is None:
        return [TritonPod(t.grpc_url or "", t.grpc_url or "", t.metrics_url or "")]
    found = discovery_api.list_namespaced_endpoint_slice(namespace, label_selector=f"{SERVICE_LABEL}={t.service}")
    return pods_from_slices([discovery_api.api_client.sanitize_for_serialization(s) for s in found.items], t.service)
