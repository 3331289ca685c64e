"""An implicit interaction log (CSV or TSV with user, item, time columns) plus optional item metadata.

Retrieval: leave-last-out per user by time. Ranking view: each positive plus ``neg_ratio`` sampled
items the user never interacted with (label 0), split by the same leave-last-out.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.data.features import Preprocessor, no_rows, ranking_data, require_file, table
from recserve.data.schema import Dataset
from recserve.data.splits import build_retrieval, rng_for, sample_negatives, validation_of
from recserve.errors import DataError

USER_KEYS = ("user", "user_id")
ITEM_KEYS = ("item", "item_id")
TIME_KEYS = ("time", "timestamp")


@dataclass
class Table:
    """A delimited text file with a header: column name -> raw string values."""

    header: list[str]
    rows: list[list[str]]
    corrupt: int


def read_table(path: Path, what: str) -> Table:
    """Read ``path``; the delimiter is tab if the header line holds one, else comma.

    Rows whose field count differs from the header's are corrupt (counted, skipped); blank lines are skipped.
    """
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header_line = f.readline()
        delimiter = "\t" if "\t" in header_line else ","
        header = next(csv.reader([header_line], delimiter=delimiter), [])
        header = [h.strip() for h in header]
        if len(header) < 2:
            raise DataError(
                f"interactions:{path}: the {what} header {header_line.strip()!r} has fewer than 2 columns; "
                "write a header line with tab- or comma-separated column names"
            )
        rows, corrupt = [], 0
        for row in csv.reader(f, delimiter=delimiter):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                corrupt += 1
                continue
            rows.append([v.strip() for v in row])
    return Table(header, rows, corrupt)


def column(t: Table, keys: tuple[str, ...], path: Path, what: str) -> int:
    """Index of the first header column named one of ``keys`` (case-insensitive)."""
    lower = [h.lower() for h in t.header]
    for k in keys:
        if k in lower:
            return lower.index(k)
    raise DataError(f"interactions:{path}: no {what} column in header {t.header}; name it one of {', '.join(keys)}")


@dataclass
class Meta:
    """Item metadata: categorical attribute columns, keyed by raw item id."""

    names: list[str]
    values: dict[str, list[str]]
    corrupt: int


def read_meta(path: Path) -> Meta:
    """Item attributes; columns whose values mostly look like Python lists (``[...]``) are ignored."""
    t = read_table(path, "item metadata")
    key = column(t, ITEM_KEYS, path, "item")
    attrs = []
    for j in range(len(t.header)):
        filled = [r[j] for r in t.rows if r[j]]
        if j != key and not (filled and sum(v.startswith("[") for v in filled) * 2 > len(filled)):
            attrs.append(j)
    values: dict[str, list[str]] = {}
    corrupt = t.corrupt
    for r in t.rows:
        if not r[key]:
            corrupt += 1
        elif r[key] not in values:
            values[r[key]] = [r[j] for j in attrs]
    return Meta([t.header[j] for j in attrs], values, corrupt)


def read_log(path: Path) -> tuple[list[str], list[str], np.ndarray, int]:
    """(users, items, times float64, corrupt): rows with an empty user/item or a non-numeric time are corrupt."""
    t = read_table(path, "interaction log")
    cu, ci, ct = (
        column(t, keys, path, w) for keys, w in ((USER_KEYS, "user"), (ITEM_KEYS, "item"), (TIME_KEYS, "time"))
    )
    users, items, times = [], [], []
    corrupt = t.corrupt
    for r in t.rows:
        try:
            time = float(r[ct])
        except ValueError:
            time = np.nan
        if not r[cu] or not r[ci] or not np.isfinite(time):
            corrupt += 1
            continue
        users.append(r[cu])
        items.append(r[ci])
        times.append(time)
    return users, items, np.asarray(times, dtype=np.float64), corrupt


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
    hint = "point the spec at a CSV/TSV interaction log with a header holding user, item and time columns"
    require_file(path, "interactions", "file", hint)
    if meta is not None:
        require_file(
            Path(meta), "interactions", f"meta file {meta}", "point meta= at a CSV/TSV with an item or item_id column"
        )
    if neg_ratio < 1:
        raise DataError(f"interactions:{path}: neg_ratio={neg_ratio} must be at least 1 (negatives per positive)")
    prep = Preprocessor(preprocessing)
    log_users, log_items, times, corrupt = read_log(path)
    if not log_users:
        raise no_rows("interactions", path, corrupt, "rows with a user, an item and a numeric time")
    m = read_meta(Path(meta)) if meta is not None else Meta([], {}, 0)
    corrupt += m.corrupt

    # Catalog rows: users / items in order of first appearance (metadata-only items last).
    user_ids = list(dict.fromkeys(log_users))
    item_ids = list(dict.fromkeys(log_items + list(m.values)))
    user_row_of = {u: r for r, u in enumerate(user_ids)}
    item_row_of = {i: r for r, i in enumerate(item_ids)}
    users = np.fromiter((user_row_of[u] for u in log_users), dtype=np.int64, count=len(log_users))
    items = np.fromiter((item_row_of[i] for i in log_items), dtype=np.int64, count=len(log_items))
    missing = [""] * len(m.names)
    item_columns = {"item_id": np.asarray(item_ids, dtype=str)}
    for j, name in enumerate(m.names):
        item_columns[name] = np.asarray([m.values.get(i, missing)[j] for i in item_ids], dtype=str)
    user_columns = {"user_id": np.asarray(user_ids, dtype=str)}
    item_names = list(item_columns)

    # The split is per user, so vocabularies count every interaction (extended with the catalog).
    prep.vocabulary("user_id", user_columns["user_id"][users], extend=user_columns["user_id"])
    for name in item_names:
        prep.vocabulary(name, item_columns[name][items], extend=item_columns[name])
    retrieval, train, test = build_retrieval(
        prep.features(["user_id"]),
        prep.features(item_names),
        table(prep, ["user_id"], [user_columns["user_id"]]),
        table(prep, item_names, [item_columns[n] for n in item_names]),
        users,
        items,
        times,
        eval_negatives,
        seed,
    )

    # Ranking view: [positive, neg_ratio negatives] per interaction; popularity counted on train only.
    popularity = np.bincount(items[train], minlength=len(item_ids)).astype(np.float64)
    ranking_split = []
    for idx, purpose in ((train, "train_negatives"), (test, "test_negatives")):
        negs = sample_negatives(users[idx], len(item_ids), users, items, neg_ratio, rng_for(seed, purpose), "neg_ratio")
        row_items = np.concatenate([items[idx, None], negs], axis=1).ravel()
        row_users = np.repeat(users[idx], 1 + neg_ratio)
        label = np.tile(np.r_[1.0, np.zeros(neg_ratio)], len(idx))
        ranking_split.append((row_users, row_items, label))
    transform = prep.transform("item_popularity", popularity[ranking_split[0][1]], kind="log1p")
    ranking = [
        ranking_data(
            prep,
            ["user_id", *item_names],
            [retrieval.user_table[u, 0], *retrieval.item_table[it].T],
            [transform],
            [popularity[it]],
            label,
        )
        for u, it, label in ranking_split
    ]
    # Validation rows: the ranking rows of each user's last training positive (carved like the test split).
    _, val = validation_of(users, times, train)
    val_rows = np.searchsorted(train, val)[:, None] * (1 + neg_ratio) + np.arange(1 + neg_ratio)
    return Dataset(
        name="interactions",
        spec=f"interactions:{path}" + (f",meta={meta}" if meta is not None else ""),
        vocabularies=prep.vocabularies,
        dense_transforms=prep.transforms,
        ranking_train=ranking[0],
        ranking_test=ranking[1],
        retrieval=retrieval,
        corrupt_rows=corrupt,
        validation_index=np.sort(val_rows.ravel()),
    )
