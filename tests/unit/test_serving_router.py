"""The router's core (``recserve.serving.router.Router``) without Ray or Triton: fake cloud and edge scorers, a
hand-moved clock and an injected random source, over a real tiny catalog and the preprocessing of a real tiny
ranker (trained once per session, about a second)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recserve.data.schema import load_preprocessing
from recserve.serving.config import RouterConfig
from recserve.serving.policy import RoutingPolicy, write_policy
from recserve.serving.protos.recommender_pb2 import RankRequest, RankResponse
from recserve.serving.router import HTTP_STATUS, RankError, Router
from recserve.serving.routing import BreakerState
from recserve.serving.scorers import CloudAnswer, CloudError

SPEC = "synthetic:6000,users=300,items=500"
ITEM_COL, USER_COL, QUERY_COL = 1, 0, 2
"""Columns of the synthetic ranker's sparse input: user_id, item_id, query_id, category, brand, price_bucket."""


# --- fixtures: a real tiny ranker, its catalog, and (for the retriever test) a two-tower index ----------------------


@dataclass(frozen=True)
class Env:
    ranker: Path
    catalog: Path
    preprocessing: Path
    items: list[str]

    def vocab(self, name: str):
        return load_preprocessing(self.preprocessing)[0][name]


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    from recserve.models.pipeline import train_model
    from recserve.triton.retrieval import ItemIndex, build_catalog_dir

    base = tmp_path_factory.mktemp("router-unit")
    train_model(SPEC, "ranker", base / "ranker", epochs=1, embedding_dim=8, threads=1, seed=0)
    build_catalog_dir(base / "ranker", None, base / "catalog")
    items = [str(i) for i in ItemIndex(base / "catalog").item_ids]
    return Env(base / "ranker", base / "catalog", base / "ranker" / "preprocessing.json", items)


@pytest.fixture(scope="session")
def retrieval_catalog(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with user_tower/1 and item_index/1 (a catalog with embeddings)."""
    from recserve.models.pipeline import train_model
    from recserve.triton.retrieval import build_retrieval

    base = tmp_path_factory.mktemp("router-unit-retrieval")
    train_model(SPEC, "two-tower", base / "tt", epochs=1, embedding_dim=8, threads=1, seed=0)
    build_retrieval(base / "tt", env.ranker, None, base / "repo")
    return base / "repo"


def config(env: Env, *, rankers: list[dict] | None = None, **over) -> RouterConfig:
    raw = {
        "models": {"ranker": {
            "rankers": rankers or [{"triton_model": "ranker", "edge_model": str(env.ranker / "model.onnx")}],
            "catalog": str(env.catalog), "preprocessing": str(env.preprocessing)}},
        "cache_ttl_s": 0, "breaker_failures": 3, "breaker_cooldown_s": 2.0,
        "edge_latency_ms": 2.0, "margin_ms": 1.0, "margin_share": 0.0,
    }
    raw.update(over)
    return RouterConfig.model_validate(raw)


# --- fakes -----------------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Rng:
    def __init__(self, value: float = 0.5):
        self.value = value
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


@dataclass
class Call:
    model: str
    version: str
    sparse: np.ndarray
    dense: np.ndarray
    timeout_s: float


def cloud_scores(model: str, version: str, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """Deterministic per model and version: 'ranker' v != 2 ranks by item id, v2 in reverse; others use price."""
    item = sparse[:, ITEM_COL].astype(np.float32)
    if model == "ranker":
        return (item / 1000.0 if version != "2" else -item / 1000.0).astype(np.float32)
    return (dense[:, 0] * 0.5 + item / 7.0).astype(np.float32)


class FakeCloud:
    """Matches CloudScorer: ``async score(model, version, sparse, dense, timeout_s)`` and ``async close()``."""

    def __init__(self, clock: Clock | None = None, took_s: float = 0.0):
        self.default_version = "1"
        """The version that answers a request naming none (Triton's version policy: the newest)."""
        self.calls: list[Call] = []
        self.fail: CloudError | None = None
        self.fail_versions: set[str] = set()
        self.clock, self.took_s = clock, took_s
        self.gate: asyncio.Event | None = None
        self.gate_versions: set[str] | None = None
        """With a gate: the versions that wait for it (None: all)."""
        self.closed = False
        self.broken: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        """Per version: what that version does to its scores (a broken model's output)."""

    async def score(self, model, version, sparse, dense, timeout_s) -> CloudAnswer:
        self.calls.append(Call(model, version, sparse.copy(), dense.copy(), timeout_s))
        if self.gate is not None and (self.gate_versions is None or version in self.gate_versions):
            await self.gate.wait()
        if self.clock is not None:
            self.clock.t += self.took_s
        if self.fail is not None or version in self.fail_versions:
            raise self.fail or CloudError("error", f"version {version} failed")
        scores = self.broken.get(version, lambda x: x)(cloud_scores(model, version, sparse, dense))
        return CloudAnswer(scores, version or self.default_version)

    async def close(self) -> None:
        self.closed = True


def edge_scores(path: Path, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """The opposite order of the cloud's, so the ranking shows who answered."""
    scale = 2.0 if "b" in Path(path).stem else 1.0
    return (0.5 - scale * sparse[:, ITEM_COL].astype(np.float32) / 1000.0).astype(np.float32)


class FakeEdge:
    """Matches EdgeScorer: ``load(path)`` and ``score(path, sparse, dense)``."""

    def __init__(self):
        self.loaded: list[Path] = []
        self.calls: list[tuple[Path, np.ndarray, np.ndarray]] = []

    def load(self, path) -> None:
        self.loaded.append(Path(path))

    def score(self, path, sparse, dense) -> np.ndarray:
        self.calls.append((Path(path), sparse.copy(), dense.copy()))
        return edge_scores(path, sparse, dense)


@dataclass
class Rig:
    router: Router
    cloud: FakeCloud
    edge: FakeEdge
    clock: Clock
    rng: Rng

    def rank(self, request: RankRequest, budget_ms: float | None = None) -> RankResponse:
        return asyncio.run(self.router.rank(request, budget_ms))

    def metric(self, name: str, **labels) -> float | None:
        return sample(self.router.metrics.exposition(), name, **labels)


def rig(env: Env, *, cloud_took_s: float = 0.0, retrieve_fn=None, **over) -> Rig:
    clock, rng = Clock(), Rng()
    cloud, edge = FakeCloud(clock, cloud_took_s), FakeEdge()
    router = Router(config(env, **over), cloud=cloud, edge=edge, clock=clock, rng=rng, retrieve_fn=retrieve_fn)
    return Rig(router, cloud, edge, clock, rng)


def sample(exposition: bytes, name: str, **labels) -> float | None:
    for family in text_string_to_metric_families(exposition.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


CANDIDATES = ["151", "114", "49", "401", "69", "221"]


def request(candidates=None, top_k: int = 3, **kw) -> RankRequest:
    kw.setdefault("user", {"user_id": "17"})
    kw.setdefault("query", "3")
    return RankRequest(request_id=kw.pop("request_id", "r1"),
                       candidate_item_ids=CANDIDATES if candidates is None else candidates, top_k=top_k, **kw)


def expected_order(scores: np.ndarray, items: list[str], k: int) -> tuple[list[str], list[float]]:
    order = np.argsort(-scores, kind="stable")[: (k or len(items))]
    return [items[i] for i in order], [float(scores[i]) for i in order]


# --- the cloud path ------------------------------------------------------------------------------------------------


def test_cloud_answer_is_served_with_the_fakes_scores(env: Env) -> None:
    r = rig(env)
    resp = r.rank(request(request_id="abc"), budget_ms=100.0)
    # no policy: Triton chooses the version, and the answer says which one it was
    assert (resp.served_by, resp.model, resp.version, resp.reason) == ("cloud", "ranker", "1", "within budget")
    assert resp.request_id == "abc"
    assert len(r.cloud.calls) == 1 and not r.edge.calls
    call = r.cloud.calls[0]
    assert call.model == "ranker" and call.version == ""
    assert call.timeout_s == pytest.approx((100.0 - 3.0) / 1e3)  # budget minus the edge reserve
    fake = cloud_scores("ranker", "", call.sparse, call.dense)
    items, scores = expected_order(fake, CANDIDATES, 3)
    assert list(resp.items) == items
    np.testing.assert_allclose(resp.scores, scores, rtol=1e-6)


def test_rows_sent_to_the_scorer_are_the_catalog_rows_plus_the_request_context(env: Env) -> None:
    r = rig(env)
    r.rank(request(candidates=["151", "nope", "49"], user={"user_id": "17"}, query="3", top_k=0), budget_ms=None)
    call = r.cloud.calls[0]
    assert call.sparse.shape == (3, 6) and call.sparse.dtype == np.int64
    assert call.dense.shape == (3, 3) and call.dense.dtype == np.float32
    np.testing.assert_array_equal(call.sparse[:, ITEM_COL], env.vocab("item_id").lookup(["151", "nope", "49"]))
    assert call.sparse[1, ITEM_COL] == 0  # unknown item: the OOV row
    np.testing.assert_array_equal(call.sparse[1, [1, 3, 4, 5]], 0)
    np.testing.assert_array_equal(call.sparse[:, USER_COL], env.vocab("user_id").lookup(["17"] * 3))
    np.testing.assert_array_equal(call.sparse[:, QUERY_COL], env.vocab("query_id").lookup(["3"] * 3))
    assert call.sparse[0, USER_COL] > 0 and call.sparse[0, QUERY_COL] > 0
    # item-side columns of known items equal the catalog's
    from recserve.triton.retrieval import ItemIndex

    idx = ItemIndex(env.catalog)
    rows = idx.rows_for(["151", "49"])
    np.testing.assert_array_equal(call.sparse[[0, 2]][:, idx.layout.sparse_item],
                                  np.load(env.catalog / "item_sparse.npy")[rows])
    np.testing.assert_allclose(call.dense[[0, 2]][:, idx.layout.dense_item], np.load(env.catalog / "item_dense.npy")[rows])


def test_no_budget_goes_to_cloud(env: Env) -> None:
    r = rig(env)
    resp = r.rank(request(), budget_ms=None)
    assert (resp.served_by, resp.reason) == ("cloud", "no deadline")


def test_default_budget_applies_when_the_request_has_none(env: Env) -> None:
    r = rig(env, default_budget_ms=5.0)  # below estimate (10) + reserve (3)
    resp = r.rank(request(), budget_ms=None)
    assert (resp.served_by, resp.reason) == ("edge", "deadline")
    assert not r.cloud.calls


# --- falling back to the edge ---------------------------------------------------------------------------------------


def test_cloud_error_falls_back_to_edge_and_counts_a_failure(env: Env) -> None:
    r = rig(env)
    r.cloud.fail = CloudError("unavailable", "connection refused")
    resp = r.rank(request(), budget_ms=100.0)
    assert resp.served_by == "edge" and resp.version == "edge"
    assert resp.reason == "cloud failed: answered from edge"
    assert len(r.cloud.calls) == 1 and len(r.edge.calls) == 1
    path, sparse, dense = r.edge.calls[0]
    assert path == env.ranker / "model.onnx"
    np.testing.assert_array_equal(sparse, r.cloud.calls[0].sparse)  # same rows as the cloud got
    items, scores = expected_order(edge_scores(path, sparse, dense), CANDIDATES, 3)
    assert list(resp.items) == items
    np.testing.assert_allclose(resp.scores, scores, rtol=1e-6)
    assert r.router.target("ranker").breaker.failures == 1
    assert r.metric("recserve_router_cloud_failures_total", model="ranker", kind="unavailable") == 1.0
    assert r.metric("recserve_router_requests_total", model="ranker", route="edge", version="edge", code="OK") == 1.0


BROKEN_OUTPUTS = {
    "one score short": (lambda x: x[:-1], "5 scores for 6 candidates"),
    "a NaN": (lambda x: np.where(np.arange(x.size) == 2, np.nan, x).astype(np.float32), "1 of 6 scores are not finite"),
    "infinities": (lambda x: np.full_like(x, np.inf), "6 of 6 scores are not finite"),
    "one per batch": (lambda x: x[:1], "1 scores for 6 candidates"),
}


@pytest.mark.parametrize("broken", list(BROKEN_OUTPUTS))
def test_a_version_answering_garbage_is_a_cloud_failure_answered_by_the_edge(env: Env, broken: str,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A broken canary must not turn into INTERNAL errors or a ranking by NaN: the edge answers, and the
    failure is counted against that version, which is what a rollout's analysis reads."""
    r = rig(env)
    r.router.policy.set(RoutingPolicy.model_validate({"models": {"ranker": {"versions": {"2": 100}}}}))
    transform, message = BROKEN_OUTPUTS[broken]
    r.cloud.broken["2"] = transform
    with caplog.at_level("INFO", logger="recserve.serving.router"):
        resp = r.rank(request(), budget_ms=100.0)
    assert (resp.served_by, resp.version, resp.reason) == ("edge", "edge", "cloud failed: answered from edge")
    assert len(resp.items) == 3 and all(math.isfinite(x) for x in resp.scores)
    assert r.metric("recserve_router_cloud_failures_total", model="ranker", version="2", kind="bad_output") == 1.0
    assert r.router.target("ranker", "2").breaker.failures == 1  # the version's own breaker
    assert r.router.target("ranker", "1").breaker.failures == 0
    assert message in caplog.text


def test_a_shadow_version_answering_garbage_is_a_shadow_failure(env: Env) -> None:
    r = rig(env)
    r.router.policy.set(RoutingPolicy.model_validate(
        {"models": {"ranker": {"versions": {"1": 100}, "shadow_percent": 100, "shadow_version": "2"}}}))
    r.rng.value = 0.1
    r.cloud.broken["2"] = BROKEN_OUTPUTS["a NaN"][0]

    async def go():
        resp = await r.router.rank(request(), 100.0)
        await _drain(r.router, lambda: r.metric("recserve_router_shadow_failures_total", model="ranker",
                                                version="2") == 1.0)
        return resp

    assert asyncio.run(go()).served_by == "cloud"
    assert r.metric("recserve_router_shadow_overlap_count", model="ranker", version="2") in (None, 0.0)


def test_breaker_opens_after_n_failures_and_skips_the_cloud(env: Env) -> None:
    r = rig(env, breaker_failures=3, breaker_cooldown_s=2.0)
    r.cloud.fail = CloudError("timeout", "slow")
    for i in range(3):
        resp = r.rank(request(request_id=f"f{i}"), budget_ms=100.0)
        assert resp.served_by == "edge" and resp.reason.startswith("cloud failed")
    assert len(r.cloud.calls) == 3
    for i in range(5):
        r.clock.t += 0.3
        resp = r.rank(request(request_id=f"o{i}"), budget_ms=100.0)
        assert (resp.served_by, resp.reason) == ("edge", "circuit open")
    assert len(r.cloud.calls) == 3, "the cloud must not be called while the circuit is open"
    assert r.metric("recserve_router_circuit_state", model="ranker", version="") == 2.0  # open

    # after the cooldown one probe goes through; the cloud is back, so the circuit closes
    r.cloud.fail = None
    r.clock.t += 2.0
    resp = r.rank(request(request_id="probe"), budget_ms=100.0)
    assert resp.served_by == "cloud"
    assert len(r.cloud.calls) == 4
    resp = r.rank(request(request_id="after"), budget_ms=100.0)
    assert resp.served_by == "cloud"
    assert r.metric("recserve_router_circuit_state", model="ranker", version="") == 0.0  # closed


def test_failed_probe_keeps_the_circuit_open(env: Env) -> None:
    r = rig(env, breaker_failures=1, breaker_cooldown_s=2.0)
    r.cloud.fail = CloudError("unavailable", "down")
    assert r.rank(request(), budget_ms=100.0).reason.startswith("cloud failed")
    r.clock.t += 2.0
    assert r.rank(request(), budget_ms=100.0).reason.startswith("cloud failed")  # the probe
    assert r.rank(request(), budget_ms=100.0).reason == "circuit open"
    assert len(r.cloud.calls) == 2


def test_half_open_probe_is_not_lost_to_a_request_that_goes_to_the_edge(env: Env) -> None:
    """Regression: the half-open probe was taken by breaker.allow() before decide() looked at the budget, so a
    request sent to the edge for its deadline used it up and the breaker stayed half-open ('circuit open') forever."""
    r = rig(env, breaker_failures=1, breaker_cooldown_s=2.0)
    r.cloud.fail = CloudError("unavailable", "down")
    r.rank(request(), budget_ms=100.0)
    r.cloud.fail = None  # the cloud recovers
    r.clock.t += 2.0
    tight = r.rank(request(request_id="tight"), budget_ms=5.0)  # too small for the cloud anyway
    assert tight.served_by == "edge"
    # a later request with room for the cloud must get to probe it (and close the breaker)
    for i in range(3):
        r.clock.t += 10.0
        resp = r.rank(request(request_id=f"later{i}"), budget_ms=100.0)
        if resp.served_by == "cloud":
            break
    assert resp.served_by == "cloud", f"stuck on the edge: {resp.reason!r}"
    assert r.router.target("ranker").breaker.state == BreakerState.CLOSED


def test_only_one_request_probes_a_half_open_breaker(env: Env) -> None:
    r = rig(env, breaker_failures=1, breaker_cooldown_s=2.0)
    r.cloud.fail = CloudError("unavailable", "down")
    r.rank(request(), budget_ms=100.0)
    r.cloud.fail = None
    r.clock.t += 2.0

    async def scenario():
        r.cloud.gate = asyncio.Event()  # the probe hangs until released
        probe = asyncio.create_task(r.router.rank(request(request_id="probe"), 100.0))
        await _drain(r.router, lambda: len(r.cloud.calls) == 2)
        others = [await r.router.rank(request(request_id=f"o{i}"), 100.0) for i in range(3)]
        r.cloud.gate.set()
        return await probe, others

    probe, others = asyncio.run(scenario())
    assert probe.served_by == "cloud"
    assert all(o.served_by == "edge" and o.reason.startswith("circuit") for o in others), [o.reason for o in others]
    assert len(r.cloud.calls) == 2  # the failure and the one probe
    assert r.rank(request(request_id="after"), budget_ms=100.0).served_by == "cloud"


def test_budget_too_small_for_the_cloud_goes_to_edge(env: Env) -> None:
    r = rig(env)  # estimate starts at 10 ms, reserve 3 ms
    resp = r.rank(request(), budget_ms=12.0)
    assert (resp.served_by, resp.reason, resp.version) == ("edge", "deadline", "edge")
    assert not r.cloud.calls
    assert r.router.edge_estimate.mean < 2.0, "the edge's measured cost (0 ms on the fake clock) moved its estimate"
    reserve = r.router.edge_estimate.estimate_ms + 1.0
    resp = r.rank(request(), budget_ms=13.5)
    assert resp.served_by == "cloud"
    assert r.cloud.calls[0].timeout_s == pytest.approx((13.5 - reserve) * 1e-3)


def test_time_already_spent_counts_against_the_budget(env: Env) -> None:
    clock_holder: list[Clock] = []

    async def slow_retrieve(user):
        clock_holder[0].t += 0.010  # retrieval takes 10 ms of the budget
        return CANDIDATES

    r = rig(env, retrieve_fn=slow_retrieve)
    clock_holder.append(r.clock)
    resp = r.rank(request(candidates=[]), budget_ms=20.0)  # 10 left < 13 needed
    assert (resp.served_by, resp.reason) == ("edge", "deadline")
    reserve = r.router.edge_estimate.estimate_ms + 1.0  # the edge's measured cost and the margin
    resp = r.rank(request(candidates=[]), budget_ms=40.0)  # 30 left: cloud, with 30 - reserve ms to answer
    assert resp.served_by == "cloud"
    assert r.cloud.calls[-1].timeout_s == pytest.approx((30 - reserve) * 1e-3)
    with pytest.raises(RankError) as info:
        r.rank(request(candidates=[]), budget_ms=8.0)  # passes during retrieval
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert "before ranking could start" in str(info.value)


def test_latency_estimate_learns_from_cloud_calls(env: Env) -> None:
    r = rig(env, cloud_took_s=0.040)  # every cloud call takes 40 ms (fake clock)
    for i in range(40):
        assert r.rank(request(request_id=str(i)), budget_ms=None).served_by == "cloud"
    assert r.router.target("ranker").estimate.mean == pytest.approx(40.0, rel=0.05)
    # a budget that the initial 10 ms estimate would have accepted now goes to the edge
    resp = r.rank(request(), budget_ms=30.0)
    assert (resp.served_by, resp.reason) == ("edge", "deadline")
    assert r.metric("recserve_router_cloud_seconds_count", model="ranker", version="") == 40.0


def test_saturated_cloud_sends_new_requests_to_the_edge(env: Env) -> None:
    r = rig(env, max_inflight=1)

    async def scenario():
        r.cloud.gate = asyncio.Event()
        first = asyncio.create_task(r.router.rank(request(request_id="slow"), None))
        for _ in range(100):  # let the first request reach the cloud
            if r.cloud.calls:
                break
            await asyncio.sleep(0)
        assert r.router.inflight == 1
        second = await r.router.rank(request(request_id="second"), None)
        r.cloud.gate.set()
        return await first, second

    first, second = asyncio.run(scenario())
    assert first.served_by == "cloud"
    assert (second.served_by, second.reason) == ("edge", "cloud saturated")
    assert r.router.inflight == 0
    assert len(r.cloud.calls) == 1


def test_inflight_is_released_after_a_failure(env: Env) -> None:
    r = rig(env, max_inflight=1)
    r.cloud.fail = CloudError("error", "boom")
    r.rank(request(), budget_ms=None)
    assert r.router.inflight == 0
    r.cloud.fail = None
    assert r.rank(request(), budget_ms=None).served_by == "cloud"


# --- refusals ------------------------------------------------------------------------------------------------------


def refused(r: Rig, req: RankRequest, budget_ms: float | None = 100.0) -> RankError:
    with pytest.raises(RankError) as info:
        r.rank(req, budget_ms)
    assert info.value.code in HTTP_STATUS
    return info.value


@pytest.mark.parametrize("budget", [0.0, -5.0])
def test_passed_budget_is_deadline_exceeded(env: Env, budget: float) -> None:
    r = rig(env)
    e = refused(r, request(), budget)
    assert e.code == "DEADLINE_EXCEEDED"
    assert not r.cloud.calls and not r.edge.calls
    assert r.metric("recserve_router_requests_total", model="ranker", code="DEADLINE_EXCEEDED") == 1.0


def test_unknown_model_is_not_found(env: Env) -> None:
    r = rig(env)
    e = refused(r, request(model="nope"))
    assert e.code == "NOT_FOUND" and "nope" in str(e) and "ranker" in str(e)
    # the client's name is not a metric label (it would be unbounded): unknown models count as "unknown"
    assert r.metric("recserve_router_requests_total", model="unknown", code="NOT_FOUND") == 1.0
    assert r.metric("recserve_router_requests_total", model="nope", code="NOT_FOUND") is None


def test_too_many_candidates_is_invalid_argument(env: Env) -> None:
    r = rig(env, max_candidates=5)
    e = refused(r, request(candidates=CANDIDATES[:6]))
    assert e.code == "INVALID_ARGUMENT" and "6 candidates" in str(e)
    assert not r.cloud.calls
    assert r.rank(request(candidates=CANDIDATES[:5]), 100.0).served_by == "cloud"  # exactly the limit is fine


def test_negative_top_k_is_invalid_argument(env: Env) -> None:
    e = refused(rig(env), request(top_k=-1))
    assert e.code == "INVALID_ARGUMENT" and "top_k" in str(e)


def test_empty_candidates_without_a_retriever_is_invalid_argument(env: Env) -> None:
    r = rig(env)
    e = refused(r, request(candidates=[]))
    assert e.code == "INVALID_ARGUMENT" and "retriever" in str(e)
    assert not r.cloud.calls


# --- candidates and top-k ------------------------------------------------------------------------------------------


def test_retrieve_fn_supplies_candidates_when_none_are_given(env: Env) -> None:
    seen: list[dict] = []
    pool = env.items[:20]

    async def retrieve(user):
        seen.append(user)
        return pool

    r = rig(env, retrieve_fn=retrieve)
    resp = r.rank(request(candidates=[], user={"user_id": "42"}, top_k=5), budget_ms=100.0)
    assert seen == [{"user_id": "42"}]
    assert resp.served_by == "cloud" and len(resp.items) == 5
    assert set(resp.items) <= set(pool)
    assert len(r.cloud.calls[0].sparse) == 20  # every retrieved item was scored
    items, _ = expected_order(cloud_scores("ranker", "", r.cloud.calls[0].sparse, r.cloud.calls[0].dense), pool, 5)
    assert list(resp.items) == items
    # with candidates given the retriever is not asked
    r.rank(request(), budget_ms=100.0)
    assert len(seen) == 1


def test_unknown_candidate_ids_are_still_ranked(env: Env) -> None:
    r = rig(env)
    resp = r.rank(request(candidates=["no-such-item", "151", "also-unknown"], top_k=0), budget_ms=100.0)
    assert sorted(resp.items) == sorted(["no-such-item", "151", "also-unknown"])
    assert len(resp.scores) == 3 and all(math.isfinite(s) for s in resp.scores)
    resp = r.rank(request(candidates=["zzz"], top_k=1), budget_ms=100.0)
    assert list(resp.items) == ["zzz"]


@pytest.mark.parametrize("top_k, n", [(0, 6), (1, 1), (3, 3), (6, 6), (50, 6)])
def test_top_k_returns_the_best_k_in_order(env: Env, top_k: int, n: int) -> None:
    r = rig(env)
    resp = r.rank(request(top_k=top_k), budget_ms=100.0)
    assert len(resp.items) == n == len(resp.scores)
    assert list(resp.scores) == sorted(resp.scores, reverse=True)
    call = r.cloud.calls[0]
    items, _ = expected_order(cloud_scores("ranker", "", call.sparse, call.dense), CANDIDATES, top_k)
    assert list(resp.items) == items
    assert len(set(resp.items)) == n


# --- cache ---------------------------------------------------------------------------------------------------------


def test_second_identical_request_is_a_cache_hit(env: Env) -> None:
    r = rig(env, cache_ttl_s=5.0, cache_size=100)
    first = r.rank(request(request_id="one"), budget_ms=100.0)
    second = r.rank(request(request_id="two"), budget_ms=100.0)
    assert first.served_by == "cloud"
    assert (second.served_by, second.reason, second.request_id) == ("cache", "cache hit", "two")
    assert list(second.items) == list(first.items) and list(second.scores) == list(first.scores)
    assert first.request_id == "one" and first.served_by == "cloud"  # the first answer was not altered
    assert len(r.cloud.calls) == 1
    assert r.metric("recserve_router_cache_hits_total") == 1.0
    # a different request (another top_k, user, query or candidate order) is not a hit
    for other in (request(top_k=2), request(user={"user_id": "18"}), request(query="4"),
                  request(candidates=list(reversed(CANDIDATES)))):
        assert r.rank(other, budget_ms=100.0).served_by == "cloud"
    # after the TTL it is asked again
    r.clock.t += 5.0
    assert r.rank(request(request_id="three"), budget_ms=100.0).served_by == "cloud"


def test_edge_answers_are_not_cached(env: Env) -> None:
    r = rig(env, cache_ttl_s=5.0, cache_size=100)
    r.cloud.fail = CloudError("error", "x")
    assert r.rank(request(), budget_ms=100.0).served_by == "edge"
    r.cloud.fail = None
    assert r.rank(request(), budget_ms=100.0).served_by == "cloud"


# --- versions, shadow, blending ------------------------------------------------------------------------------------


def test_version_is_chosen_by_the_policy_with_the_injected_rng(env: Env) -> None:
    r = rig(env)
    r.router.policy.set(RoutingPolicy.model_validate(
        {"models": {"ranker": {"versions": {"1": 30, "2": 70}, "assignment": {"by": "random"}}}}))
    for u, version in [(0.0, "1"), (0.29, "1"), (0.3, "2"), (0.99, "2")]:
        r.rng.value = u
        resp = r.rank(request(request_id=str(u)), budget_ms=100.0)
        assert resp.served_by == "cloud" and resp.version == version
        assert r.cloud.calls[-1].version == version
        fake = cloud_scores("ranker", version, r.cloud.calls[-1].sparse, r.cloud.calls[-1].dense)
        assert list(resp.items) == expected_order(fake, CANDIDATES, 3)[0]
    assert r.metric("recserve_router_requests_total", model="ranker", route="cloud", version="2") == 2.0


def test_policy_file_is_followed_after_it_changes(env: Env, tmp_path: Path) -> None:
    f = tmp_path / "policy.json"
    write_policy(RoutingPolicy.model_validate({"models": {"ranker": {"versions": {"1": 100, "2": 0}}}}), f)
    r = rig(env, policy_file=str(f))
    r.rng.value = 0.99
    assert r.rank(request(), budget_ms=100.0).version == "1"
    write_policy(RoutingPolicy.model_validate({"models": {"ranker": {"versions": {"1": 0, "2": 100}}}}), f)
    r.rng.value = 0.0
    assert r.rank(request(), budget_ms=100.0).version == "1"  # not re-read within the interval
    r.clock.t += 1.0
    assert r.rank(request(), budget_ms=100.0).version == "2"
    assert r.metric("recserve_router_policy_reloads") == 2.0


async def _drain(router: Router, until, steps: int = 200) -> None:
    for _ in range(steps):
        if until():
            return
        await asyncio.sleep(0)
    raise AssertionError("the shadow call did not finish")


def test_shadow_traffic_is_mirrored_and_measured(env: Env) -> None:
    r = rig(env)
    r.router.policy.set(RoutingPolicy.model_validate(
        {"models": {"ranker": {"versions": {"1": 100}, "shadow_percent": 100, "shadow_version": "2"}}}))

    async def one(top_k: int, shadows_done: float):
        resp = await r.router.rank(request(top_k=top_k), 100.0)
        await _drain(r.router, lambda: r.metric("recserve_router_shadow_overlap_count", model="ranker",
                                                version="2") == shadows_done)
        return resp

    resp = asyncio.run(one(3, 1.0))
    assert (resp.served_by, resp.version) == ("cloud", "1")
    assert [c.version for c in r.cloud.calls] == ["1", "2"]
    np.testing.assert_array_equal(r.cloud.calls[1].sparse, r.cloud.calls[0].sparse)  # the same rows mirrored
    assert r.metric("recserve_router_shadow_requests_total", model="ranker", version="2") == 1.0
    # v2 ranks in exactly the opposite order: top-3 of 6 candidates share nothing
    assert r.metric("recserve_router_shadow_overlap_sum", model="ranker", version="2") == 0.0
    served, shadow = (cloud_scores("ranker", v, r.cloud.calls[0].sparse, r.cloud.calls[0].dense) for v in ("1", "2"))
    drift = float(np.mean(np.abs(shadow - served)))
    assert r.metric("recserve_router_shadow_score_drift_sum", model="ranker", version="2") == pytest.approx(drift)
    # the response is the served version's, not the shadow's
    assert list(resp.items) == expected_order(served, CANDIDATES, 3)[0]

    asyncio.run(one(0, 2.0))  # all candidates: full overlap
    assert r.metric("recserve_router_shadow_overlap_sum", model="ranker", version="2") == 1.0


def _scraped(r: Rig) -> dict:
    """The router's metrics as the operator's ``observe.scrape`` keys them."""
    scraped: dict = {}
    for family in text_string_to_metric_families(r.router.metrics.exposition().decode()):
        for smp in family.samples:
            name = smp.name[:-len("_total")] if family.type == "counter" and smp.name.endswith("_total") else smp.name
            scraped.setdefault(name, []).append((smp.labels, smp.value))
    return scraped


def test_cloud_and_shadow_metrics_name_the_triton_model_whose_versions_they_count(env: Env) -> None:
    """The router's model (``ranker``) serves Triton's ``ranker_v``: the per-version metrics the operator
    reads for a ModelRollout of ``ranker_v`` carry that name (the request counts keep the router's)."""
    from recserve.operator.observe import router_counters, shadow_agreement

    r = rig(env, rankers=[{"triton_model": "ranker_v", "edge_model": str(env.ranker / "model.onnx")}])
    r.router.policy.set(RoutingPolicy.model_validate(
        {"models": {"ranker_v": {"versions": {"1": 100}, "shadow_percent": 100, "shadow_version": "2"}}}))

    async def one():
        resp = await r.router.rank(request(top_k=0), 100.0)
        await _drain(r.router, lambda: r.metric("recserve_router_shadow_overlap_count", model="ranker_v",
                                                version="2") == 1.0)
        return resp

    assert asyncio.run(one()).version == "1"
    scraped = _scraped(r)
    assert router_counters(scraped, "ranker_v", "1", None).success == 1.0
    assert shadow_agreement(scraped, "ranker_v", "2") == 1.0  # all candidates: full overlap
    assert r.metric("recserve_router_requests_total", model="ranker", version="1", route="cloud") == 1.0


def test_the_policy_splits_between_triton_models_as_between_versions(env: Env) -> None:
    """An ONNX -> TensorRT canary: Triton serves each model's versions with one platform, so the TensorRT build
    is its own model (``ranker_trt``) and the policy splits ``ranker``'s traffic with a version of it
    (``ranker_trt:1``). Requests drawn for it go to that model; its breaker, metrics and shadow are its own."""
    from recserve.operator.observe import router_counters

    r = rig(env)
    r.router.policy.set(RoutingPolicy.model_validate(
        {"models": {"ranker": {"versions": {"1": 50, "ranker_trt:1": 50}, "assignment": {"by": "random"},
                               "shadow_percent": 100, "shadow_version": "ranker_trt:1"}}}))

    async def one(u: float, shadows: float):
        r.rng.value = u
        resp = await r.router.rank(request(request_id=str(u)), 100.0)
        await _drain(r.router, lambda: (r.metric("recserve_router_shadow_requests_total", model="ranker_trt",
                                                 version="1") or 0.0) == shadows)
        return resp

    resp = asyncio.run(one(0.9, 0.0))  # drawn for the other model: no shadow of the version that served
    assert (resp.served_by, resp.version) == ("cloud", "ranker_trt:1")
    assert [(c.model, c.version) for c in r.cloud.calls] == [("ranker_trt", "1")]
    fake = cloud_scores("ranker_trt", "1", r.cloud.calls[-1].sparse, r.cloud.calls[-1].dense)
    assert list(resp.items) == expected_order(fake, CANDIDATES, 3)[0]
    resp = asyncio.run(one(0.1, 1.0))  # drawn for ranker v1, mirrored to ranker_trt v1
    assert (resp.served_by, resp.version) == ("cloud", "1")
    assert [(c.model, c.version) for c in r.cloud.calls[1:]] == [("ranker", "1"), ("ranker_trt", "1")]
    # the per-version metrics a ModelRollout reads name the Triton model that answered
    scraped = _scraped(r)
    assert router_counters(scraped, "ranker_trt", "1", None).success == 1.0
    assert router_counters(scraped, "ranker", "1", None).success == 1.0
    # one breaker per Triton model version: the other model failing opens only its own circuit
    r.cloud.fail = CloudError("error", "down")
    for i in range(10):
        r.rng.value = 0.9
        assert r.rank(request(request_id=f"f{i}"), budget_ms=100.0).served_by == "edge"
    assert r.metric("recserve_router_circuit_state", model="ranker_trt", version="1") == 2.0
    assert r.metric("recserve_router_circuit_state", model="ranker", version="1") == 0.0


@pytest.mark.parametrize("version", [":1", "ranker_trt:", ""])
def test_a_policy_version_must_name_a_version(version: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="another model's"):
        RoutingPolicy.model_validate({"models": {"ranker": {"versions": {version: 100}}}})


def test_shadow_percent_zero_and_shadow_failures(env: Env) -> None:
    r = rig(env)
    r.router.policy.set(RoutingPolicy.model_validate(
        {"models": {"ranker": {"versions": {"1": 100}, "shadow_percent": 50, "shadow_version": "2"}}}))
    r.rng.value = 0.7  # above 50 %: no shadow
    asyncio.run(r.router.rank(request(), 100.0))
    assert [c.version for c in r.cloud.calls] == ["1"]

    r.rng.value = 0.1
    r.cloud.fail_versions = {"2"}

    async def go():
        resp = await r.router.rank(request(), 100.0)
        await _drain(r.router, lambda: r.metric("recserve_router_shadow_failures_total", model="ranker",
                                                version="2") == 1.0)
        return resp

    resp = asyncio.run(go())
    assert resp.served_by == "cloud"  # a failing shadow never affects the answer
    assert [c.version for c in r.cloud.calls] == ["1", "1", "2"]
    assert r.router.target("ranker").breaker.failures == 0, "shadow failures must not trip the breaker"
    assert r.metric("recserve_router_shadow_overlap_count", model="ranker", version="2") in (None, 0.0)


def test_edge_and_cache_answers_are_not_shadowed(env: Env) -> None:
    r = rig(env, cache_ttl_s=5.0)
    r.router.policy.set(RoutingPolicy.model_validate(
        {"models": {"ranker": {"versions": {"1": 100}, "shadow_percent": 100, "shadow_version": "2"}}}))
    assert r.rank(request(), budget_ms=5.0).served_by == "edge"
    assert not r.cloud.calls
    r.cloud.fail = CloudError("error", "x")
    assert r.rank(request(), budget_ms=100.0).served_by == "edge"
    assert [c.version for c in r.cloud.calls] == ["1"]


def test_two_rankers_are_blended_by_weight(env: Env) -> None:
    edge_a, edge_b = env.ranker / "model.onnx", env.ranker.parent / "b_model.onnx"
    rankers = [{"triton_model": "ranker", "edge_model": str(edge_a), "weight": 0.7},
               {"triton_model": "ranker_b", "edge_model": str(edge_b), "weight": 0.3}]
    r = rig(env, rankers=rankers)
    assert set(r.edge.loaded) == {edge_a, edge_b}
    r.router.policy.set(RoutingPolicy.model_validate({"models": {"ranker": {"versions": {"2": 1}}}}))
    resp = r.rank(request(top_k=0), budget_ms=100.0)
    assert resp.served_by == "cloud"
    by_model = {c.model: c for c in r.cloud.calls}
    assert set(by_model) == {"ranker", "ranker_b"}
    assert by_model["ranker"].version == "2" and by_model["ranker_b"].version == ""  # the policy picks the primary's
    sparse, dense = by_model["ranker"].sparse, by_model["ranker"].dense
    blended = 0.7 * cloud_scores("ranker", "2", sparse, dense) + 0.3 * cloud_scores("ranker_b", "", sparse, dense)
    items, scores = expected_order(blended, CANDIDATES, 0)
    assert list(resp.items) == items
    np.testing.assert_allclose(resp.scores, scores, rtol=1e-5)

    # the edge blends its two models the same way
    r.cloud.fail = CloudError("unavailable", "x")
    resp = r.rank(request(top_k=0), budget_ms=100.0)
    assert resp.served_by == "edge"
    blended = 0.7 * edge_scores(edge_a, sparse, dense) + 0.3 * edge_scores(edge_b, sparse, dense)
    items, scores = expected_order(blended, CANDIDATES, 0)
    assert list(resp.items) == items
    np.testing.assert_allclose(resp.scores, scores, rtol=1e-5)


# --- with the real edge scorer and the real retriever ------------------------------------------------------------------


def test_real_edge_scorer_gives_the_onnx_models_scores(env: Env) -> None:
    import onnxruntime as ort

    clock = Clock()
    cloud = FakeCloud()
    cloud.fail = CloudError("unavailable", "down")
    router = Router(config(env), cloud=cloud, clock=clock, rng=Rng())
    resp = asyncio.run(router.rank(request(top_k=0), 100.0))
    assert resp.served_by == "edge"
    sess = ort.InferenceSession(str(env.ranker / "model.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"sparse": cloud.calls[0].sparse, "dense": cloud.calls[0].dense})[0].ravel()
    items, scores = expected_order(want, CANDIDATES, 0)
    assert list(resp.items) == items
    np.testing.assert_allclose(resp.scores, scores, rtol=1e-5, atol=1e-6)


def test_configured_retriever_returns_catalog_items(env: Env, retrieval_catalog: Path) -> None:
    repo = retrieval_catalog
    retriever = {"user_tower": str(repo / "user_tower" / "1" / "model.onnx"),
                 "preprocessing": str(repo / "user_tower" / "1" / "preprocessing.json"),
                 "catalog": str(repo / "item_index" / "1"), "candidates": 25}
    r = rig(env, retriever=retriever)
    assert r.router.retriever is not None
    resp = r.rank(request(candidates=[], user={"user_id": "17"}, top_k=0), budget_ms=100.0)
    catalog_items = set(r.router.retriever.index.item_ids.tolist())
    assert resp.served_by == "cloud"
    assert len(resp.items) == 25 and len(set(resp.items)) == 25
    assert set(resp.items) <= catalog_items
    # the same user retrieves the same candidates; another user other ones
    again = r.rank(request(candidates=[], user={"user_id": "17"}, top_k=0, request_id="b"), budget_ms=100.0)
    assert set(again.items) == set(resp.items)
    other = r.rank(request(candidates=[], user={"user_id": "250"}, top_k=0, request_id="c"), budget_ms=100.0)
    assert set(other.items) <= catalog_items and set(other.items) != set(resp.items)


def test_close_cancels_pending_shadow_calls_and_closes_the_cloud(env: Env) -> None:
    r = rig(env)
    r.router.policy.set(RoutingPolicy.model_validate(
        {"models": {"ranker": {"versions": {"1": 100}, "shadow_percent": 100, "shadow_version": "2"}}}))

    async def scenario():
        r.cloud.gate, r.cloud.gate_versions = asyncio.Event(), {"2"}  # the shadow version never answers
        resp = await r.router.rank(request(), None)
        await _drain(r.router, lambda: len(r.cloud.calls) == 2)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert len(pending) == 1 and not pending[0].done()
        await r.router.close()
        for _ in range(10):
            await asyncio.sleep(0)
        return resp, pending[0]

    resp, shadow = asyncio.run(scenario())
    assert resp.served_by == "cloud"
    assert shadow.cancelled()
    assert r.cloud.closed


# --- sticky canary assignment, one policy per request ----------------------------------------------------------------


def split(**assignment) -> RoutingPolicy:
    return RoutingPolicy.model_validate({"models": {"ranker": {"versions": {"1": 50, "2": 50},
                                                              **({"assignment": assignment} if assignment else {})}}})


def test_a_user_stays_on_one_version_whatever_the_random_draw(env: Env) -> None:
    r = rig(env)
    r.router.policy.set(split())
    seen: dict[str, set[str]] = {}
    for user in range(60):
        for u in (0.0, 0.49, 0.51, 0.99):
            r.rng.value = u
            resp = r.rank(request(user={"user_id": str(user)}), budget_ms=100.0)
            seen.setdefault(str(user), set()).add(resp.version)
    assert all(len(v) == 1 for v in seen.values()), "a user flipped between versions"
    on_2 = sum(v == {"2"} for v in seen.values())
    assert 15 <= on_2 <= 45, f"a 50/50 split put {on_2} of 60 users on v2"
    assert r.metric("recserve_router_unsticky_requests_total", model="ranker") is None


def test_growing_the_canary_keeps_its_users_and_a_new_salt_reshuffles(env: Env) -> None:
    r = rig(env)
    users = [str(u) for u in range(80)]

    def on_candidate(policy: RoutingPolicy) -> set[str]:
        r.router.policy.set(policy)
        return {u for u in users if r.rank(request(user={"user_id": u}), budget_ms=100.0).version == "2"}

    def weights(candidate: int, salt: str = "s") -> RoutingPolicy:
        return RoutingPolicy.model_validate({"models": {"ranker": {
            "versions": {"1": 100 - candidate, "2": candidate}, "assignment": {"salt": salt}}}})

    ten, fifty = on_candidate(weights(10)), on_candidate(weights(50))
    assert ten and ten < fifty, "users on the candidate at 10% stay on it at 50%"
    assert on_candidate(weights(50, salt="another rollout")) != fifty


def test_the_assignment_key_is_configurable_and_its_absence_is_counted(env: Env) -> None:
    r = rig(env)
    r.router.policy.set(split(key="session"))
    versions = set()
    for u in (0.1, 0.9):
        r.rng.value = u
        versions.add(r.rank(request(user={"user_id": "5", "session": "abc"}), budget_ms=100.0).version)
    assert len(versions) == 1, "hashed on the session key"
    resp = r.rank(request(user={"user_id": "5", "session": "abc"}), budget_ms=100.0)
    assert "unknown feature keys" not in resp.reason, "the assignment key is a key the router reads"
    r.rng.value = 0.9
    assert r.rank(request(user={"user_id": "5"}), budget_ms=100.0).version == "2", "no key: the random draw"
    assert r.metric("recserve_router_unsticky_requests_total", model="ranker") == 1.0


def test_random_assignment_follows_the_draw(env: Env) -> None:
    r = rig(env)
    r.router.policy.set(split(by="random"))
    for u, version in ((0.1, "1"), (0.9, "2")):
        r.rng.value = u
        assert r.rank(request(), budget_ms=100.0).version == version


def test_the_shadow_follows_the_policy_the_request_started_with(env: Env) -> None:
    r = rig(env)
    r.router.policy.set(RoutingPolicy.model_validate(
        {"models": {"ranker": {"versions": {"1": 100}, "shadow_percent": 100, "shadow_version": "2"}}}))
    r.cloud.gate = asyncio.Event()

    async def go() -> RankResponse:
        task = asyncio.create_task(r.router.rank(request(), 100.0))
        await asyncio.sleep(0)
        # while the cloud call is in flight, the policy changes: no more shadow
        r.router.policy.set(RoutingPolicy.model_validate({"models": {"ranker": {"versions": {"1": 100}}}}))
        r.cloud.gate.set()
        resp = await task
        await asyncio.gather(*r.router._shadow_tasks)
        return resp

    resp = asyncio.run(go())
    assert resp.version == "1"
    assert [c.version for c in r.cloud.calls] == ["1", "2"], "the shadow of the snapshot the request was served by"


# --- the quality ladder: measured edge cost, the last rung ------------------------------------------------------------


class SlowEdge(FakeEdge):
    def __init__(self, clock: Clock, took_s: float):
        super().__init__()
        self.clock, self.took_s = clock, took_s

    def score(self, path, sparse, dense) -> np.ndarray:
        self.clock.t += self.took_s
        return super().score(path, sparse, dense)


def test_the_edge_cost_is_measured_not_assumed(env: Env) -> None:
    clock, rng = Clock(), Rng()
    edge = SlowEdge(clock, 0.012)  # the edge takes 12 ms, not the configured 2
    router = Router(config(env), cloud=FakeCloud(clock), edge=edge, clock=clock, rng=rng)
    breaker = router.target("ranker").breaker
    breaker.record_failure(), breaker.record_failure(), breaker.record_failure()  # open: edge
    for _ in range(30):
        asyncio.run(router.rank(request(), 1000.0))
    assert router.edge_estimate.mean == pytest.approx(12.0, rel=0.1)
    assert sample(router.metrics.exposition(), "recserve_router_edge_seconds_count", model="ranker") == 30.0
    # 10 ms left is enough for the configured 2 ms, not for the measured 12: the last rung answers
    resp = asyncio.run(router.rank(request(), 10.0))
    assert resp.served_by == "fallback"


def test_no_time_for_cloud_or_edge_answers_the_candidates_in_their_given_order(env: Env) -> None:
    r = rig(env)  # edge 2 ms + margin 1 ms
    resp = r.rank(request(top_k=4), budget_ms=2.5)
    assert (resp.served_by, resp.version) == ("fallback", "")
    assert list(resp.items) == CANDIDATES[:4] and not resp.scores, "given order, no scores: no model ranked them"
    assert resp.reason == "deadline; no time left for the edge: the candidates in their given order"
    assert not r.cloud.calls and not r.edge.calls
    assert r.metric("recserve_router_fallbacks_total", model="ranker", kind="given_order") == 1.0
    assert r.metric("recserve_router_requests_total", model="ranker", route="fallback", code="OK") == 1.0


def test_the_last_rung_prefers_a_stale_cached_answer(env: Env) -> None:
    r = rig(env, cache_ttl_s=5.0, stale_s=60.0)
    fresh = r.rank(request(), budget_ms=100.0)
    assert fresh.served_by == "cloud"
    r.clock.t += 10.0  # past the TTL: no longer a cache hit
    resp = r.rank(request(request_id="late"), budget_ms=2.5)
    assert (resp.served_by, resp.request_id) == ("fallback", "late")
    assert list(resp.items) == list(fresh.items) and list(resp.scores) == list(fresh.scores)
    assert resp.reason.endswith("a cached answer 10.0 s old")
    assert r.metric("recserve_router_fallbacks_total", model="ranker", kind="stale") == 1.0
    r.clock.t += 60.0  # too stale
    assert r.rank(request(), budget_ms=2.5).reason.endswith("given order")


def test_a_cloud_failure_with_no_time_left_for_the_edge_takes_the_last_rung(env: Env) -> None:
    r = rig(env, cloud_took_s=0.098)  # the failed call used 98 of the 100 ms
    r.cloud.fail = CloudError("timeout", "slow")
    resp = r.rank(request(), budget_ms=100.0)
    assert resp.served_by == "fallback" and not r.edge.calls
    assert resp.reason.startswith("cloud failed; no time left for the edge")


# --- unknown inputs --------------------------------------------------------------------------------------------------


def test_unknown_items_and_keys_are_counted_and_reported(env: Env) -> None:
    r = rig(env)
    resp = r.rank(request(candidates=["151", "nope", "49", "gone"], user={"user_id": "17", "colour": "red"},
                          numeric={"query_category_match": 1.0, "weather": 3.0}), budget_ms=100.0)
    assert resp.served_by == "cloud" and len(resp.items) == 3
    assert resp.reason == "within budget; 2 unknown item ids; unknown feature keys: colour, weather"
    assert r.metric("recserve_router_unknown_items_total", model="ranker") == 2.0
    assert r.metric("recserve_router_unknown_keys_total", model="ranker") == 2.0
    clean = r.rank(request(), budget_ms=100.0)
    assert clean.reason == "within budget", "known inputs: nothing to report"


def test_a_strict_policy_refuses_unknown_inputs(env: Env) -> None:
    r = rig(env)
    r.router.policy.set(RoutingPolicy.model_validate({"unknown_inputs": "refuse"}))
    with pytest.raises(RankError) as info:
        r.rank(request(candidates=["151", "nope"]), budget_ms=100.0)
    assert info.value.code == "INVALID_ARGUMENT" and "1 unknown item id" in str(info.value)
    with pytest.raises(RankError, match="unknown feature keys: colour"):
        r.rank(request(user={"user_id": "17", "colour": "red"}), budget_ms=100.0)
    assert not r.cloud.calls
    assert r.rank(request(), budget_ms=100.0).served_by == "cloud"


# --- the replica's own gRPC server -------------------------------------------------------------------------------------


def test_budget_is_the_grpc_deadline_shortened_by_the_header() -> None:
    from recserve.serving.grpc_server import budget_ms

    assert budget_ms((), None) is None
    assert budget_ms((), 0.25) == pytest.approx(250.0)
    assert budget_ms((("x-budget-ms", "100"),), 0.25) == pytest.approx(100.0)
    assert budget_ms((("x-budget-ms", "900"),), 0.25) == pytest.approx(250.0), "a header cannot extend the deadline"
    assert budget_ms((("x-budget-ms", "40"),), None) == pytest.approx(40.0)
    for bad in ("soon", "nan", "inf"):
        with pytest.raises(RankError, match="finite number"):
            budget_ms((("x-budget-ms", bad),), 0.25)


def test_the_replica_grpc_server_answers_refuses_and_bounds_requests(env: Env) -> None:
    import grpc

    from recserve.errors import ServerError
    from recserve.serving.grpc_server import MAX_REQUEST_BYTES, start_server
    from recserve.serving.protos.recommender_pb2_grpc import RecommenderStub
    from recserve.triton.server import free_port

    async def go() -> None:
        clock, rng = Clock(), Rng()
        cloud = FakeCloud()
        router = Router(config(env), cloud=cloud, edge=FakeEdge(), clock=clock, rng=rng)
        port = free_port()
        server, bound = await start_server(router, [port, port + 1], "127.0.0.1")
        try:
            assert bound == port
            with pytest.raises(ServerError, match="no free port"):  # a second replica on the same single port
                await start_server(router, [port], "127.0.0.1")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = RecommenderStub(channel)
                resp = await stub.Rank(request(request_id="g1"), timeout=0.2)
                assert (resp.request_id, resp.served_by, len(resp.items)) == ("g1", "cloud", 3)
                # the call's deadline is the budget: the cloud got it less the edge reserve
                assert 0.15 < cloud.calls[-1].timeout_s < 0.2
                for req, code in [(request(model="nope"), grpc.StatusCode.NOT_FOUND),
                                  (request(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT)]:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Rank(req, timeout=1.0)
                    assert info.value.code() == code and info.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Rank(request(), timeout=1.0, metadata=(("x-budget-ms", "soon"),))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                huge = request(user={"user_id": "17", "blob": "x" * MAX_REQUEST_BYTES})
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Rank(huge, timeout=1.0)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert (await stub.Rank(request(), timeout=1.0)).served_by == "cloud", "still serving"
        finally:
            await server.stop(None)

    asyncio.run(go())


@pytest.mark.parametrize("value, seconds", [(b"100m", 0.1), (b"2S", 2.0), (b"1M", 60.0), (b"1H", 3600.0),
                                            (b"250000u", 0.25), (b"5n", 5e-9), (None, None), (b"", None),
                                            (b"10", None), (b"xS", None), (b"1.5S", None)])
def test_grpc_timeout_header(value, seconds) -> None:
    from recserve.serving.grpc_wire import grpc_timeout_s

    assert grpc_timeout_s(value) == (pytest.approx(seconds) if seconds is not None else None)


def test_the_replica_grpc_server_serves_many_calls_on_one_connection_and_refuses_other_methods(env: Env) -> None:
    import grpc

    from recserve.serving.grpc_server import start_server
    from recserve.serving.protos.recommender_pb2_grpc import RecommenderStub
    from recserve.triton.server import free_port

    async def go() -> None:
        router = Router(config(env, max_candidates=1000), cloud=FakeCloud(), edge=FakeEdge(), clock=Clock(), rng=Rng())
        server, port = await start_server(router, [free_port()], "127.0.0.1")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = RecommenderStub(channel)
                # 200 calls at once on one connection, every answer whole (all 500 items: ~10 KB each)
                answers = await asyncio.gather(*(stub.Rank(request(request_id=str(i), candidates=env.items, top_k=0),
                                                           timeout=10.0) for i in range(200)))
                assert sorted(int(a.request_id) for a in answers) == list(range(200))
                assert all(len(a.items) == len(env.items) == len(a.scores) for a in answers)
                other = channel.unary_unary("/recserve.Recommender/Other")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await other(b"", timeout=1.0)
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
                garbage = channel.unary_unary("/recserve.Recommender/Rank")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await garbage(b"\xff\xff\xff", timeout=1.0)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert (await stub.Rank(request(), timeout=1.0)).served_by == "cloud", "the connection still serves"
            await server.stop(grace=1.0)
            with pytest.raises(OSError):  # stopped: nothing listens
                await asyncio.open_connection("127.0.0.1", port)
        finally:
            await server.stop()

    asyncio.run(go())


def test_a_call_delayed_by_a_busy_replica_counts_the_wait_and_one_given_up_costs_nothing(env: Env) -> None:
    """A flood: while the replica's loop is busy, calls whose callers give up (the client resets them at their
    deadline) are never ranked; and calls that wait in the loop behind others have that wait counted
    against their budgets: the cloud is given what is really left of them."""
    import threading
    import time

    import grpc

    from recserve.serving.grpc_server import start_server
    from recserve.serving.protos.recommender_pb2_grpc import RecommenderStub
    from recserve.triton.server import free_port

    class BusyCloud(FakeCloud):
        busy_s = 0.0

        async def score(self, *args):
            time.sleep(self.busy_s)  # work on the loop: the calls behind it wait
            return await super().score(*args)

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    cloud = BusyCloud()

    async def up():
        router = Router(config(env, coalesce=False), cloud=cloud, edge=FakeEdge(), rng=Rng())
        return router, *(await start_server(router, [free_port()], "127.0.0.1"))

    router, server, port = asyncio.run_coroutine_threadsafe(up(), loop).result(10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = RecommenderStub(channel)
            assert stub.Rank(request(), timeout=1.0).served_by == "cloud"
            before = len(cloud.calls)
            loop.call_soon_threadsafe(time.sleep, 0.15)  # the replica stalls...
            time.sleep(0.01)
            given_up = [stub.Rank.future(request(request_id=f"a{i}"), timeout=0.05) for i in range(20)]  # ...calls come
            assert all(c.exception() is not None and c.code() == grpc.StatusCode.DEADLINE_EXCEEDED for c in given_up)
            time.sleep(0.2)
            assert len(cloud.calls) == before, "the calls given up were never ranked"
            cloud.busy_s = 0.01
            patient = [stub.Rank.future(request(request_id=f"b{i}"), timeout=1.0) for i in range(20)]
            assert all(c.result().served_by == "cloud" for c in patient)
        timeouts = sorted(c.timeout_s for c in cloud.calls[before:])
        assert timeouts[-1] - timeouts[0] > 0.1, "the last call's budget lost the ~190 ms it waited behind the others"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


def test_oversized_metadata_is_refused_and_the_server_keeps_serving(env: Env) -> None:
    import grpc

    from recserve.serving.grpc_server import MAX_HEADER_BYTES, start_server
    from recserve.serving.protos.recommender_pb2_grpc import RecommenderStub
    from recserve.triton.server import free_port

    async def go() -> None:
        router = Router(config(env), cloud=FakeCloud(), edge=FakeEdge(), clock=Clock(), rng=Rng())
        server, port = await start_server(router, [free_port()], "127.0.0.1")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError):
                    await RecommenderStub(channel).Rank(request(), timeout=2.0,
                                                        metadata=(("x-big", "a" * (2 * MAX_HEADER_BYTES)),))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert (await RecommenderStub(channel).Rank(request(), timeout=2.0)).served_by == "cloud"
        finally:
            await server.stop()

    asyncio.run(go())


# --- faults: per-version breakers, cancelled probes, hedging, limits (issue 16) ------------------------------------


def _split(r: Rig, stable: int, candidate: int) -> None:
    r.router.policy.set(RoutingPolicy.model_validate(
        {"models": {"ranker": {"versions": {"1": stable, "2": candidate}, "assignment": {"by": "random"}}}}))


def test_a_failing_canary_opens_only_its_own_circuit(env: Env) -> None:
    """One breaker per Triton model version: the candidate's failures open its circuit, and the stable version's
    requests keep going to the cloud (they used to share one breaker and all fall to the edge)."""
    r = rig(env, breaker_failures=3)
    _split(r, 50, 50)
    r.cloud.fail_versions = {"2"}
    served = {"1": [], "2": []}
    for i in range(40):
        r.rng.value = 0.25 if i % 2 else 0.75  # alternate the draw: below 0.5 is v1, above v2
        resp = r.rank(request(request_id=f"c{i}"), budget_ms=100.0)
        served["1" if i % 2 else "2"].append(resp.served_by)
    assert served["1"] == ["cloud"] * 20, "the stable version's requests must stay on the cloud"
    assert set(served["2"]) == {"edge"}
    assert r.router.target("ranker", "2").breaker.state == BreakerState.OPEN
    assert r.router.target("ranker", "1").breaker.state == BreakerState.CLOSED
    assert r.metric("recserve_router_circuit_state", model="ranker", version="2") == 2.0
    assert r.metric("recserve_router_circuit_state", model="ranker", version="1") == 0.0
    assert r.router.degraded() == ["ranker v2: circuit open"]
    assert sum(1 for c in r.cloud.calls if c.version == "2") == 3  # then the open circuit kept them out


def test_a_cancelled_probe_does_not_wedge_the_breaker(env: Env) -> None:
    """Regression: the client cancelled the half-open probe while the router waited on the cloud; the breaker
    recorded no outcome, kept its probe taken, and answered 'circuit open' until the router restarted."""
    r = rig(env, breaker_failures=1, breaker_cooldown_s=2.0)
    r.cloud.fail = CloudError("unavailable", "down")
    r.rank(request(), budget_ms=100.0)  # opens
    r.cloud.fail = None
    r.clock.t += 2.0

    async def scenario(budget):
        r.cloud.gate = asyncio.Event()  # the probe hangs
        before = len(r.cloud.calls)
        probe = asyncio.create_task(r.router.rank(request(request_id="probe"), budget))
        await _drain(r.router, lambda: len(r.cloud.calls) == before + 1)
        assert r.router.target("ranker").breaker.state == BreakerState.HALF_OPEN
        probe.cancel()  # the client gives up
        with pytest.raises(asyncio.CancelledError):
            await probe
        gate, r.cloud.gate = r.cloud.gate, None
        gate.set()  # the cloud would answer now: the call was cancelled with its client
        for _ in range(5):
            await asyncio.sleep(0)
        return await r.router.rank(request(request_id="next"), 100.0)

    for budget in (None, 1000.0):  # without and with a deadline
        nxt = asyncio.run(scenario(budget))
        assert nxt.served_by == "cloud", f"budget {budget}: wedged: {nxt.reason!r}"
        assert r.router.target("ranker").breaker.state == BreakerState.CLOSED
        r.cloud.fail = CloudError("unavailable", "down")  # open it again for the second round
        r.rank(request(), budget_ms=100.0)
        r.cloud.fail = None
        r.clock.t += 2.0


def test_a_probe_that_never_ends_is_given_up(env: Env) -> None:
    """A watchdog for a lost call (a bug, never a normal path): a probe with no outcome after probe_timeout_s
    no longer holds the half-open circuit."""
    r = rig(env, breaker_failures=1, breaker_cooldown_s=2.0)
    breaker = r.router.target("ranker").breaker
    breaker.record_failure()
    r.clock.t += 2.0
    assert breaker.allow()  # a probe goes out and is never heard of again
    assert not breaker.available()
    r.clock.t += breaker.probe_timeout_s
    assert r.rank(request(), budget_ms=100.0).served_by == "cloud"
    assert breaker.state == BreakerState.CLOSED


def test_a_hung_cloud_is_answered_by_the_edge_within_the_budget(env: Env) -> None:
    """The cloud does not answer, and this scorer ignores its timeout: the router's own timeout ends the call
    when only the edge still fits, the edge answers in time, and the timeout reaches the breaker."""
    import time

    cloud, edge = FakeCloud(), FakeEdge()
    router = Router(config(env, coalesce=False, margin_share=0.1), cloud=cloud, edge=edge, rng=Rng())

    async def scenario():
        cloud.gate = asyncio.Event()  # hung
        t0 = time.monotonic()
        resp = await router.rank(request(), 200.0)
        return resp, time.monotonic() - t0

    resp, took = asyncio.run(scenario())
    assert (resp.served_by, resp.reason) == ("edge", "cloud failed: answered from edge")
    assert 0.150 < took < 0.200  # at 200 - margin (21 ms) - the edge's cost: within the budget
    assert router.target("ranker").breaker.failures == 1
    assert sample(router.metrics.exposition(), "recserve_router_cloud_failures_total", model="ranker",
                  kind="timeout") == 1.0


@pytest.mark.parametrize("budget", [1e13, float("inf")])
def test_budgets_above_the_maximum_are_clamped(env: Env, budget: float) -> None:
    r = rig(env, max_budget_ms=5000.0)
    assert r.rank(request(), budget_ms=budget).served_by == "cloud"
    assert r.cloud.calls[0].timeout_s == pytest.approx((5000.0 - 3.0) / 1e3)


@pytest.mark.parametrize("field", ["candidate", "request_id", "user_value", "user_key", "query"])
def test_overlong_ids_are_refused_and_not_echoed(env: Env, field: str) -> None:
    from recserve.serving.router import MAX_ID_CHARS

    long = "x" * 100_000
    kw = {"candidate": {"candidates": [*CANDIDATES, long]}, "request_id": {"request_id": long},
          "user_value": {"user": {"user_id": long}}, "user_key": {"user": {long: "1"}}, "query": {"query": long}}[field]
    r = rig(env)
    with pytest.raises(RankError) as info:
        r.rank(request(**kw), budget_ms=100.0)
    assert info.value.code == "INVALID_ARGUMENT" and str(MAX_ID_CHARS) in str(info.value)
    assert len(str(info.value)) < 300


def test_an_unknown_model_name_is_not_echoed_whole(env: Env) -> None:
    r = rig(env)
    with pytest.raises(RankError) as info:
        r.rank(request(model="m" * 10_000), budget_ms=100.0)
    assert info.value.code == "NOT_FOUND" and len(str(info.value)) < 300
