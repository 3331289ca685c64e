"""The search ranker (recserve.models.search_ranker): learns what the cosine misses, is chosen on validation
queries and measured on the held-out ones, and its ONNX graph scores as the numpy model does."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.data.search import SearchData, synthetic_search
from recserve.errors import DataError
from recserve.models.search_ranker import Fitted, fit_search_ranker
from recserve.onnxrt import session
from recserve.triton.search_features import FEATURES, TitleTerms, terms


def noisy_embeddings(data: SearchData, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(queries, products): a random projection of each text's terms, plus Gaussian noise: an encoder that sees
    the words, blurred, so the exact word match carries what the cosine lost."""
    rng = np.random.default_rng(seed)
    vocab = {w: i for i, w in enumerate(sorted({w for t in data.titles + data.queries for w in terms(t)}))}
    proj = rng.normal(size=(len(vocab), 32)).astype(np.float32)

    def embed(texts: list[str]) -> np.ndarray:
        out = np.stack([proj[[vocab[w] for w in terms(t)]].sum(0) for t in texts])
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
        return (out + noise * rng.normal(size=out.shape)).astype(np.float32)

    products = embed(data.titles)
    return embed(data.queries), products / np.linalg.norm(products, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def fitted():
    data = synthetic_search(600, 800, seed=3)
    queries, products = noisy_embeddings(data, noise=0.35)
    return data, *fit_search_ranker(data, TitleTerms.build(data.titles), queries, products, depth=50, seed=0)


def test_the_ranker_beats_the_encoders_order_on_held_out_queries(fitted) -> None:
    _, _, report = fitted
    assert report.kept and report.depth == 50 and report.features == FEATURES
    v, h = report.validation, report.held_out
    assert v.ranker_ndcg_at_10 > v.encoder_ndcg_at_10
    assert h.ranker_ndcg_at_10 > h.encoder_ndcg_at_10 + 0.02, h


def test_queries_are_split_three_ways_and_the_held_out_half_is_not_trained_on(fitted) -> None:
    data, _, report = fitted
    positive = [any(g > 0 for g in j.values()) for j in data.judgments]
    tuning = sum(p for p, h in zip(positive, data.held_out) if not h)
    assert report.training_queries + report.validation.queries == pytest.approx(tuning, abs=tuning * 0.01 + 1)
    assert report.held_out.queries == sum(p for p, h in zip(positive, data.held_out) if h)
    assert 0.15 < report.validation.queries / tuning < 0.35


def test_the_same_data_and_seed_give_the_same_ranker() -> None:
    data = synthetic_search(200, 300, seed=1)
    queries, products = noisy_embeddings(data, noise=0.35)
    index = TitleTerms.build(data.titles)
    a, ra = fit_search_ranker(data, index, queries, products, depth=20, seed=0)
    b, rb = fit_search_ranker(data, index, queries, products, depth=20, seed=0)
    assert ra == rb
    for (wa, ba), (wb, bb) in zip(a.layers, b.layers):
        np.testing.assert_array_equal(wa, wb) and np.testing.assert_array_equal(ba, bb)


@pytest.mark.parametrize("hidden", [0, 16])
def test_the_onnx_graph_scores_as_the_numpy_model(hidden: int) -> None:
    rng = np.random.default_rng(hidden)
    width = len(FEATURES)
    shapes = [(width, hidden), (hidden, 1)] if hidden else [(width, 1)]
    model = Fitted(rng.normal(size=width).astype(np.float32), rng.uniform(0.5, 2, width).astype(np.float32),
                   [(rng.normal(size=s).astype(np.float32), rng.normal(size=s[1]).astype(np.float32)) for s in shapes], 1)
    features = rng.normal(size=(37, width)).astype(np.float32)
    (score,) = session(model.to_onnx().SerializeToString(), 1).run(None, {"features": features})
    assert score.shape == (37, 1)
    np.testing.assert_allclose(score[:, 0], model.scores(features), rtol=1e-5, atol=1e-5)


def test_too_few_queries_is_an_error() -> None:
    data = synthetic_search(3, 20, seed=0)
    queries, products = noisy_embeddings(data, noise=0.1)
    with pytest.raises(DataError, match="too few judged tuning queries"):
        fit_search_ranker(data, TitleTerms.build(data.titles), queries, products, depth=5)
