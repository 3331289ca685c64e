"""The real tritonserver (nvidia-pytriton wheel, CPU) serving recserve's models, checked against onnxruntime.

One server for the whole module: a ranker built with dynamic batching (5 ms queue delay), the user tower
and item index of the retrieval path, and the recommend/retrieve ensembles.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import triton_fixtures
from router_fixtures import wait_until
from triton_fixtures import (
    UNKNOWN_TOKEN,
    TrainedModels,
    ort_run,
    parse_printed,
    raw_ranker_rows,
    recserve,
    running_triton,
    serving_repo,
    strings,
)

from recserve.data.schema import Dataset, load_preprocessing
from recserve.errors import InferenceError
from recserve.triton.client import TritonClient
from recserve.triton.features import FeatureEncoder, read_columns, top_k
from recserve.triton.retrieval import ItemIndex

pytestmark = pytest.mark.slow

# session fixtures shared by the Triton modules (the models are trained once, see triton_fixtures)
triton_models = triton_fixtures.triton_models
ranker_data = triton_fixtures.ranker_data
two_tower_data = triton_fixtures.two_tower_data

QUEUE_DELAY_US = 5000
CANDIDATES = 50
MODELS = {"ranker", "user_tower", "item_index", "recommend", "recommend_preprocess", "recommend_topk", "retrieve",
          "retrieve_preprocess"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, triton_models: TrainedModels) -> Path:
    return serving_repo(tmp_path_factory.mktemp("serving-repo"), triton_models, QUEUE_DELAY_US, CANDIDATES)


@pytest.fixture(scope="module")
def server(repo: Path):
    yield from running_triton(repo)


@pytest.fixture(scope="module")
def client(server):
    with TritonClient(server.grpc_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def rows(ranker_data: Dataset):
    t = ranker_data.ranking_test
    return t.sparse[:200], t.dense[:200]


def test_every_model_of_the_repository_is_ready(client: TritonClient) -> None:
    index = client.repository_index()
    assert {m["name"] for m in index} == MODELS
    assert all(m.get("state") == "READY" for m in index), index
    assert all(client.model_ready(m) for m in MODELS)


@pytest.mark.parametrize("batch", [1, 37])
def test_ranker_over_grpc_equals_onnxruntime(client: TritonClient, repo: Path, rows, batch: int) -> None:
    sparse, dense = rows[0][50:50 + batch], rows[1][50:50 + batch]
    got = client.infer("ranker", {"sparse": sparse, "dense": dense})
    (want,) = ort_run(repo / "ranker" / "1" / "model.onnx", {"sparse": sparse, "dense": dense})
    assert set(got) == {"score"}
    assert got["score"].shape == (batch, 1) and got["score"].dtype == np.float32
    np.testing.assert_allclose(got["score"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 37])
def test_user_tower_over_grpc_equals_the_two_tower_user_embedding(
        client: TritonClient, triton_models: TrainedModels, two_tower_data: Dataset, batch: int) -> None:
    data = two_tower_data
    users = data.retrieval.user_table[3:3 + batch]
    got = client.infer("user_tower", {"user_sparse": users})["user_embedding"]
    want, _ = ort_run(triton_models.two_tower / "model.onnx",
                      {"user_sparse": users, "item_sparse": data.retrieval.item_table[:5]})
    assert got.shape == want.shape == (batch, want.shape[1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _distinct_score_rows(repo: Path, sparse: np.ndarray, dense: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` rows whose onnxruntime scores are pairwise far apart (no near-ties to reorder)."""
    (scores,) = ort_run(repo / "ranker" / "1" / "model.onnx", {"sparse": sparse, "dense": dense})
    picked: list[int] = []
    for i, s in enumerate(scores.ravel()):
        if all(abs(s - scores.ravel()[j]) > 1e-4 for j in picked):
            picked.append(i)
        if len(picked) == n:
            break
    assert len(picked) == n
    return np.array(picked)


def test_recommend_returns_the_top_k_of_onnxruntime_scores(client: TritonClient, repo: Path,
                                                            triton_models: TrainedModels, rows) -> None:
    pre = triton_models.ranker / "preprocessing.json"
    pick = _distinct_score_rows(repo, rows[0], rows[1], 40)
    sparse, dense = rows[0][pick].copy(), rows[1][pick].copy()
    raw_sparse, raw_dense = raw_ranker_rows(pre, sparse, dense)
    brand = read_columns(pre)["ranking_sparse"].index("brand")
    raw_sparse[7, brand] = UNKNOWN_TOKEN  # unknown tokens are the OOV id 0
    sparse[7, brand] = 0
    # what the server's preprocessing computes from these raw values is the training-time encoding
    enc_sparse, enc_dense = FeatureEncoder.load(pre, read_columns(pre)["ranking_sparse"]).encode(raw_sparse, raw_dense)
    np.testing.assert_array_equal(enc_sparse, sparse)
    np.testing.assert_allclose(enc_dense, dense, atol=1e-4)
    (scores,) = ort_run(repo / "ranker" / "1" / "model.onnx", {"sparse": enc_sparse, "dense": enc_dense})
    item_ids = strings([f"cand-{i}" for i in range(len(pick))])
    k = 5
    got = client.infer("recommend", {"sparse_raw": raw_sparse, "dense_raw": raw_dense, "item_ids": item_ids,
                                     "top_k": np.array([k], np.int32)})
    best = top_k(scores.ravel(), k)
    assert [b.decode() for b in got["items"]] == list(item_ids[best])
    np.testing.assert_allclose(got["scores"], scores.ravel()[best], rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(got["scores"]) <= 0)

    # top_k larger than the candidates: every candidate, best first
    got = client.infer("recommend", {"sparse_raw": raw_sparse[:3], "dense_raw": raw_dense[:3],
                                     "item_ids": item_ids[:3], "top_k": np.array([10], np.int32)})
    assert [b.decode() for b in got["items"]] == list(item_ids[:3][top_k(scores.ravel()[:3], 3)])


def test_retrieve_returns_ranked_items_of_the_index(client: TritonClient, repo: Path, triton_models: TrainedModels,
                                                    ranker_data: Dataset, two_tower_data: Dataset) -> None:
    index = ItemIndex(repo / "item_index" / "1")
    assert index.layout.context_sparse_names == ["user_id", "query_id"]
    assert index.layout.context_dense_names == ["query_category_match"]
    rank_vocabs, rank_transforms = load_preprocessing(triton_models.ranker / "preprocessing.json")
    tower_vocabs, _ = load_preprocessing(triton_models.two_tower / "preprocessing.json")
    assert rank_transforms[2].name == "query_category_match" and rank_transforms[2].kind == "identity"
    # the ranker's item-side columns of each item, from its training rows (item columns are constant per item)
    train = ranker_data.ranking_train
    col = {f.name: j for j, f in enumerate(train.sparse_features)}
    first_row: dict[int, int] = {}
    for r, item in enumerate(train.sparse[:, col["item_id"]].tolist()):
        first_row.setdefault(item, r)
    item_table = two_tower_data.retrieval.item_table
    item_tokens = np.array([tower_vocabs["item_id"].tokens[i - 1] for i in item_table[:, 0]])
    assert set(index.item_ids.tolist()) <= set(item_tokens.tolist())
    k = 7
    for row in (0, 11):
        sparse, dense = ranker_data.ranking_test.sparse[row], ranker_data.ranking_test.dense[row]
        user = rank_vocabs["user_id"].tokens[sparse[col["user_id"]] - 1]
        query = rank_vocabs["query_id"].tokens[sparse[col["query_id"]] - 1]
        match = float(dense[2])  # identity, not standardized: the raw 0/1 value
        got = client.infer("retrieve", {"user_raw": strings([[user]]), "context_raw": strings([[user, query]]),
                                        "context_dense_raw": np.array([[match]], np.float32),
                                        "top_k": np.array([k], np.int32)})
        items, scores = [b.decode() for b in got["items"]], got["scores"]
        assert len(items) == k == len(set(items))
        assert set(items) <= set(index.item_ids.tolist())
        assert np.all(np.diff(scores) <= 0)

        # the same pipeline computed here: user tower -> nearest items -> ranker rows -> ranker -> top k
        (emb,) = ort_run(repo / "user_tower" / "1" / "model.onnx",
                         {"user_sparse": tower_vocabs["user_id"].lookup([user]).reshape(1, 1)})
        _, item_emb = ort_run(triton_models.two_tower / "model.onnx",
                              {"user_sparse": np.ones((1, 1), np.int64), "item_sparse": item_table})
        indexed = np.isin(item_tokens, index.item_ids.astype(str))
        near = np.argsort(-(item_emb[indexed] @ emb[0]), kind="stable")[:CANDIDATES]
        cand = item_tokens[indexed][near]
        rows = [first_row[int(i)] for i in rank_vocabs["item_id"].lookup(cand.tolist())]
        r_sparse, r_dense = train.sparse[rows].copy(), train.dense[rows].copy()
        r_sparse[:, col["user_id"]] = rank_vocabs["user_id"].lookup([user])[0]
        r_sparse[:, col["query_id"]] = rank_vocabs["query_id"].lookup([query])[0]
        r_dense[:, 2] = match
        (want,) = ort_run(repo / "ranker" / "1" / "model.onnx", {"sparse": r_sparse, "dense": r_dense})
        want_by_item = dict(zip(cand.tolist(), want.ravel().tolist()))
        np.testing.assert_allclose(scores, np.sort(want.ravel())[::-1][:k], rtol=1e-5, atol=1e-6)
        assert all(i in want_by_item for i in items)
        np.testing.assert_allclose(scores, [want_by_item[i] for i in items], rtol=1e-5, atol=1e-6)


def _counts(client: TritonClient, model: str) -> tuple[int, int, int]:
    """Rows inferred, executions, and executions of more than one row so far."""
    (stats,) = client.statistics(model)["model_stats"]
    merged = sum(int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])
                 if int(b["batch_size"]) > 1)
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)), merged


def test_dynamic_batching_merges_concurrent_requests(client: TritonClient, repo: Path, rows) -> None:
    cfg = client.config("ranker")
    assert int(cfg["dynamic_batching"]["max_queue_delay_microseconds"]) == QUEUE_DELAY_US
    sparse, dense = rows[0][:64], rows[1][:64]
    inf0, exe0, merged0 = _counts(client, "ranker")
    with ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(client.infer, "ranker", {"sparse": sparse[i:i + 1], "dense": dense[i:i + 1]})
                   for i in range(64)]
        got = np.concatenate([f.result()["score"] for f in futures])
    # Triton reports a batch's statistics after sending its responses: wait for the counts to catch up
    inf1, exe1, merged1 = wait_until(lambda: (c := _counts(client, "ranker"))[0] - inf0 >= 64 and c, 10,
                                     what="Triton counting the 64 requests")
    assert inf1 - inf0 == 64
    assert exe1 - exe0 < inf1 - inf0, f"{exe1 - exe0} executions for 64 requests: nothing was batched"
    assert merged1 > merged0  # executions of more than one row, made of one-row requests
    # batching must not mix up the rows of different requests
    (want,) = ort_run(repo / "ranker" / "1" / "model.onnx", {"sparse": sparse, "dense": dense})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_h2load_calls_are_counted_by_triton_and_failures_are_caught(client: TritonClient, server, rows) -> None:
    """The Triton benchmark's load (bench.triton.triton_load: h2load, which sees HTTP statuses only)
    checks every call against Triton's success counter, so a gRPC error cannot pass as a fast answer."""
    from bench.triton import infer_request, triton_load

    sparse, dense = rows[0][:1], rows[1][:1]
    good = infer_request("ranker", sparse, dense).SerializeToString()
    r = triton_load(client, server.grpc_url, "ranker", good, concurrency=8, total=200)
    assert r["rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
    wrong_shape = infer_request("ranker", sparse[:, :3], dense).SerializeToString()
    with pytest.raises(RuntimeError, match=r"Triton scored 0 rows of the 50 x 1 sent"):
        triton_load(client, server.grpc_url, "ranker", wrong_shape, concurrency=8, total=50)


def test_summary_latencies_track_the_configured_quantiles(server, client: TritonClient, rows) -> None:
    import urllib.request

    from recserve.operator.observe import scrape

    client.infer("ranker", {"sparse": rows[0][:1], "dense": rows[1][:1]})
    with urllib.request.urlopen(server.metrics_url) as r:
        assert r.status == 200
    summary = scrape(server.metrics_url)["nv_inference_request_summary_us"]
    quantiles = {labels["quantile"] for labels, _ in summary if labels.get("model") == "ranker"}
    assert quantiles == {"0.5", "0.99"}  # ServerSettings.summary_quantiles, not Triton's default four


def test_a_bad_request_in_a_dynamic_batch_fails_alone(client: TritonClient, repo: Path, rows) -> None:
    sparse, dense = rows[0][:32], rows[1][:32].copy()
    bad = set(range(0, 32, 4))
    for i in bad:
        dense[i, 1] = np.nan

    def one(i: int):
        try:
            return client.infer("ranker", {"sparse": sparse[i:i + 1], "dense": dense[i:i + 1]})["score"]
        except InferenceError as e:
            return e

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    good = [i for i in range(32) if i not in bad]
    assert all(isinstance(results[i], InferenceError) and "NaN" in str(results[i]) for i in bad)
    assert all(isinstance(results[i], np.ndarray) for i in good), [type(r) for r in results]
    (want,) = ort_run(repo / "ranker" / "1" / "model.onnx", {"sparse": sparse[good], "dense": dense[good]})
    np.testing.assert_allclose(np.concatenate([results[i] for i in good]), want, rtol=1e-5, atol=1e-6)


def _recommend_feed(raw_sparse, raw_dense, n_items=None):
    n = len(raw_sparse)
    return {"sparse_raw": raw_sparse, "dense_raw": raw_dense,
            "item_ids": strings([f"i{j}" for j in range(n if n_items is None else n_items)]),
            "top_k": np.array([2], np.int32)}


def _bad_requests(sparse, dense, raw_sparse, raw_dense) -> dict[str, tuple[str, dict, str]]:
    nan_dense, inf_dense = dense.copy(), dense.copy()
    nan_dense[1, 0] = np.nan
    inf_dense[0, 1] = np.inf
    big = 257
    return {
        "wrong shape": ("ranker", {"sparse": sparse[:, :5], "dense": dense}, ""),
        "wrong dtype": ("ranker", {"sparse": sparse.astype(np.int32), "dense": dense}, ""),
        "missing input": ("ranker", {"sparse": sparse}, ""),
        "unknown model": ("no_such_model", {"sparse": sparse, "dense": dense}, ""),
        "unknown version": ("ranker", {"sparse": sparse, "dense": dense}, "9"),
        "batch above max_batch_size": ("ranker", {"sparse": np.repeat(sparse[:1], big, 0),
                                                  "dense": np.repeat(dense[:1], big, 0)}, ""),
        "NaN in dense features": ("ranker", {"sparse": sparse, "dense": nan_dense}, ""),
        "infinite dense feature": ("ranker", {"sparse": sparse, "dense": inf_dense}, ""),
        "recommend: too few raw sparse columns": ("recommend", _recommend_feed(raw_sparse[:, :5], raw_dense), ""),
        "recommend: too many raw dense columns": ("recommend", _recommend_feed(
            raw_sparse, np.concatenate([raw_dense, raw_dense[:, :1]], axis=1)), ""),
        "recommend: item_ids do not match the rows": ("recommend", _recommend_feed(raw_sparse, raw_dense, 2), ""),
        "retrieve: wrong number of context columns": ("retrieve", {
            "user_raw": strings([["1"]]), "context_raw": strings([["1"]]),
            "context_dense_raw": np.zeros((1, 1), np.float32), "top_k": np.array([3], np.int32)}, ""),
    }


BAD = list(_bad_requests(np.zeros((3, 6), np.int64), np.zeros((3, 3), np.float32),
                         strings([["a"] * 6] * 3), np.zeros((3, 3), np.float32)))


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_is_refused_and_the_next_good_one_served(client: TritonClient, repo: Path, rows,
                                                               triton_models: TrainedModels, case: str) -> None:
    sparse, dense = rows[0][:3], rows[1][:3]
    raw_sparse, raw_dense = raw_ranker_rows(triton_models.ranker / "preprocessing.json", sparse, dense)
    model, feed, version = _bad_requests(sparse, dense, raw_sparse, raw_dense)[case]
    with pytest.raises(InferenceError):
        client.infer(model, feed, version=version)
    got = client.infer("ranker", {"sparse": sparse, "dense": dense})
    (want,) = ort_run(repo / "ranker" / "1" / "model.onnx", {"sparse": sparse, "dense": dense})
    np.testing.assert_allclose(got["score"], want, rtol=1e-5, atol=1e-6)
    if model in ("recommend", "retrieve"):
        ok = client.infer("recommend", _recommend_feed(raw_sparse, raw_dense))
        assert len(ok["items"]) == 2


def test_nan_raw_dense_value_is_a_missing_feature_in_the_ensemble(client: TritonClient, repo: Path, rows,
                                                                   triton_models: TrainedModels) -> None:
    """The ensemble takes NaN as 'missing' (the transform's fill value), unlike the ranker itself."""
    pre = triton_models.ranker / "preprocessing.json"
    sparse, dense = rows[0][:4].copy(), rows[1][:4].copy()
    raw_sparse, raw_dense = raw_ranker_rows(pre, sparse, dense)
    raw_dense[0, 0] = np.nan
    _, transforms = load_preprocessing(pre)
    dense[0, 0] = transforms[0].fill
    got = client.infer("recommend", {**_recommend_feed(raw_sparse, raw_dense), "top_k": np.array([4], np.int32)})
    enc_sparse, enc_dense = FeatureEncoder.load(pre, read_columns(pre)["ranking_sparse"]).encode(raw_sparse, raw_dense)
    (want,) = ort_run(repo / "ranker" / "1" / "model.onnx", {"sparse": enc_sparse, "dense": enc_dense})
    np.testing.assert_allclose(enc_dense, dense, atol=1e-4)
    np.testing.assert_allclose(np.sort(got["scores"]), np.sort(want.ravel()), rtol=1e-5, atol=1e-6)


def test_infer_cli_sends_numeric_json_to_the_ranker(server, repo: Path, rows) -> None:
    sparse, dense = rows[0][:2], rows[1][:2]
    proc = recserve("infer", "ranker", "--url", server.grpc_url,
                    "--json", json.dumps({"sparse": sparse.tolist(), "dense": dense.tolist()}))
    assert proc.returncode == 0, proc.stderr
    (want,) = ort_run(repo / "ranker" / "1" / "model.onnx", {"sparse": sparse, "dense": dense})
    assert "score [2, 1]:" in proc.stdout
    np.testing.assert_allclose(parse_printed(proc.stdout, "score"), want, rtol=1e-5, atol=1e-6)


def test_infer_cli_sends_string_json_to_the_recommend_ensemble(server, rows, triton_models: TrainedModels) -> None:
    raw_sparse, raw_dense = raw_ranker_rows(triton_models.ranker / "preprocessing.json", rows[0][:2], rows[1][:2])
    feed = {"sparse_raw": raw_sparse.tolist(), "dense_raw": raw_dense.tolist(), "item_ids": ["shoe", "hat"],
            "top_k": [1]}
    proc = recserve("infer", "recommend", "--url", server.grpc_url, "--json", json.dumps(feed))
    if "Traceback" in proc.stderr:  # a crash is not this bug: fail, do not xfail
        pytest.fail(proc.stderr)
    assert proc.returncode == 0, proc.stderr
    # the item ids themselves, as text: not "items [1]: " with rich eating "[b'shoe']" as markup
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("items [1]:")]
    assert line in ("items [1]: ['shoe']", "items [1]: ['hat']"), line
