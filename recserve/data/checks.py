"""Consistency check of a Dataset (what every reader promises to models and serving)."""

from __future__ import annotations

import numpy as np

from recserve.data.schema import Dataset, RankingData, SparseFeature


def check_dataset(ds: Dataset) -> None:
    """Raise ValueError naming the first broken promise: dtypes, contiguity, id ranges, vocab/transform alignment."""
    for name in ("ranking_train", "ranking_test"):
        data = getattr(ds, name)
        if data is not None:
            _check_ranking(ds, name, data)
    if ds.ranking_train is not None:
        names = [t.name for t in ds.dense_transforms]
        if names != ds.ranking_train.dense_names:
            raise ValueError(
                f"dense_transforms {names} are not aligned with dense_names {ds.ranking_train.dense_names}"
            )
    r = ds.retrieval
    if r is None:
        return
    _check_ids(ds, "user_table", r.user_table, r.user_features)
    _check_ids(ds, "item_table", r.item_table, r.item_features)
    for name, pairs, width in (("train_pairs", r.train_pairs, 2), ("test_pairs", r.test_pairs, 2)):
        _check_array(name, pairs, np.int64, 2)
        if pairs.shape[1] != width:
            raise ValueError(f"{name} has {pairs.shape[1]} columns, expected {width}")
        if not (_within(pairs[:, 0], len(r.user_table)) and _within(pairs[:, 1], len(r.item_table))):
            raise ValueError(f"{name} holds rows outside the user/item tables")
    _check_array("eval_negatives", r.eval_negatives, np.int64, 2)
    if len(r.eval_negatives) != len(r.test_pairs):
        raise ValueError(f"eval_negatives has {len(r.eval_negatives)} rows for {len(r.test_pairs)} test pairs")
    if not _within(r.eval_negatives, len(r.item_table)):
        raise ValueError("eval_negatives holds rows outside the item table")


def _check_ranking(ds: Dataset, name: str, data: RankingData) -> None:
    _check_ids(ds, f"{name}.sparse", data.sparse, data.sparse_features)
    _check_array(f"{name}.dense", data.dense, np.float32, 2)
    _check_array(f"{name}.label", data.label, np.float32, 1)
    n = len(data.label)
    if data.sparse.shape[0] != n or data.dense.shape != (n, len(data.dense_names)):
        raise ValueError(f"{name}: sparse {data.sparse.shape}, dense {data.dense.shape} and label ({n},) disagree")
    if not np.isin(data.label, (0.0, 1.0)).all():
        raise ValueError(f"{name}: labels must be 0 or 1")
    if not np.isfinite(data.dense).all():
        raise ValueError(f"{name}: dense holds non-finite values")


def _check_ids(ds: Dataset, name: str, ids: np.ndarray, features: list[SparseFeature]) -> None:
    _check_array(name, ids, np.int64, 2)
    if ids.shape[1] != len(features):
        raise ValueError(f"{name} has {ids.shape[1]} columns for {len(features)} features")
    for j, f in enumerate(features):
        vocab = ds.vocabularies.get(f.name)
        if vocab is None or vocab.cardinality != f.cardinality:
            raise ValueError(f"{name}: feature {f.name} has no vocabulary of cardinality {f.cardinality}")
        if not _within(ids[:, j], f.cardinality):
            raise ValueError(f"{name}: ids of {f.name} outside [0, {f.cardinality})")


def _within(a: np.ndarray, upper: int) -> bool:
    """All values in [0, upper)."""
    return a.size == 0 or (a.min() >= 0 and a.max() < upper)


def _check_array(name: str, a: np.ndarray, dtype: type, ndim: int) -> None:
    if a.dtype != dtype or a.ndim != ndim or not a.flags.c_contiguous:
        raise ValueError(
            f"{name}: expected a C-contiguous {np.dtype(dtype)} array of {ndim} dims, got {a.dtype} {a.shape}"
        )
