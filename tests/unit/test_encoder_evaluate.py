"""The search metrics of an encoder, on hand-made rankings whose values are known."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.encoder.evaluate import retrieval_quality, teacher_agreement, top_k


def test_ndcg_and_recall_on_known_rankings() -> None:
    judged = [{0: 2.0, 1: 1.0, 5: 0.0}, {3: 1.0}, {4: 0.0}]
    top = np.array([[0, 1, 2], [2, 3, 4], [4, 0, 1]])
    got = retrieval_quality(top, judged, k=3)
    second = (1 / np.log2(3)) / 1.0  # its one relevant product at rank 2
    assert got["ndcg_at_3"] == pytest.approx((1.0 + second) / 2), "a perfect list and one off by a place"
    assert got["recall_at_3"] == pytest.approx(1.0) and got["queries"] == 2, "a query with no positive gain is left out"
    worst = retrieval_quality(np.array([[5, 2, 7]]), judged[:1], k=3)
    assert worst == {"ndcg_at_3": 0.0, "recall_at_3": 0.0, "queries": 1}, "unjudged products count as gain 0"


def test_top_k_is_the_cosine_order_over_the_whole_corpus() -> None:
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(700, 8)), rng.normal(size=(300, 8)) * rng.uniform(0.1, 10, size=(300, 1))
    got = top_k(q, p, k=10)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    assert np.array_equal(got, np.argsort(-cos, axis=1)[:, :10]), "the length of a product vector must not matter"
    assert top_k(q[:2], p[:3], k=10).shape == (2, 3)


def test_agreement_with_the_teacher() -> None:
    top, teacher = np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), np.array([[4, 3, 9, 9], [5, 6, 7, 8]])
    q = np.array([[1.0, 0.0], [0.0, 2.0]])
    got = teacher_agreement(top, teacher, q, np.array([[1.0, 1.0], [0.0, 1.0]]))
    assert got["teacher_overlap_at_10"] == pytest.approx((2 / 4 + 1.0) / 2)
    assert got["mean_cosine"] == pytest.approx((np.sqrt(0.5) + 1.0) / 2)
