"""A synthetic e-commerce search log with a hidden click model, deterministic by seed.

Hidden ground truth: users (latent vector, preferred categories, brand affinities, price sensitivity,
Zipf activity), items (category, brand, lognormal price, latent vector, Zipf popularity) and queries
(each with an intended category). An impression is (user, query from one of the user's preferred
categories, item: 60% from the query's category by popularity, else from all items by popularity);
its click probability is a sigmoid of a hidden model, and the label is drawn from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.data.features import Preprocessor, encode, ranking_data, table
from recserve.data.schema import Dataset
from recserve.data.splits import build_retrieval, random_split
from recserve.errors import DataError

N_CATEGORIES = 30
N_BRANDS = 200
N_QUERIES = 500
LATENT_DIM = 8
ZIPF_EXPONENT = 1.1
IN_CATEGORY_SHARE = 0.6
CLICK_RATE = 0.15
N_PRICE_BUCKETS = 10

# Weights of the hidden click model (on roughly unit-scale terms).
W_LATENT = 1.0
W_CATEGORY_MATCH = 1.5
W_BRAND = 0.3
W_POPULARITY = 0.5

SPARSE_NAMES = ["user_id", "item_id", "query_id", "category", "brand", "price_bucket"]
USER_COLUMNS = ["user_id"]
ITEM_COLUMNS = ["item_id", "category", "brand", "price_bucket"]


@dataclass
class SearchLog:
    """Raw impressions (row = impression, in time order) plus the catalog and the hidden click probability."""

    user: np.ndarray
    query: np.ndarray
    item: np.ndarray
    label: np.ndarray
    """float32 0/1 click."""
    click_prob: np.ndarray
    """Ground-truth click probability of each impression."""
    item_category: np.ndarray
    item_brand: np.ndarray
    item_price: np.ndarray
    query_category: np.ndarray


def _zipf_weights(n: int, rng: np.random.Generator) -> np.ndarray:
    """Zipf(``ZIPF_EXPONENT``) probabilities over ``n`` entities in random rank order."""
    w = (rng.permutation(n) + 1.0) ** -ZIPF_EXPONENT
    return w / w.sum()


def _sample_within(groups: np.ndarray, weights: np.ndarray, wanted: np.ndarray, u: np.ndarray) -> np.ndarray:
    """For each ``wanted`` group, an index drawn proportionally to ``weights`` among entities of that group.

    ``u`` are uniform draws in [0, 1); a group with no member yields -1.
    """
    order = np.argsort(groups, kind="stable")
    cum = np.cumsum(weights[order])
    n_groups = int(max(groups.max(initial=0), wanted.max(initial=0))) + 1
    mass = np.bincount(groups, weights=weights, minlength=n_groups)
    before = np.concatenate([[0.0], np.cumsum(mass)[:-1]])
    pos = np.searchsorted(cum, before[wanted] + u * mass[wanted], side="right")
    picked = order[np.minimum(pos, len(order) - 1)]
    return np.where(mass[wanted] > 0, picked, -1)


def simulate(rows: int = 100_000, *, users: int = 2000, items: int = 5000, seed: int = 0) -> SearchLog:
    """Draw the hidden world and ``rows`` impressions from it (vectorized, deterministic by ``seed``)."""
    rng = np.random.default_rng(seed)
    # Items.
    category_sizes = rng.dirichlet(np.full(N_CATEGORIES, 2.0))
    item_category = rng.choice(N_CATEGORIES, size=items, p=category_sizes)
    item_brand = rng.integers(0, N_BRANDS, size=items)
    category_log_price = rng.normal(3.0, 0.8, size=N_CATEGORIES)
    item_price = np.exp(category_log_price[item_category] + rng.normal(0.0, 0.5, size=items))
    category_latent = rng.normal(size=(N_CATEGORIES, LATENT_DIM))
    item_latent = (category_latent[item_category] + rng.normal(size=(items, LATENT_DIM))) / np.sqrt(2 * LATENT_DIM)
    item_popularity = _zipf_weights(items, rng)
    # Users.
    user_latent = rng.normal(size=(users, LATENT_DIM))
    user_categories = rng.dirichlet(np.full(N_CATEGORIES, 0.3), size=users)
    user_brand = rng.normal(size=(users, N_BRANDS))
    user_price_sensitivity = rng.gamma(2.0, 0.25, size=users)
    user_activity = _zipf_weights(users, rng)
    # Queries: every category gets at least one when there are enough queries.
    query_category = rng.permutation(np.arange(N_QUERIES) % N_CATEGORIES)

    # Impressions.
    user = rng.choice(users, size=rows, p=user_activity)
    cdf = np.cumsum(user_categories[user], axis=1)
    wanted = np.minimum((rng.random((rows, 1)) * cdf[:, -1:] >= cdf).sum(axis=1), N_CATEGORIES - 1)
    query = _sample_within(query_category, np.ones(N_QUERIES), wanted, rng.random(rows))
    query = np.where(query >= 0, query, rng.integers(0, N_QUERIES, size=rows))
    in_category = _sample_within(item_category, item_popularity, query_category[query], rng.random(rows))
    anywhere = np.minimum(np.searchsorted(np.cumsum(item_popularity), rng.random(rows), side="right"), items - 1)
    item = np.where((rng.random(rows) < IN_CATEGORY_SHARE) & (in_category >= 0), in_category, anywhere)

    # Hidden click model.
    log_price = np.log(item_price)
    logit = (
        W_LATENT * np.einsum("ij,ij->i", user_latent[user], item_latent[item])
        + W_CATEGORY_MATCH * (item_category[item] == query_category[query])
        + W_BRAND * user_brand[user, item_brand[item]]
        - user_price_sensitivity[user] * (log_price[item] - log_price.mean())
        + W_POPULARITY * np.log(item_popularity[item] * items)
    )
    click_prob = 1.0 / (1.0 + np.exp(-(logit + _bias_for_rate(logit, CLICK_RATE))))
    label = (rng.random(rows) < click_prob).astype(np.float32)
    return SearchLog(user, query, item, label, click_prob, item_category, item_brand, item_price, query_category)


def _bias_for_rate(logit: np.ndarray, rate: float) -> float:
    """The bias b with mean(sigmoid(logit + b)) == rate (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def generate(
    rows: int = 100_000,
    *,
    users: int = 2000,
    items: int = 5000,
    seed: int = 0,
    split_seed: int | None = None,
    test_fraction: float = 0.2,
    eval_negatives: int = 100,
    preprocessing: Path | None = None,
) -> Dataset:
    """The synthetic search log as a Dataset: ranking rows (random split) and clicks as retrieval pairs.

    ``seed`` draws the data; ``split_seed`` (default: ``seed``) the split and negatives.
    """
    if min(rows, users, items) < 1:
        raise DataError(f"synthetic: rows={rows}, users={users}, items={items} must all be at least 1")
    split_seed = seed if split_seed is None else split_seed
    log = simulate(rows, users=users, items=items, seed=seed)
    prep = Preprocessor(preprocessing)
    edges = np.quantile(log.item_price, np.linspace(0, 1, N_PRICE_BUCKETS + 1)[1:-1])
    item_bucket = np.searchsorted(edges, log.item_price, side="right")
    catalog = {
        "user_id": np.arange(users),
        "item_id": np.arange(items),
        "query_id": np.arange(N_QUERIES),
        "category": log.item_category,
        "brand": log.item_brand,
        "price_bucket": item_bucket,
    }
    per_row = {
        "user_id": log.user,
        "item_id": log.item,
        "query_id": log.query,
        "category": log.item_category[log.item],
        "brand": log.item_brand[log.item],
        "price_bucket": item_bucket[log.item],
    }
    train, test = random_split(rows, test_fraction, split_seed)
    sparse_ids = [encode(prep.vocabulary(n, per_row[n][train], extend=catalog[n]), per_row[n]) for n in SPARSE_NAMES]
    impressions = np.bincount(log.item[train], minlength=items).astype(np.float64)
    match = (log.item_category[log.item] == log.query_category[log.query]).astype(np.float64)
    dense_raw = [log.item_price[log.item], impressions[log.item], match]
    transforms = [
        prep.transform("price", dense_raw[0][train], kind="log1p"),
        prep.transform("item_popularity", dense_raw[1][train], kind="log1p"),
        prep.transform("query_category_match", None, standardize=False),
    ]
    data = ranking_data(prep, SPARSE_NAMES, sparse_ids, transforms, dense_raw, log.label)

    clicks = np.flatnonzero(log.label == 1)
    retrieval, _, _ = build_retrieval(
        prep.features(USER_COLUMNS),
        prep.features(ITEM_COLUMNS),
        table(prep, USER_COLUMNS, [catalog[n] for n in USER_COLUMNS]),
        table(prep, ITEM_COLUMNS, [catalog[n] for n in ITEM_COLUMNS]),
        log.user[clicks],
        log.item[clicks],
        clicks,
        eval_negatives,
        split_seed,
    )
    return Dataset(
        name="synthetic",
        spec=f"synthetic:{rows},users={users},items={items},seed={seed}",
        vocabularies=prep.vocabularies,
        dense_transforms=prep.transforms,
        ranking_train=data.take(train),
        ranking_test=data.take(test),
        retrieval=retrieval,
        corrupt_rows=0,
    )
