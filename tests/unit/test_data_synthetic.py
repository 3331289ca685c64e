"""Synthetic e-commerce search log: determinism, shapes, click rate, ground-truth difficulty, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from recserve.data import Dataset, load_dataset
from recserve.data.checks import check_dataset
from recserve.data.synthetic import generate, simulate

ROWS, USERS, ITEMS = 20_000, 300, 800


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return generate(ROWS, users=USERS, items=ITEMS, seed=0, eval_negatives=20)


def arrays(d: Dataset) -> list[np.ndarray]:
    r = d.retrieval
    return [d.ranking_train.sparse, d.ranking_train.dense, d.ranking_train.label, d.ranking_test.sparse,
            r.user_table, r.item_table, r.train_pairs, r.test_pairs, r.eval_negatives]  # fmt: skip


def test_same_seed_identical_different_seed_differs(ds: Dataset) -> None:
    same = generate(ROWS, users=USERS, items=ITEMS, seed=0, eval_negatives=20)
    other = generate(ROWS, users=USERS, items=ITEMS, seed=1, eval_negatives=20)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(ds), arrays(same), strict=True))
    assert not np.array_equal(ds.ranking_train.sparse, other.ranking_train.sparse)
    assert not np.array_equal(ds.ranking_train.label, other.ranking_train.label)


def test_shapes_and_features(ds: Dataset) -> None:
    check_dataset(ds)
    train, test = ds.ranking_train, ds.ranking_test
    assert (len(train), len(test)) == (16_000, 4_000)
    assert [f.name for f in train.sparse_features] == [
        "user_id",
        "item_id",
        "query_id",
        "category",
        "brand",
        "price_bucket",
    ]
    assert train.dense_names == ["price", "item_popularity", "query_category_match"]
    assert [t.kind for t in ds.dense_transforms] == ["log1p", "log1p", "identity"]
    assert set(np.unique(train.dense[:, 2])) <= {0.0, 1.0}
    assert abs(float(train.dense[:, 0].mean())) < 1e-3  # standardized on train
    r = ds.retrieval
    assert r.user_table.shape == (USERS, 1) and r.item_table.shape == (ITEMS, 4)
    assert [f.name for f in r.item_features] == ["item_id", "category", "brand", "price_bucket"]
    assert ds.vocabularies["price_bucket"].cardinality == 11  # 10 quantile buckets + OOV
    # every catalog entity has its own id; tokens are the raw ints as strings
    assert len(np.unique(r.item_table[:, 0])) == ITEMS and (r.item_table[:, 0] > 0).all()
    assert ds.vocabularies["user_id"].lookup(["7"])[0] == r.user_table[7, 0]
    clicks = int(train.label.sum() + test.label.sum())
    assert len(r.train_pairs) + len(r.validation_pairs) + len(r.test_pairs) == clicks


def test_click_rate_and_ground_truth_auc() -> None:
    log = simulate(100_000, seed=0)
    assert 0.10 <= log.label.mean() <= 0.20
    auc = roc_auc_score(log.label, log.click_prob)
    assert 0.7 <= auc <= 0.92
    small = simulate(5_000, users=50, items=100, seed=3)
    assert 0.10 <= small.label.mean() <= 0.20
    assert 0.7 <= roc_auc_score(small.label, small.click_prob) <= 0.92


def test_impressions_follow_query_category() -> None:
    log = simulate(50_000, seed=2)
    match = log.item_category[log.item] == log.query_category[log.query]
    assert 0.6 <= match.mean() <= 0.75  # 60% drawn from the query's category, plus chance matches
    assert log.label[match].mean() > log.label[~match].mean()


def test_fast_enough() -> None:
    start = time.perf_counter()
    ds = generate(100_000)
    assert time.perf_counter() - start < 5.0
    assert len(ds.ranking_train) + len(ds.ranking_test) == 100_000


def test_spec_seeds() -> None:
    a = load_dataset("synthetic:2000,users=40,items=60,seed=4", seed=0, eval_negatives=5)
    b = load_dataset("synthetic:2000,users=40,items=60,seed=4", seed=1, eval_negatives=5)
    assert a.spec == "synthetic:2000,users=40,items=60,seed=4"
    # same data seed: the same impressions (raw values), split differently
    assert sorted(raw_rows(a)) == sorted(raw_rows(b))
    assert raw_rows(a) != raw_rows(b)


def raw_rows(d: Dataset) -> list[tuple[str, ...]]:
    """Ranking rows (train then test) as raw tokens, independent of id assignment."""
    tokens = [d.vocabularies[f.name].tokens for f in d.ranking_train.sparse_features]
    rows = np.concatenate([d.ranking_train.sparse, d.ranking_test.sparse])
    return [tuple(tokens[j][i - 1] for j, i in enumerate(row)) for row in rows.tolist()]
