"""Quality metrics on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recserve.converters.metrics import (
    auc_score,
    distinct_ratio,
    midranks,
    paired_auc_difference,
    paired_mean_difference,
    ranking_metrics,
    retrieval_metrics,
)


def test_auc_score_known_example() -> None:
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of the 4 pairs ordered right
    assert auc_score(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc_score(np.array([0, 1]), np.array([0.2, 0.9])) == pytest.approx(1.0)
    assert auc_score(np.array([0, 1]), np.array([0.9, 0.2])) == pytest.approx(0.0)
    # a tie between a positive and a negative counts half
    assert auc_score(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0], [0.0]])
def test_auc_score_is_nan_with_one_class(labels) -> None:
    assert math.isnan(auc_score(np.array(labels), np.linspace(0, 1, len(labels))))


def test_ranking_metrics_hand_example() -> None:
    labels = np.array([1, 0, 0, 0], dtype=np.float32)
    p = np.array([0.5, 0.2, 0.2, 0.1], dtype=np.float32)
    m = ranking_metrics(labels, p)
    assert set(m) == {"auc", "logloss", "calibration"}
    assert m["auc"] == pytest.approx(1.0)
    want = -(math.log(0.5) + 2 * math.log(0.8) + math.log(0.9)) / 4
    assert m["logloss"] == pytest.approx(want, rel=1e-5)
    # mean predicted CTR 0.25 / observed CTR 0.25
    assert m["calibration"] == pytest.approx(1.0, rel=1e-5)


def test_ranking_metrics_calibration_over_and_under_predicting() -> None:
    labels = np.array([1, 0, 0, 0])
    assert ranking_metrics(labels, np.full(4, 0.5))["calibration"] == pytest.approx(2.0)
    assert ranking_metrics(labels, np.full(4, 0.125))["calibration"] == pytest.approx(0.5)


def test_ranking_metrics_clips_certain_predictions() -> None:
    m = ranking_metrics(np.array([1, 0]), np.array([1.0, 0.0]))
    assert math.isfinite(m["logloss"]) and m["logloss"] < 1e-5
    wrong = ranking_metrics(np.array([1, 0]), np.array([0.0, 1.0]))
    assert math.isfinite(wrong["logloss"]) and wrong["logloss"] > 10


def test_ranking_metrics_no_positives_calibration_nan() -> None:
    m = ranking_metrics(np.array([0, 0]), np.array([0.1, 0.2]))
    assert math.isnan(m["calibration"]) and math.isnan(m["auc"])


def _one_dim(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1, 1)


def test_retrieval_metrics_known_ranks_with_ties_counted_half() -> None:
    # 1-D embeddings: score = user * item. User 0 (embedding 1) and user 1 (embedding 1).
    users = _one_dim([1.0, 1.0])
    #              item: 0    1    2    3    4    5
    items = _one_dim([0.5, 0.9, 0.1, 0.2, 0.5, 0.0])
    test_pairs = np.array([[0, 0], [1, 5]])
    negatives = np.array([[1, 2, 3, 4],   # user 0: 0.9 above, 0.5 tied -> rank 1.5
                          [1, 2, 3, 4]])  # user 1: positive 0.0 below all four -> rank 4
    m = retrieval_metrics(users, items, test_pairs, negatives, k=2)
    assert set(m) == {"auc", "recall@2", "ndcg@2"}
    assert m["auc"] == pytest.approx(((1 - 1.5 / 4) + 0.0) / 2)
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(1 + 2)) / 2)


def test_retrieval_metrics_top_k_boundary() -> None:
    users = _one_dim([1.0])
    items = _one_dim([0.5, 0.9, 0.8, 0.1])
    pairs = np.array([[0, 0]])
    negs = np.array([[1, 2, 3]])  # two negatives above: the positive is at position 2 (0-based)
    assert retrieval_metrics(users, items, pairs, negs, k=2)["recall@2"] == 0.0
    m3 = retrieval_metrics(users, items, pairs, negs, k=3)
    assert m3["recall@3"] == 1.0
    assert m3["ndcg@3"] == pytest.approx(1 / math.log2(4))
    assert m3["auc"] == pytest.approx(1 / 3)


def test_retrieval_metrics_perfect_embeddings() -> None:
    rng = np.random.default_rng(0)
    n, d = 20, 8
    users = rng.normal(size=(n, d)).astype(np.float32)
    # item i is user i; items n..2n-1 are the negated users (always score below the positive)
    items = np.concatenate([users, -users])
    pairs = np.stack([np.arange(n), np.arange(n)], axis=1)
    negs = np.stack([np.arange(n, 2 * n)] * 5, axis=1)
    m = retrieval_metrics(users, items, pairs, negs)
    assert m == {"auc": 1.0, "recall@10": 1.0, "ndcg@10": 1.0}


# ------------------------------------------------------------------ AUC without scikit-learn, DeLong


def test_auc_matches_scikit_learn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 3000)
    s = np.round(rng.normal(size=3000) + y, 1)  # many ties
    assert auc_score(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_midranks_share_ties() -> None:
    np.testing.assert_array_equal(midranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])


def test_paired_auc_difference_matches_the_bootstrap() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    y = rng.integers(0, 2, n)
    a = y + rng.normal(size=n)
    b = a + 0.3 * rng.normal(size=n)  # a correlated second model
    diff, se = paired_auc_difference(y, a, b)
    assert diff == pytest.approx(auc_score(y, a) - auc_score(y, b))
    boots = []
    for _ in range(300):
        i = rng.integers(0, n, n)
        boots.append(auc_score(y[i], a[i]) - auc_score(y[i], b[i]))
    assert se == pytest.approx(np.std(boots), rel=0.2)
    # the same model twice: no difference and no error; an independent one: a much larger error
    assert paired_auc_difference(y, a, a) == (0.0, 0.0)
    _, se_independent = paired_auc_difference(y, a, y + rng.normal(size=n))
    assert se_independent > 2 * se


def test_paired_auc_difference_needs_two_of_each_class() -> None:
    assert all(math.isnan(v) for v in paired_auc_difference(np.array([1, 0, 0]), np.ones(3), np.ones(3)))


def test_paired_mean_difference() -> None:
    d, se = paired_mean_difference(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 2.0, 4.0]))
    assert d == pytest.approx(0.5) and se == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)


def test_distinct_ratio_counts_distinct_inputs() -> None:
    scores = np.array([0.1, 0.2, 0.2, 0.3])
    assert distinct_ratio(scores) == pytest.approx(0.75)
    # rows 1 and 2 are the same input: the same score for them is no loss of ranking
    feed = {"x": np.array([[1, 2], [3, 4], [3, 4], [5, 6]], np.int64), "d": np.zeros((4, 1), np.float32)}
    assert distinct_ratio(scores, feed) == pytest.approx(1.0)
    # a quantized final layer: 4 scores for 1,000 distinct rows
    coarse = np.repeat([0.1, 0.4, 0.6, 0.9], 250)
    assert distinct_ratio(coarse, {"x": np.arange(1000)[:, None]}) == pytest.approx(0.004)


def test_ranking_metrics_of_logits() -> None:
    y = np.array([1, 0, 0, 1])
    logits = np.array([2.0, -1.0, 0.5, 0.0])
    m = ranking_metrics(y, logits, logits=True)
    p = 1 / (1 + np.exp(-logits))
    assert m == pytest.approx(ranking_metrics(y, p))
