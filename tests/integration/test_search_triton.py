"""The ``search`` ensemble on the real embedded Triton: a typed query -> query_tokenize -> query_encoder ->
product_index -> search_ranker -> search_topk, built by ``recserve search-index`` from the packaged encoder and
the synthetic search data. It must return what the encoder and the ranker find in process (the same products,
in the same order), its ``product_index`` what the encoder finds, and answer a bad query INVALID_ARGUMENT
without stopping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from triton_fixtures import running_triton
from tritonclient.utils import InferenceServerException

from recserve.data.search import load_search
from recserve.encoder.evaluate import Encoder, top_k
from tests.integration.test_encoder_export import recserve

pytestmark = pytest.mark.slow

CATALOG = "synthetic:200,products=400"


@pytest.fixture(scope="module")
def search_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("search")
    proc = recserve("encoder", "export", "--out", base / "encoder")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = recserve("search-index", base / "encoder", "--catalog", CATALOG, "--repository", base / "repo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ranker: kept" in proc.stdout, proc.stdout
    return base / "encoder", base / "repo"


@pytest.fixture(scope="module")
def triton(search_repo):
    yield from running_triton(search_repo[1])


def ask(srv, query, k: int = 10) -> tuple[list[str], np.ndarray]:
    client = grpcclient.InferenceServerClient(f"localhost:{srv.settings.grpc_port}")
    q = grpcclient.InferInput("query", [1], "BYTES")
    q.set_data_from_numpy(np.array([query], dtype=object))
    t = grpcclient.InferInput("top_k", [1], "INT32")
    t.set_data_from_numpy(np.array([k], dtype=np.int32))
    result = client.infer("search", [q, t])
    return [i.decode() for i in result.as_numpy("items")], result.as_numpy("scores")


def test_the_ensemble_finds_what_the_encoder_and_ranker_find_in_process(search_repo, triton) -> None:
    from recserve.serving.scorers import EdgeSearch

    encoder_dir, repo = search_repo
    edge = EdgeSearch(encoder_dir, repo / "product_index" / "1", ranker=repo / "search_ranker" / "1")
    queries, _ = load_search(CATALOG).split(held_out=True)
    reordered = 0
    for query in queries[:20]:
        items, scores = ask(triton, query)
        want = edge.search(query, 10)
        assert items == want.items, query
        np.testing.assert_allclose(scores, want.scores, rtol=1e-5, atol=1e-5)
        assert (np.diff(scores) <= 1e-6).all()
        reordered += items != ask_index(triton, edge, query, 10)
    assert reordered > 0, "the ranker never changed the encoder's order"


def ask_index(srv, edge, query: str, k: int) -> list[str]:
    """The ``product_index`` model alone, asked for the products nearest the query's embedding (by ``edge``'s
    encoder)."""
    client = grpcclient.InferenceServerClient(f"localhost:{srv.settings.grpc_port}")
    (embedding,) = edge.session.run(None, dict(zip(edge.inputs, edge.tokenizer.encode([query]))))
    inputs = [grpcclient.InferInput("embedding", list(embedding.shape), "FP32"),
              grpcclient.InferInput("top_k", [1], "INT32"), grpcclient.InferInput("query", [1], "BYTES")]
    for i, v in zip(inputs, [embedding.astype(np.float32), np.array([k], np.int32), np.array([query], dtype=object)]):
        i.set_data_from_numpy(v)
    result = client.infer("product_index", inputs, outputs=[grpcclient.InferRequestedOutput("items")])
    return [i.decode() for i in result.as_numpy("items")]


def test_the_index_finds_what_the_encoder_finds_in_process(search_repo, triton) -> None:
    from recserve.serving.scorers import EdgeSearch

    encoder_dir, repo = search_repo
    data = load_search(CATALOG)
    queries, _ = data.split(held_out=True)
    enc = Encoder(encoder_dir)
    want = top_k(enc.embed(queries[:20]), enc.embed(data.titles))
    edge = EdgeSearch(encoder_dir, repo / "product_index" / "1")
    for query, row in zip(queries[:20], want):
        assert ask_index(triton, edge, query, 10) == [data.product_ids[i] for i in row], query
        assert edge.search(query, 10).items == [data.product_ids[i] for i in row], query


def test_top_k_and_odd_but_valid_queries(triton) -> None:
    assert len(ask(triton, "drill", k=3)[0]) == 3 and ask(triton, "drill", k=0)[0] == []
    for query in ["", "Ünïcödé façade", "x " * 900, b"drill"]:
        items, scores = ask(triton, query)
        assert len(items) == 10 and np.isfinite(scores).all(), query


@pytest.mark.parametrize(("query", "k", "needle"), [
    (b"\xff\xfe broken", 10, "not UTF-8"),
    ("y" * 3000, 10, "at most 2,048"),
    ("drill", -1, "top_k"),
])
def test_a_bad_query_is_invalid_argument_and_the_next_is_answered(triton, query, k: int, needle: str) -> None:
    with pytest.raises(InferenceServerException) as e:
        ask(triton, query, k)
    assert "INVALID_ARG" in str(e.value.status()) and needle in e.value.message(), (e.value.status(), e.value.message())
    assert len(ask(triton, "cordless drill")[0]) == 10


def test_two_queries_in_one_request_are_refused(triton) -> None:
    client = grpcclient.InferenceServerClient(f"localhost:{triton.settings.grpc_port}")
    q = grpcclient.InferInput("query", [2], "BYTES")
    q.set_data_from_numpy(np.array(["a", "b"], dtype=object))
    t = grpcclient.InferInput("top_k", [1], "INT32")
    t.set_data_from_numpy(np.array([5], dtype=np.int32))
    with pytest.raises(InferenceServerException):
        client.infer("search", [q, t])


def test_the_router_searches_through_triton_and_from_the_edge_when_triton_hangs(search_repo, triton) -> None:
    """The router in process (no Ray) with its real Triton client: the cloud's answer is Triton's; with Triton
    SIGSTOPped every typed query is still answered within its 100 ms budget, from the edge encoder."""
    import asyncio
    import os
    import signal
    import time

    from triton_fixtures import tritonserver_pids

    from recserve.serving.config import RouterConfig
    from recserve.serving.protos.recommender_pb2 import RankRequest
    from recserve.serving.router import Router

    encoder_dir, repo = search_repo
    index = repo / "product_index" / "1"
    cfg = RouterConfig.model_validate({
        "triton_url": f"127.0.0.1:{triton.settings.grpc_port}", "default_model": "search", "cache_ttl_s": 0,
        "searches": {"search": {"edge_encoder": str(encoder_dir), "edge_index": str(index),
                                "edge_ranker": str(repo / "search_ranker" / "1")}}})
    queries, _ = load_search(CATALOG).split(held_out=True)

    async def scenario():
        router = Router(cfg)
        try:
            first = await router.rank(RankRequest(model="search", query=queries[0]), 1000)
            assert first.served_by == "cloud" and list(first.items) == ask(triton, queries[0])[0]
            pids = tritonserver_pids(triton.settings.grpc_port)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                served, worst = [], 0.0
                for q in queries[1:21]:
                    t0 = time.perf_counter()
                    r = await router.rank(RankRequest(model="search", query=q, top_k=5), 100)
                    worst = max(worst, time.perf_counter() - t0)
                    served.append(r.served_by)
                    assert len(r.items) == 5
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            assert set(served) == {"edge"} and worst < 0.1, (served, worst)
            await asyncio.sleep(2.5)  # the breaker's cooldown: then one request probes the cloud again
            for _ in range(20):
                if (await router.rank(RankRequest(model="search", query=queries[0]), 1000)).served_by == "cloud":
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the router never went back to the cloud")
        finally:
            await router.close()

    asyncio.run(scenario())


def test_no_ranker_ends_the_ensemble_at_the_nearest_products(search_repo, tmp_path: Path) -> None:
    from recserve.converters.triton_config import from_pbtxt

    proc = recserve("search-index", search_repo[0], "--catalog", CATALOG, "--repository", tmp_path, "--no-ranker")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["product_index", "query_encoder", "query_tokenize", "search"]
    ens = from_pbtxt((tmp_path / "search" / "config.pbtxt").read_text())
    assert [s.model_name for s in ens.ensemble_scheduling.step][-1] == "product_index"
    assert "NDCG" not in proc.stdout
