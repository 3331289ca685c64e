"""Requests built ahead of a run (so the generator's own cost per request stays tiny), and the async
calls that send them: raw KServe v2 gRPC for Triton, the Recommender stub for the router."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from recserve.loadtest.scenario import Scenario
from recserve.serving.client import budget_metadata
from recserve.serving.protos.recommender_pb2 import RankRequest
from recserve.serving.protos.recommender_pb2_grpc import RecommenderStub


def zipf_items(n_items: int, exponent: float, rng: np.random.Generator, size: int) -> np.ndarray:
    """``size`` distinct item ranks drawn by Zipf popularity (rank r with weight r^-exponent)."""
    weights = np.arange(1, n_items + 1, dtype=np.float64) ** -exponent
    return rng.choice(n_items, size=min(size, n_items), replace=False, p=weights / weights.sum())


def _sizes(s: Scenario, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(s.requests.candidates_min, s.requests.candidates_max + 1, size=s.requests.pool)


def rank_requests(s: Scenario) -> list[RankRequest]:
    rng = np.random.default_rng(s.seed)
    if s.catalog is not None:
        from recserve.triton.retrieval import ItemIndex

        items = [str(i) for i in ItemIndex(s.catalog).item_ids]
    else:
        items = [f"item{i}" for i in range(10_000)]
    out = []
    for i, n in enumerate(_sizes(s, rng)):
        picked = zipf_items(len(items), s.requests.zipf_exponent, rng, int(n))
        out.append(RankRequest(request_id=f"lt-{i}", model=s.model if s.target == "router" else "",
                               user={"user_id": str(int(rng.integers(1, s.requests.users + 1)))},
                               candidate_item_ids=[items[k] for k in picked], top_k=s.requests.top_k))
    return out


def triton_requests(s: Scenario, widths: tuple[int, int]) -> list[service_pb2.ModelInferRequest]:
    """Ranker rows for Zipf-drawn candidates from the catalog, or OOV rows of the model's widths."""
    rng = np.random.default_rng(s.seed)
    out = []
    catalog = encoder = None
    if s.catalog is not None:
        from recserve.triton.retrieval import ItemIndex, context_encoder

        catalog = ItemIndex(s.catalog)
        encoder = context_encoder(s.preprocessing, catalog.layout)
    for n in _sizes(s, rng):
        if catalog is not None:
            rows = zipf_items(len(catalog.item_ids), s.requests.zipf_exponent, rng, int(n))
            raw = np.array([[str(int(rng.integers(1, s.requests.users + 1))) for _ in encoder.sparse_names]],
                           dtype=object)
            cs, cd = encoder.encode(raw, np.full((1, len(encoder.transforms)), np.nan))
            sparse, dense = catalog.ranker_rows(rows, cs, cd)
        else:
            sparse, dense = np.zeros((int(n), widths[0]), np.int64), np.zeros((int(n), widths[1]), np.float32)
        req = service_pb2.ModelInferRequest(model_name=s.model)
        req.inputs.add(name="sparse", datatype="INT64", shape=sparse.shape)
        req.inputs.add(name="dense", datatype="FP32", shape=dense.shape)
        req.raw_input_contents.extend([sparse.tobytes(), dense.tobytes()])
        out.append(req)
    return out


def model_widths(url: str, model: str) -> tuple[int, int]:
    from recserve.triton.client import TritonClient

    with TritonClient(url) as c:
        inputs = {i["name"]: int(i["dims"][-1]) for i in c.config(model)["input"]}
    return inputs["sparse"], inputs["dense"]


Call = Callable[[object, float], Awaitable[object]]


def make_call(s: Scenario, channel: grpc.aio.Channel) -> Call:
    """``call(payload, timeout_s)`` for the scenario's target on an open channel."""
    if s.target == "triton":
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return lambda req, timeout: stub.ModelInfer(req, timeout=timeout)
    rank = RecommenderStub(channel).Rank
    return lambda req, timeout: rank(req, timeout=timeout, metadata=budget_metadata(timeout))


def build_payloads(s: Scenario) -> list:
    if s.target == "triton":
        url = s.url if isinstance(s.url, str) else s.url[0]
        return triton_requests(s, model_widths(url, s.model) if s.catalog is None else (0, 0))
    return rank_requests(s)
