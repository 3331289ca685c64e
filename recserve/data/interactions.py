"""An implicit interaction log (CSV, TSV or Parquet with user, item, time columns; one file, a directory of
shards or a glob) plus optional item metadata.

Retrieval: leave-last-out per user by time. Ranking view: each positive plus ``neg_ratio`` sampled
items the user never interacted with (label 0), split by the same leave-last-out; it is made by
:mod:`recserve.data.logs`, which also streams it from logs larger than memory (``recserve train --workers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.data import logs
from recserve.data.features import Preprocessor, read_text_blocks, require_file, table
from recserve.data.schema import Dataset, RankingData
from recserve.data.splits import TEST, VALIDATION, build_retrieval
from recserve.errors import DataError


@dataclass
class Meta:
    """Item metadata: categorical attribute columns, keyed by raw item id."""

    names: list[str]
    values: dict[str, list[str]]
    corrupt: int


def read_meta(path: Path) -> Meta:
    """Item attributes; columns whose values mostly look like Python lists (``[...]``) are ignored."""
    blocks = list(read_text_blocks(path, "interactions", "item metadata"))
    if not blocks:
        raise DataError(f"interactions:{path}: the item metadata file is empty; write a header line with an item "
                        "column and attribute columns")
    header = blocks[0][0]
    key = logs.column(header, logs.ITEM_KEYS, str(path), "item")
    columns = {n: [v for _, t, _ in blocks for v in t.column(n).to_pylist()] for n in header}
    attrs = []
    for n in header:
        filled = [v for v in columns[n] if v]
        if n != key and not (filled and sum(v.startswith("[") for v in filled) * 2 > len(filled)):
            attrs.append(n)
    values: dict[str, list[str]] = {}
    corrupt = sum(c for _, _, c in blocks)
    for r, item in enumerate(columns[key]):
        if not item:
            corrupt += 1
        elif item not in values:
            values[item] = [columns[n][r] for n in attrs]
    return Meta(attrs, values, corrupt)


def load(
    path: Path,
    *,
    meta: Path | None = None,
    neg_ratio: int = 4,
    seed: int = 0,
    eval_negatives: int = 100,
    preprocessing: Path | None = None,
) -> Dataset:
    """Leave-last-out retrieval plus a ranking view with ``neg_ratio`` sampled negatives per positive."""
    path = Path(path)
    paths = logs.log_paths(path)
    if meta is not None:
        require_file(
            Path(meta), "interactions", f"meta file {meta}", "point meta= at a CSV/TSV with an item or item_id column"
        )
    if neg_ratio < 1:
        raise DataError(f"interactions:{path}: neg_ratio={neg_ratio} must be at least 1 (negatives per positive)")
    blocks = list(logs.read_blocks(paths))
    m = read_meta(Path(meta)) if meta is not None else Meta([], {}, 0)
    fitted = logs.fit(lambda: blocks, str(path), meta=m, neg_ratio=neg_ratio, seed=seed, preprocessing=preprocessing)
    corrupt = fitted.corrupt + m.corrupt
    log_users = [u for b in blocks for u in b.users.to_pylist()]
    log_items = [i for b in blocks for i in b.items.to_pylist()]
    times = np.concatenate([b.times for b in blocks])
    meta_values, meta_names = m.values, m.names

    # Catalog rows: users / items in order of first appearance (metadata-only items last).
    user_ids = list(dict.fromkeys(log_users))
    item_ids = list(dict.fromkeys(log_items + list(meta_values)))
    user_row_of = {u: r for r, u in enumerate(user_ids)}
    item_row_of = {i: r for r, i in enumerate(item_ids)}
    users = np.fromiter((user_row_of[u] for u in log_users), dtype=np.int64, count=len(log_users))
    items = np.fromiter((item_row_of[i] for i in log_items), dtype=np.int64, count=len(log_items))
    missing = [""] * len(meta_names)
    item_columns = {"item_id": np.asarray(item_ids, dtype=str)}
    for j, name in enumerate(meta_names):
        item_columns[name] = np.asarray([meta_values.get(i, missing)[j] for i in item_ids], dtype=str)
    prep = Preprocessor()
    prep.vocabularies = fitted.vocabularies
    item_names = list(item_columns)
    retrieval, _, _ = build_retrieval(
        prep.features(["user_id"]),
        prep.features(item_names),
        table(prep, ["user_id"], [np.asarray(user_ids, dtype=str)]),
        table(prep, item_names, [item_columns[n] for n in item_names]),
        users,
        items,
        times,
        eval_negatives,
        seed,
    )

    # Ranking view (recserve.data.logs): the FIT rows in log order, then the validation rows; the test rows.
    fit_rows = [logs.Encoder(fitted).rows(b) for b in blocks]
    validation = fitted.held_out(VALIDATION)
    ranking_train = RankingData.concat([r for r in fit_rows if len(r)] + [validation])
    n_fit = len(ranking_train) - len(validation)
    return Dataset(
        name="interactions",
        spec=f"interactions:{path}" + (f",meta={meta}" if meta is not None else ""),
        vocabularies=fitted.vocabularies,
        dense_transforms=fitted.transforms,
        ranking_train=ranking_train,
        ranking_test=fitted.held_out(TEST),
        retrieval=retrieval,
        corrupt_rows=corrupt,
        validation_index=np.arange(n_fit, len(ranking_train)),
    )
