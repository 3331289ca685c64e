"""The router's configuration (YAML), validated with pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recserve.specs import read_mapping, read_text, validate


class RankerRef(BaseModel):
    """One ranker of a model: its Triton name (cloud), its compressed ONNX file (edge) and blend weight."""

    model_config = ConfigDict(extra="forbid")
    triton_model: str
    edge_model: Path
    weight: float = Field(1.0, gt=0.0)


class ModelRoute(BaseModel):
    """A model the router serves: rankers blended by weight over one item catalog."""

    model_config = ConfigDict(extra="forbid")
    rankers: list[RankerRef] = Field(min_length=1)
    catalog: Path = Field(description="item catalog directory (`recserve catalog` or an item_index version)")
    preprocessing: Path = Field(description="the rankers' preprocessing.json (vocabularies and transforms)")


class RetrieverRoute(BaseModel):
    """Candidate generation for requests without candidates: user tower + nearest neighbours."""

    model_config = ConfigDict(extra="forbid")
    user_tower: Path = Field(description="user tower ONNX (a user_tower version's model.onnx or a two-tower model.onnx)")
    preprocessing: Path = Field(description="the retriever's preprocessing.json")
    catalog: Path = Field(description="catalog with item embeddings (an item_index version directory)")
    candidates: int = Field(100, ge=1)


class SearchRoute(BaseModel):
    """A text search the router serves (a request naming it carries a typed ``query``): the Triton ``search``
    ensemble in the cloud, and in process an encoder with its own product index (``recserve search-index``)."""

    model_config = ConfigDict(extra="forbid")
    triton_model: str = Field("search", description="the Triton ensemble: query, top_k -> items, scores")
    edge_encoder: Path = Field(description="an encoder directory (model.onnx, tokenizer.json, encoder.json), "
                               "usually the compressed one")
    edge_index: Path = Field(description="a product_index version directory (embeddings.npy, products.json) built "
                             "by `recserve search-index` with the same edge_encoder")
    edge_ranker: Path | None = Field(None, description="a search_ranker version directory (model.onnx, "
                                     "search_ranker.json) built with edge_index: the edge reorders the nearest "
                                     "products as the ensemble does; none: the edge answers in cosine order")
    top_k: int = Field(10, ge=1, description="products returned when a request asks for top_k 0")


class Autoscaling(BaseModel):
    """Ray Serve autoscaling of the router deployment on ongoing requests per replica (replaces num_replicas)."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(10, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests in flight per replica that Serve "
                                           "scales toward")
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is more than max_replicas {self.max_replicas}")
        return self


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC address (the cloud)")
    default_model: str = "ranker"
    models: dict[str, ModelRoute] = Field(default_factory=dict)
    searches: dict[str, SearchRoute] = Field(default_factory=dict, description="text searches by name (a request's "
                                             "`model`); names apart from `models`")
    retriever: RetrieverRoute | None = None
    policy_file: Path | None = Field(None, description="routing policy (version weights, shadow); re-read on change")
    max_candidates: int = Field(1000, ge=1)
    default_budget_ms: float | None = Field(None, gt=0, description="budget when a request carries no deadline")
    max_budget_ms: float = Field(60_000.0, gt=0, description="longer budgets (deadlines or x-budget-ms) are clamped "
                                 "to this")
    edge_latency_ms: float = Field(2.0, ge=0, description="the edge's cost before it is measured (then a moving "
                                   "estimate of the measured cost takes over)")
    margin_ms: float = Field(1.0, ge=0, description="slack (ms) kept for serialization and scheduling")
    margin_share: float = Field(0.2, ge=0, lt=0.5, description="and this share of each request's budget: time the "
                                "router cannot see (the request queued in the kernel and the loop, the answer's way "
                                "back), which grows with load")
    max_inflight: int = Field(256, ge=1)
    coalesce: bool = Field(True, description="coalesce the cloud calls of concurrent requests for one Triton model "
                           "version into one call (up to its max_batch_size rows) while others are in flight")
    cloud_calls_in_flight: int = Field(4, ge=1, description="with coalesce: Triton calls in flight per model version "
                                       "before requests queue to be coalesced")
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_s: float = Field(0.5, gt=0, description="how long an open circuit skips the cloud before one "
                                      "request probes it: the cloud is used again within about this long of its "
                                      "return, however long it was away")
    cache_ttl_s: float = Field(5.0, ge=0)
    cache_size: int = Field(10_000, ge=0)
    stale_s: float = Field(300.0, ge=0, description="how old a cached cloud answer may be to serve as the last rung, "
                           "when neither the cloud nor the edge fits a request's deadline")
    edge_threads: int = Field(1, ge=1)
    grpc_port: int = 9000
    http_port: int = 8010
    http_host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 in a pod)")
    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = Field(None, description="Serve autoscaling on ongoing requests (with Serve's "
                                            "proxies, ingress: proxy, as in a KubeRay RayService) instead of a "
                                            "fixed num_replicas")
    access_log: bool = Field(False, description="Ray Serve's per-request access log lines in the replica logs "
                             "(off: they cost the replica ~8% of its CPU; the Prometheus metrics count every request)")
    ingress: Literal["replica", "direct", "proxy"] = Field(
        "replica", description="replica: each router replica runs its own gRPC server (grpc.aio in its event loop, "
        "no Serve machinery per request) on grpc_port + i, and serves HTTP with Ray Serve direct ingress on "
        "http_port + i. direct: Ray Serve direct ingress serves both (replica i on grpc_port + i and http_port + i). "
        "proxy: Ray Serve's HTTP and gRPC proxies listen on grpc_port/http_port and spread requests over the replicas")

    def grpc_targets(self, host: str = "127.0.0.1") -> list[str]:
        """Where clients reach the router over gRPC: one address per replica with direct ingress."""
        return [f"{host}:{p}" for p in self._ports(self.grpc_port)]

    def http_bases(self, host: str = "127.0.0.1") -> list[str]:
        return [f"http://{host}:{p}" for p in self._ports(self.http_port)]

    def _ports(self, first: int) -> range:
        return range(first, first + (1 if self.ingress == "proxy" else self.num_replicas))

    @model_validator(mode="after")
    def _default(self) -> RouterConfig:
        if not self.models and not self.searches:
            raise ValueError("a router serves at least one of `models` (rankers) and `searches` (text search)")
        both = sorted(set(self.models) & set(self.searches))
        if both:
            raise ValueError(f"{both} are both in models and in searches: a request names one of them")
        if self.default_model not in self.models and self.default_model not in self.searches:
            raise ValueError(f"default_model {self.default_model!r} is not among models or searches "
                             f"{sorted([*self.models, *self.searches])}")
        if self.autoscaling is not None and self.ingress != "proxy":
            raise ValueError(f"autoscaling needs ingress: proxy (with ingress: {self.ingress} each replica owns a "
                             "fixed port, so the replica count is fixed: scale pods instead)")
        return self


def missing_files(cfg: RouterConfig) -> list[str]:
    """Each file or directory the config names that is not there, as ``what: path`` (checked before Ray starts)."""
    wanted: list[tuple[str, Path, bool]] = []
    for name, m in cfg.models.items():
        wanted += [(f"models.{name}.rankers[{i}].edge_model", r.edge_model, False) for i, r in enumerate(m.rankers)]
        wanted += [(f"models.{name}.catalog", m.catalog, True), (f"models.{name}.preprocessing", m.preprocessing, False)]
    for name, q in cfg.searches.items():
        wanted += [(f"searches.{name}.edge_encoder", q.edge_encoder, True), (f"searches.{name}.edge_index", q.edge_index,
                                                                             True)]
        wanted += [(f"searches.{name}.edge_ranker", q.edge_ranker, True)] if q.edge_ranker is not None else []
    if cfg.retriever:
        r = cfg.retriever
        wanted += [("retriever.user_tower", r.user_tower, False), ("retriever.preprocessing", r.preprocessing, False),
                   ("retriever.catalog", r.catalog, True)]
    return [f"{what}: {path}" for what, path, is_dir in wanted
            if not (path.is_dir() if is_dir else path.is_file())]


def ports_in_use(cfg: RouterConfig) -> dict[int, str]:
    """The router's own gRPC/HTTP ports it could not bind, with why (a server there, or TCP's TIME_WAIT)."""
    from recserve.triton.server import port_free, port_listening

    return {p: "a server listens there" if port_listening(p) else
            "connections of a server that stopped less than a minute ago still hold it (TCP TIME_WAIT): wait a minute"
            for p in [*cfg._ports(cfg.grpc_port), *cfg._ports(cfg.http_port)] if not port_free(p)}


def load_router_config(path: Path) -> RouterConfig:
    raw = read_mapping(read_text(path, "router config"), str(path), "a router config is a YAML mapping")
    cfg = validate(RouterConfig, raw, str(path))
    base = Path(path).resolve().parent
    return resolve_paths(cfg, base)


def resolve_paths(cfg: RouterConfig, base: Path) -> RouterConfig:
    """Relative paths in the config are relative to the config file."""
    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    for m in cfg.models.values():
        m.catalog, m.preprocessing = fix(m.catalog), fix(m.preprocessing)
        for r in m.rankers:
            r.edge_model = fix(r.edge_model)
    for q in cfg.searches.values():
        q.edge_encoder, q.edge_index = fix(q.edge_encoder), fix(q.edge_index)
        q.edge_ranker = fix(q.edge_ranker) if q.edge_ranker is not None else None
    if cfg.retriever:
        r = cfg.retriever
        r.user_tower, r.preprocessing, r.catalog = fix(r.user_tower), fix(r.preprocessing), fix(r.catalog)
    if cfg.policy_file:
        cfg.policy_file = fix(cfg.policy_file)
    return cfg
