"""Prometheus metrics of the router (one registry per replica, served at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes: the replica's cost
        self.requests = Counter("recserve_router_requests", "Rank requests by outcome",
                                ["model", "route", "version", "code"], registry=r)
        self.latency = Histogram("recserve_router_request_seconds", "Rank latency inside the router",
                                 ["model", "route", "version"], buckets=LATENCY_BUCKETS, registry=r)
        # the cloud_* and shadow_* families are labelled by Triton model and version (what an operator judges)
        self.cloud_latency = Histogram("recserve_router_cloud_seconds", "Triton call latency seen by the router",
                                       ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.cloud_batch = Histogram("recserve_router_cloud_batch_requests", "Rank requests carried by one "
                                     "coalesced Triton call (calls made while another was in flight)", ["model"],
                                     buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.cloud_failures = Counter("recserve_router_cloud_failures", "Cloud calls that failed or timed out",
                                      ["model", "version", "kind"], registry=r)
        self.shadow_requests = Counter("recserve_router_shadow_requests", "Requests mirrored to a shadow version",
                                       ["model", "version"], registry=r)
        self.shadow_failures = Counter("recserve_router_shadow_failures", "Shadow calls that failed",
                                       ["model", "version"], registry=r)
        self.shadow_overlap = Histogram("recserve_router_shadow_overlap", "overlap@k of shadow and served top-k",
                                        ["model", "version"], buckets=(0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0), registry=r)
        self.shadow_drift = Histogram("recserve_router_shadow_score_drift", "mean |shadow - served| score per request",
                                      ["model", "version"], buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
                                      registry=r)
        self.inflight = Gauge("recserve_router_inflight_requests", "Rank requests being answered by this replica "
                              "(what the chart's HPA can scale on, through a metrics adapter)", registry=r)
        self.circuit_state = Gauge("recserve_router_circuit_state", "The circuit breaker of a Triton model version: "
                                   "0 closed, 1 half-open (one probe allowed), 2 open (the cloud is skipped)",
                                   ["model", "version"], registry=r)
        self.late = Counter("recserve_router_late_answers", "Answers written after their deadline, counted from the "
                            "call's arrival at the replica's gRPC server (the client saw DEADLINE_EXCEEDED)",
                            registry=r)
        self.cache_hits = Counter("recserve_router_cache_hits", "Responses served from the result cache", registry=r)
        self.fallbacks = Counter("recserve_router_fallbacks", "Answers from the last rung (neither cloud nor edge "
                                 "fitted the deadline), by kind: stale (an expired cached answer) or given_order",
                                 ["model", "kind"], registry=r)
        self.unknown_items = Counter("recserve_router_unknown_items", "Candidate item ids not in the catalog",
                                     ["model"], registry=r)
        self.unknown_keys = Counter("recserve_router_unknown_keys", "User or numeric feature keys no model reads",
                                    ["model"], registry=r)
        self.unsticky = Counter("recserve_router_unsticky_requests", "Requests to a split model without its "
                                "assignment key (their version was drawn at random)", ["model"], registry=r)
        self.edge_latency = Histogram("recserve_router_edge_seconds", "Edge (in-process) scoring latency",
                                      ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.policy_reloads = Gauge("recserve_router_policy_reloads", "Routing policy files loaded", registry=r)
        self._children: dict[tuple, object] = {}

    def child(self, family, *labels: str):
        """``family.labels(*labels)``, remembered: the request path asks for the same few children on every call,
        and ``labels`` checks, converts and locks each time. For label values from a bounded set only."""
        key = (family, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*labels)
        return found

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
