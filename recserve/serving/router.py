"""The router's core, without Ray: one ``rank`` call from a RankRequest to a RankResponse.

Per request: validate -> one policy snapshot -> unknown inputs (reported or refused) -> cache ->
candidates (given, or retrieved) -> ranker rows -> cloud, edge or the last rung (``routing.decide``
over moving estimates of both) -> blend the rankers' scores -> top-k, mirroring a share of cloud
traffic to the shadow version. The cloud's version comes from the policy's sticky assignment; concurrent
cloud calls of one model version are coalesced (``coalesce.py``). The Ray Serve deployment (``app.py``)
and the replica's own gRPC server (``grpc_server.py``) wrap it; tests drive it directly with fake
scorers and a hand-moved clock.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import numpy as np

from recserve.errors import RecserveError
from recserve.serving.cache import TTLCache
from recserve.serving.coalesce import Coalescer
from recserve.serving.config import ModelRoute, RetrieverRoute, RouterConfig, SearchRoute
from recserve.serving.metrics import RouterMetrics
from recserve.serving.policy import (
    PolicyWatcher,
    RoutingPolicy,
    assignment_point,
    choose_version,
    shadow_version,
    split_target,
    target_key,
)
from recserve.serving.protos.recommender_pb2 import RankRequest, RankResponse
from recserve.serving.routing import BreakerState, CircuitBreaker, LatencyEstimate, RouteSettings, below_cloud, decide
from recserve.serving.scorers import CloudError, CloudScorer, EdgeScorer, EdgeSearch
from recserve.triton.features import FeatureEncoder, read_columns, top_k
from recserve.triton.retrieval import ItemIndex, context_encoder

log = logging.getLogger(__name__)


class RankError(RecserveError):
    """A request the router refuses; ``code`` is the gRPC status name (HTTP maps it too)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 413, "DEADLINE_EXCEEDED": 504,
               "UNAVAILABLE": 503, "INTERNAL": 500}


@dataclass
class _Model:
    name: str
    route: ModelRoute
    catalog: ItemIndex
    context: FeatureEncoder
    known_user: frozenset[str]
    """User feature keys something reads: the ranker's context features, the retriever's, the assignment key."""
    known_numeric: frozenset[str]


@dataclass
class _Search:
    route: SearchRoute
    edge: EdgeSearch
    estimate: LatencyEstimate
    """The edge search's own cost (an encoder, not a ranker: its own moving estimate)."""


@dataclass
class _Target:
    """What the router knows of one Triton model version it calls: its own breaker and latency estimate, so
    a failing canary version neither opens the stable version's circuit nor slows its estimate."""

    breaker: CircuitBreaker
    estimate: LatencyEstimate


FORGET_AFTER_S = 1.0
"""A latency estimate with no new observation for this long starts to fade (see ``LatencyEstimate``)."""
MAX_REQUEST_BYTES = 1 << 20
"""The largest Rank request, in bytes, on every ingress (gRPC message or HTTP body; RESOURCE_EXHAUSTED beyond it):
1,000 candidates with long ids and a few hundred user features fit well within it."""
MAX_ID_CHARS = 256
"""Longest item id, request id, model name or feature key or value a request may carry: ids are echoed in the
answer, and a bounded id keeps the answer within what clients receive by default."""


def short(text: str, limit: int = 64) -> str:
    """``text`` for an error message: what a request sent is echoed at most ``limit`` characters long."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _why(reason: str, unknown: str) -> str:
    return f"{reason}; {unknown}" if unknown else reason


def checked_scores(scores: np.ndarray, rows: int, model: str, version: str) -> np.ndarray:
    """A cloud answer the router can rank with: one finite score per candidate row. Anything else (a
    broken candidate version, a changed output shape) is a cloud failure of kind ``bad_output``: the
    request falls back to the edge and the version's failure count, which a rollout reads, rises."""
    scores = np.asarray(scores).ravel()
    if scores.size != rows:
        raise CloudError("bad_output", f"{model} v{version or '-'}: {scores.size} scores for {rows} candidates")
    if not np.isfinite(scores).all():
        raise CloudError("bad_output", f"{model} v{version or '-'}: {int((~np.isfinite(scores)).sum())} of {rows} "
                                       "scores are not finite")
    return scores


def _user_columns(preprocessing) -> list[str]:
    return read_columns(preprocessing)["user_sparse"]


class Retriever:
    """Candidates for a user: the user tower in process, then exact nearest neighbours in the catalog."""

    def __init__(self, route: RetrieverRoute, threads: int = 1):
        from recserve.onnxrt import session

        self.route = route
        self.tower = session(route.user_tower.read_bytes(), threads)
        self.index = ItemIndex(route.catalog)
        self.encoder = FeatureEncoder.load(route.preprocessing, _user_columns(route.preprocessing),
                                          dense=False)

    def candidates(self, user: dict[str, str]) -> list[str]:
        ids, _ = self.encoder.encode_one(user, {})
        (emb,) = self.tower.run(["user_embedding"], {"user_sparse": ids[None, :]})
        rows, _ = self.index.search(emb[0], self.route.candidates)
        return [str(i) for i in self.index.item_ids[rows]]


class Router:
    def __init__(self, config: RouterConfig, *, cloud: CloudScorer | None = None, edge: EdgeScorer | None = None,
                 clock: Callable[[], float] = time.monotonic, rng: Callable[[], float] = random.random,
                 metrics: RouterMetrics | None = None,
                 retrieve_fn: Callable[[dict[str, str]], Awaitable[list[str]]] | None = None):
        self.config = config
        self.clock, self.rng = clock, rng
        self.cloud = cloud or CloudScorer(config.triton_url)
        self._cloud_call = self.cloud.score
        if config.coalesce:
            self._coalescer = Coalescer(self.cloud.score, getattr(self.cloud, "batch_limit", lambda model: 0),
                                        config.cloud_calls_in_flight,
                                        on_batch=lambda model, n: self.metrics.child(self.metrics.cloud_batch, model).observe(n))
            self._cloud_call = self._coalescer.score
        self.edge = edge or EdgeScorer(config.edge_threads)
        self.metrics = metrics or RouterMetrics()
        self.settings = RouteSettings(config.edge_latency_ms, config.margin_ms, config.max_inflight, config.margin_share)
        self.targets: dict[tuple[str, str], _Target] = {}
        self.edge_estimate = LatencyEstimate(initial_ms=config.edge_latency_ms, initial_dev_ms=0.0, clock=clock,
                                             forget_after_s=FORGET_AFTER_S)
        self.cache = TTLCache(config.cache_size, config.cache_ttl_s, clock, stale_s=config.stale_s)
        self.policy = PolicyWatcher(config.policy_file, clock=clock)
        self.inflight = 0
        self.models: dict[str, _Model] = {}
        retriever_keys = set(_user_columns(config.retriever.preprocessing)) if config.retriever else set()
        for name, route in config.models.items():
            catalog = ItemIndex(route.catalog)
            context = context_encoder(route.preprocessing, catalog.layout)
            self.models[name] = _Model(name, route, catalog, context,
                                       frozenset({*context.sparse_names, *retriever_keys, "user_id"}),
                                       frozenset(t.name for t in context.transforms))
            for r in route.rankers:
                self.edge.load(r.edge_model)
        self.searches = {name: _Search(route, EdgeSearch(route.edge_encoder, route.edge_index, config.edge_threads,
                                                         route.edge_ranker),
                                       LatencyEstimate(initial_ms=config.edge_latency_ms, initial_dev_ms=0.0,
                                                       clock=clock, forget_after_s=FORGET_AFTER_S))
                         for name, route in config.searches.items()}
        self.retrieve_fn = retrieve_fn
        self.retriever = Retriever(config.retriever, config.edge_threads) if config.retriever and not retrieve_fn else None
        self._shadow_tasks: set[asyncio.Task] = set()
        self._policy_epoch = 0

    def target(self, triton_model: str, version: str = "") -> _Target:
        """The breaker and latency estimate of one Triton model version (created on first use)."""
        key = (triton_model, version)
        t = self.targets.get(key)
        if t is None:
            gauge = self.metrics.circuit_state.labels(triton_model, version)
            gauge.set(BreakerState.CLOSED)
            t = self.targets[key] = _Target(
                CircuitBreaker(self.config.breaker_failures, self.config.breaker_cooldown_s, self.clock,
                               on_change=gauge.set),
                LatencyEstimate(clock=self.clock, forget_after_s=FORGET_AFTER_S))
        return t

    def degraded(self) -> list[str]:
        """The Triton model versions whose circuit is not closed (the cloud is away or failing for them)."""
        return [f"{m} v{v or '-'}: circuit {t.breaker.state.name.lower().replace('_', '-')}"
                for (m, v), t in sorted(self.targets.items()) if t.breaker.state != BreakerState.CLOSED]

    # -- the request path -------------------------------------------------------------------------
    async def rank(self, request: RankRequest, budget_ms: float | None = None, start: float | None = None) -> RankResponse:
        """The answer to ``request`` within ``budget_ms`` counted from ``start`` (the request's arrival on the
        router's clock; now when not given). Budgets above ``max_budget_ms`` are clamped to it."""
        start = self.clock() if start is None else start
        budget_ms = budget_ms if budget_ms is not None else self.config.default_budget_ms
        if budget_ms is not None:
            budget_ms = min(budget_ms, self.config.max_budget_ms)
        name = request.model or self.config.default_model
        self.metrics.inflight.inc()
        try:
            response = await self._rank(request, name, start, budget_ms)
        except RankError as e:  # unknown names are not metric labels (unbounded)
            self.metrics.requests.labels(name if name in self.models or name in self.searches else "unknown", "none", "",
                                        e.code).inc()
            raise
        finally:
            self.metrics.inflight.dec()
        m = self.metrics
        m.child(m.requests, name, response.served_by, response.version, "OK").inc()
        m.child(m.latency, name, response.served_by, response.version).observe(self.clock() - start)
        return response

    async def _rank(self, req: RankRequest, name: str, start: float, budget_ms: float | None) -> RankResponse:
        if name in self.searches:
            return await self._search(req, name, start, budget_ms)
        model = self.models.get(name)
        if model is None:
            raise RankError("NOT_FOUND", f"unknown model {short(name)!r}; this router serves "
                                         f"{sorted([*self.models, *self.searches])}")
        # the protobuf fields read once: every read of a repeated or map field builds its Python objects anew
        items, user, numeric = list(req.candidate_item_ids), dict(req.user), dict(req.numeric)
        if len(items) > self.config.max_candidates:
            raise RankError("INVALID_ARGUMENT", f"{len(items)} candidates is more than the "
                            f"{self.config.max_candidates} allowed; send fewer or raise max_candidates")
        texts = (items, user.keys(), user.values(), numeric.keys())
        if max(len(req.request_id), len(req.query), *(max(map(len, t), default=0) for t in texts)) > MAX_ID_CHARS:
            too_long = next(s for s in (req.request_id, req.query, *(s for t in texts for s in t))
                            if len(s) > MAX_ID_CHARS)
            raise RankError("INVALID_ARGUMENT", f"ids, keys and values are at most {MAX_ID_CHARS} characters; "
                            f"got {short(too_long, 32)!r}")
        if req.top_k < 0:
            raise RankError("INVALID_ARGUMENT", "top_k must be >= 0 (0 returns every candidate)")
        if budget_ms is not None and budget_ms <= 0:
            raise RankError("DEADLINE_EXCEEDED", "the request's deadline had already passed when it arrived")
        policy = self.policy.current()  # one snapshot for the whole request: version and shadow agree
        if self.policy.reloads != self._policy_epoch:  # a new split: cached answers may be the old version's
            self._policy_epoch = self.policy.reloads
            self.cache.clear()
            self.metrics.policy_reloads.set(self.policy.reloads)
        rows = model.catalog.rows_for(items)
        unknown = self._unknown(model, rows, user, numeric, policy)
        key = (name, tuple(sorted(user.items())), req.query, tuple(items), req.top_k,
               tuple(sorted(numeric.items()))) if self.cache.enabled else None  # hashing 50 ids is not free
        cached = self.cache.get(key)
        if cached is not None:
            self.metrics.cache_hits.inc()
            out = RankResponse()
            out.CopyFrom(cached)
            out.request_id, out.served_by, out.reason = req.request_id, "cache", _why("cache hit", unknown)
            return out
        if not items:
            items = await self._retrieve(user)
            rows = model.catalog.rows_for(items)
        sparse, dense = self._rows(model, req.query, user, numeric, rows)
        primary = model.route.rankers[0].triton_model
        point, hashed = assignment_point(policy, primary, user, self.rng())
        if not hashed and primary in policy.models and policy.models[primary].assignment.by == "hash":
            self.metrics.unsticky.labels(name).inc()
        version = choose_version(policy, primary, point)  # a version of primary, or another model's ("m:1")
        triton_model, triton_version = split_target(primary, version)
        target = self.target(triton_model, triton_version)
        decision = self._decide(target, self.edge_estimate, start, budget_ms, "ranking")
        reason = decision.reason
        if decision.route == "cloud":
            answers = await self._cloud(model, triton_model, triton_version, target, sparse, dense,
                                        decision.cloud_timeout_ms / 1e3)
            if answers is not None:
                served = answers[0].version or triton_version
                version = target_key(primary, triton_model, served)
                scores = sum(r.weight * a.scores for r, a in zip(model.route.rankers, answers))
                response = self._answer(req, name, items, scores, "cloud", version, _why(reason, unknown))
                self.cache.put(key, response)
                self._maybe_shadow(policy, primary, version, sparse, dense, answers[0].scores, len(response.items))
                return response
            decision = below_cloud(self._left(start, budget_ms), self.edge_estimate.estimate_ms, self.settings,
                                   "cloud failed")
            reason = "cloud failed: answered from edge" if decision.route == "edge" else decision.reason
        if decision.route == "edge":
            return self._answer(req, name, items, self._edge(model, sparse, dense), "edge", "edge", _why(reason, unknown))
        return self._last_rung(req, name, key, items, _why(reason, unknown))

    async def _search(self, req: RankRequest, name: str, start: float, budget_ms: float | None) -> RankResponse:
        """A typed query -> products: the Triton search ensemble, the edge's encoder and index, or the last rung
        (a stale cached answer, else no products), chosen by deadline and health like a ranking."""
        search = self.searches[name]
        if not req.query.strip():
            raise RankError("INVALID_ARGUMENT", f"{short(name)!r} is a text search: send the typed query in `query`")
        if len(req.query) > MAX_ID_CHARS:
            raise RankError("INVALID_ARGUMENT", f"a query is at most {MAX_ID_CHARS} characters; got {len(req.query)}")
        if req.candidate_item_ids:
            raise RankError("INVALID_ARGUMENT", f"{short(name)!r} is a text search: it finds the products itself; "
                            "send no candidate_item_ids")
        if req.top_k < 0 or req.top_k > self.config.max_candidates:
            raise RankError("INVALID_ARGUMENT", f"top_k must be 0 to {self.config.max_candidates} (0: "
                            f"{search.route.top_k})")
        if budget_ms is not None and budget_ms <= 0:
            raise RankError("DEADLINE_EXCEEDED", "the request's deadline had already passed when it arrived")
        k = req.top_k or search.route.top_k
        key = ("search", name, req.query, k)
        cached = self.cache.get(key)
        if cached is not None:
            self.metrics.cache_hits.inc()
            out = RankResponse()
            out.CopyFrom(cached)
            out.request_id, out.served_by, out.reason = req.request_id, "cache", "cache hit"
            return out
        triton_model = search.route.triton_model
        target = self.target(triton_model)
        decision = self._decide(target, search.estimate, start, budget_ms, "the search")
        reason = decision.reason
        if decision.route == "cloud":
            answer = await self._guarded(triton_model, "", target, lambda: self.cloud.search(
                triton_model, req.query, k, decision.cloud_timeout_ms / 1e3), decision.cloud_timeout_ms / 1e3)
            if answer is not None:
                response = RankResponse(request_id=req.request_id, items=answer.items, scores=answer.scores.tolist(),
                                        served_by="cloud", model=name, version=answer.version, reason=reason)
                self.cache.put(key, response)
                return response
            decision = below_cloud(self._left(start, budget_ms), search.estimate.estimate_ms, self.settings,
                                   "cloud failed")
            reason = "cloud failed: answered from edge" if decision.route == "edge" else decision.reason
        if decision.route == "edge":
            t0 = self.clock()
            answer = search.edge.search(req.query, k)
            took = self.clock() - t0
            search.estimate.observe(took * 1e3)
            self.metrics.edge_latency.labels(name).observe(took)
            return RankResponse(request_id=req.request_id, items=answer.items, scores=answer.scores.tolist(),
                                served_by="edge", model=name, version="edge", reason=reason)
        return self._last_rung(req, name, key, [], reason)

    def _decide(self, target: _Target, edge: LatencyEstimate, start: float, budget_ms: float | None, what: str):
        """Cloud, edge or last rung for what is left of the budget (``routing.decide``); a half-open circuit whose
        probe another request took sends this one below the cloud; DEADLINE_EXCEEDED when nothing can start."""
        decision = decide(self._left(start, budget_ms), target.estimate.estimate_ms, edge.estimate_ms,
                          target.breaker.available(), self.inflight, self.settings)
        if decision.route == "cloud" and not target.breaker.allow():  # the half-open probe went to another request
            decision = below_cloud(self._left(start, budget_ms), edge.estimate_ms, self.settings, "circuit half-open")
        if decision.route == "reject":
            raise RankError("DEADLINE_EXCEEDED", f"the deadline passed before {what} could start")
        return decision

    def _edge(self, model: _Model, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """The blended edge scores, the edge's cost measured into its moving estimate."""
        t0 = self.clock()
        scores = sum(r.weight * self.edge.score(r.edge_model, sparse, dense) for r in model.route.rankers)
        took = self.clock() - t0
        self.edge_estimate.observe(took * 1e3)
        self.metrics.edge_latency.labels(model.name).observe(took)
        return scores

    def _left(self, start: float, budget_ms: float | None) -> float | None:
        return None if budget_ms is None else budget_ms - (self.clock() - start) * 1e3

    @staticmethod
    def _answer(req: RankRequest, name: str, items: list[str], scores: np.ndarray, served_by: str, version: str,
                reason: str) -> RankResponse:
        best = top_k(scores, req.top_k or len(items))
        return RankResponse(request_id=req.request_id, items=[items[i] for i in best],
                            scores=scores[best].astype(float).tolist(), served_by=served_by, model=name,
                            version=version, reason=reason)

    def _last_rung(self, req: RankRequest, name: str, key: tuple | None, items: list[str], reason: str) -> RankResponse:
        """Neither cloud nor edge fits what is left of the deadline: a stale cached answer of the same
        request if there is one, else the candidates in their given order (no scores: no model ranked them)."""
        stale = self.cache.stale(key)
        if stale is not None:
            age, cached = stale
            self.metrics.fallbacks.labels(name, "stale").inc()
            out = RankResponse()
            out.CopyFrom(cached)
            out.request_id, out.served_by = req.request_id, "fallback"
            out.reason = f"{reason}: a cached answer {age:.1f} s old"
            return out
        self.metrics.fallbacks.labels(name, "given_order").inc()
        return RankResponse(request_id=req.request_id, items=items[:req.top_k or len(items)], served_by="fallback",
                            model=name, version="", reason=f"{reason}: the candidates in their given order")

    def _unknown(self, model: _Model, rows: np.ndarray, user: dict[str, str], numeric: dict[str, float],
                 policy: RoutingPolicy) -> str:
        """What in the request no model knows (unknown item ids, whose ``rows`` are the catalog's OOV row; user and
        numeric keys nothing reads), counted in the metrics; a request with any is refused when the policy says
        ``unknown_inputs: refuse``."""
        items = int(np.count_nonzero(rows == model.catalog.oov))
        split = policy.models.get(model.route.rankers[0].triton_model)
        sticky_key = split.assignment.key if split is not None else ""
        keys = sorted({k for k in user if k not in model.known_user and k != sticky_key}
                      | {k for k in numeric if k not in model.known_numeric})
        if not items and not keys:
            return ""
        parts = ([f"{items} unknown item id{'s' if items > 1 else ''}"] if items else []) + \
                ([f"unknown feature keys: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"] if keys else [])
        if policy.unknown_inputs == "refuse":
            raise RankError("INVALID_ARGUMENT", "; ".join(parts) + " (the routing policy refuses unknown inputs)")
        if items:
            self.metrics.unknown_items.labels(model.name).inc(items)
        if keys:
            self.metrics.unknown_keys.labels(model.name).inc(len(keys))
        return "; ".join(parts)

    # -- pieces ------------------------------------------------------------------------------------
    async def _retrieve(self, user: dict[str, str]) -> list[str]:
        if self.retrieve_fn is not None:
            return list(await self.retrieve_fn(dict(user)))
        if self.retriever is None:
            raise RankError("INVALID_ARGUMENT", "candidate_item_ids is empty and this router has no retriever: "
                            "send candidates, or configure `retriever`")
        return self.retriever.candidates(user)

    @staticmethod
    def _rows(model: _Model, query: str, user: dict[str, str], numeric: dict[str, float],
              rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ranker's input rows: the candidates' catalog ``rows`` with the request's context in every row."""
        values = {"query_id": query, "query": query, **user} if query else user
        ctx_sparse, ctx_dense = model.context.encode_one(values, numeric)
        return model.catalog.ranker_rows(rows, ctx_sparse, ctx_dense)

    async def _cloud(self, model: _Model, primary: str, version: str, target: _Target, sparse, dense,
                     timeout_s: float):
        """Each ranker's cloud scores, or None after a failure (see ``_guarded``). The first ranker is called as
        ``primary`` (the route's model, or the other model the policy chose for it), ``version``."""
        async def call():
            calls = [self._cloud_call(primary if i == 0 else r.triton_model, version if i == 0 else "", sparse,
                                      dense, timeout_s) for i, r in enumerate(model.route.rankers)]
            answers = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)  # no task for one
            return [replace(a, scores=checked_scores(a.scores, len(sparse), primary if i == 0 else r.triton_model,
                                                     version if i == 0 else ""))
                    for i, (r, a) in enumerate(zip(model.route.rankers, answers))]

        return await self._guarded(primary, version, target, call, timeout_s)

    async def _guarded(self, triton_model: str, version: str, target: _Target, call: Callable[[], Awaitable],
                       timeout_s: float):
        """``call()``'s answer, or None after a failure (recorded by the version's breaker and the metrics, by
        Triton model and version: what a ModelRollout of that model reads). Every outcome reaches the breaker:
        success, failure, timeout, and cancellation (which releases a half-open probe). The timeout is the
        router's own as well as the scorer's: no scorer can hold a request past it."""
        self.inflight += 1
        t0 = self.clock()
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    answer = await call()
            except TimeoutError as e:
                raise CloudError("timeout", f"{triton_model} v{version or '-'}: no answer in "
                                            f"{timeout_s * 1e3:.1f} ms") from e
        except CloudError as e:
            target.breaker.record_failure()
            self.metrics.cloud_failures.labels(triton_model, version, e.kind).inc()
            log.info("cloud call failed (%s): %s", e.kind, e)
            return None
        except asyncio.CancelledError:
            target.breaker.record_cancel()
            raise
        finally:
            self.inflight -= 1
        took = self.clock() - t0
        target.breaker.record_success()
        target.estimate.observe(took * 1e3)
        self.metrics.child(self.metrics.cloud_latency, triton_model, version).observe(took)
        return answer

    def _maybe_shadow(self, policy: RoutingPolicy, triton_model: str, served_version: str, sparse, dense, scores,
                      k: int) -> None:
        target = shadow_version(policy, triton_model, served_version, self.rng())
        if target is None:
            return
        task = asyncio.get_running_loop().create_task(self._shadow(triton_model, target, sparse, dense, scores, k))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, model: str, target: str, sparse, dense, served, k: int) -> None:
        triton_model, version = split_target(model, target)
        self.metrics.shadow_requests.labels(triton_model, version).inc()
        try:
            shadow = checked_scores((await self._cloud_call(triton_model, version, sparse, dense, 1.0)).scores,
                                    len(sparse), triton_model, version)
        except CloudError:
            self.metrics.shadow_failures.labels(triton_model, version).inc()
            return
        a, b = set(top_k(served, k).tolist()), set(top_k(shadow, k).tolist())
        self.metrics.shadow_overlap.labels(triton_model, version).observe(len(a & b) / max(1, k))
        self.metrics.shadow_drift.labels(triton_model, version).observe(float(np.mean(np.abs(shadow - served))))

    async def close(self) -> None:
        for t in list(self._shadow_tasks):
            t.cancel()
        if self.config.coalesce:
            await self._coalescer.close()
        await self.cloud.close()
