"""Interaction-log reader (CSV/TSV, optional item metadata) on tiny fixture files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.data import Dataset, load_dataset
from recserve.data.checks import check_dataset
from recserve.errors import DataError

LOG = [
    ("u1", "a", "1"),
    ("u1", "b", "2"),
    ("u1", "c", "2"),  # ties with b: the later line is the last interaction
    ("u2", "a", "5"),
    ("u2", "d", "3"),
    ("u3", "b", "1"),  # a single interaction: no test pair
    ("u5", "e", "1"),
    ("u5", "a", "0"),
]
CORRUPT = [("u4", "", "3"), ("u4", "a", "soon"), ("u4", "a")]
META = [("a", "acme", "[b, c]"), ("b", "bolt", "[a]"), ("c", "", "[]"), ("d", "acme", "[]"), ("f", "zeta", "[a]")]
LAST = {"u1": "c", "u2": "a", "u5": "e"}
SEEN = {"u1": {"a", "b", "c"}, "u2": {"a", "d"}, "u3": {"b"}, "u5": {"a", "e"}}


def write(path: Path, header: list[str], rows: list[tuple[str, ...]], delimiter: str) -> Path:
    def cell(v: str) -> str:
        return f'"{v}"' if delimiter in v else v

    lines = [delimiter.join(header)] + [delimiter.join(cell(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_log(folder: Path, delimiter: str, header: list[str] | None = None) -> Path:
    rows = LOG[:5] + CORRUPT + LOG[5:]
    return write(folder / "log.csv", header or ["user", "item", "timestamp"], rows, delimiter)


def write_meta(folder: Path, delimiter: str) -> Path:
    return write(folder / "meta.csv", ["item_id", "brand", "also_bought"], META, delimiter)


def decode(ds: Dataset, name: str, ids: np.ndarray) -> list[str]:
    tokens = ds.vocabularies[name].tokens
    return ["" if i == 0 else tokens[i - 1] for i in ids]


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_with_meta(tmp_path: Path, delimiter: str) -> None:
    log, meta = write_log(tmp_path, delimiter), write_meta(tmp_path, delimiter)
    ds = load_dataset(f"interactions:{log},meta={meta},neg_ratio=2", eval_negatives=2)
    check_dataset(ds)
    assert ds.corrupt_rows == len(CORRUPT)
    r = ds.retrieval
    assert [f.name for f in r.user_features] == ["user_id"]
    assert [f.name for f in r.item_features] == ["item_id", "brand"]  # the list column is ignored
    users = decode(ds, "user_id", r.user_table[:, 0])
    items = decode(ds, "item_id", r.item_table[:, 0])
    assert sorted(items) == ["a", "b", "c", "d", "e", "f"]  # f: metadata only
    brand = dict(zip(items, decode(ds, "brand", r.item_table[:, 1]), strict=True))
    assert brand == {"a": "acme", "b": "bolt", "c": "", "d": "acme", "e": "", "f": "zeta"}

    assert {users[u]: items[i] for u, i in r.test_pairs} == LAST
    # validation: each user's last training positive, carved the same way as the test split
    fit_and_val = np.concatenate([r.train_pairs, r.validation_pairs])
    assert sorted((users[u], items[i]) for u, i in fit_and_val) == sorted(
        (u, i) for u, i, _ in LOG if LAST.get(u) != i
    )
    assert len(r.validation_pairs) and len(r.validation_negatives) == len(r.validation_pairs)
    val = ds.ranking_validation()
    assert len(val) == 3 * len(r.validation_pairs) and val.label.tolist()[:3] == [1.0, 0.0, 0.0]
    for (u, _), negs in zip(r.test_pairs, r.eval_negatives, strict=True):
        assert len(set(negs)) == 2 and not {items[n] for n in negs} & SEEN[users[u]]

    # ranking view: [positive, 2 negatives] per interaction, split by the same leave-last-out
    train, test = ds.ranking_train, ds.ranking_test
    assert [f.name for f in train.sparse_features] == ["user_id", "item_id", "brand"]
    assert train.dense_names == ["item_popularity"]
    assert (len(train), len(test)) == (15, 9)
    assert train.label.tolist() == [1.0, 0.0, 0.0] * 5
    test_pos = test.sparse[test.label == 1]
    assert dict(zip(decode(ds, "user_id", test_pos[:, 0]), decode(ds, "item_id", test_pos[:, 1]), strict=True)) == LAST
    popularity = {"a": 2, "b": 2, "d": 1, "c": 0, "e": 0, "f": 0}  # train interactions per item
    t = ds.dense_transforms[0]
    assert t.kind == "log1p"
    for data in (train, test):
        row_users = decode(ds, "user_id", data.sparse[:, 0])
        row_items = decode(ds, "item_id", data.sparse[:, 1])
        row_brands = decode(ds, "brand", data.sparse[:, 2])
        for u, i, b, y, d in zip(row_users, row_items, row_brands, data.label, data.dense[:, 0], strict=True):
            assert b == brand[i]
            assert (i in SEEN[u]) == (y == 1.0)  # negatives are never interacted items
            assert d == pytest.approx(t.apply(np.array([popularity[i]]))[0])


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_without_meta_and_aliases(tmp_path: Path, delimiter: str) -> None:
    log = write_log(tmp_path, delimiter, header=["user_id", "item_id", "time"])
    ds = load_dataset(f"interactions:{log},neg_ratio=2", eval_negatives=1, seed=3)
    check_dataset(ds)
    r = ds.retrieval
    assert r.item_table.shape == (5, 1) and r.user_table.shape == (4, 1)
    assert [f.name for f in ds.ranking_train.sparse_features] == ["user_id", "item_id"]
    assert len(ds.ranking_train) == 5 * 3
    again = load_dataset(f"interactions:{log},neg_ratio=2", eval_negatives=1, seed=3)
    assert np.array_equal(again.ranking_train.sparse, ds.ranking_train.sparse)


def test_errors(tmp_path: Path) -> None:
    log = write(tmp_path / "log.tsv", ["user", "item", "when"], [("u", "i", "1")], "\t")
    with pytest.raises(DataError, match=r"no time column in header \['user', 'item', 'when'\]; name it one of time"):
        load_dataset(f"interactions:{log}")
    log = write_log(tmp_path, ",")
    with pytest.raises(DataError, match=r"meta file .* not found"):
        load_dataset(f"interactions:{log},meta={tmp_path}/absent.csv")
    with pytest.raises(DataError, match="lower neg_ratio"):
        load_dataset(f"interactions:{log},neg_ratio=4", eval_negatives=1)  # u1 has only d, e left
    with pytest.raises(DataError, match="neg_ratio=0 must be at least 1"):
        load_dataset(f"interactions:{log},neg_ratio=0")
    empty = write(tmp_path / "empty.csv", ["user", "item", "time"], [("u", "i", "later")], ",")
    with pytest.raises(DataError, match=r"no usable rows \(1 corrupt\)"):
        load_dataset(f"interactions:{empty}")


def test_real_grocery() -> None:
    folder = Path("/work/shared/datasets/ecommerce_amazon_grocery")
    if not folder.is_dir():
        pytest.skip("grocery dataset absent in this environment")
    ds = load_dataset(f"interactions:{folder}/train.csv,meta={folder}/item_meta.csv", eval_negatives=10)
    assert [f.name for f in ds.retrieval.item_features] == ["item_id", "i_category"]
    assert ds.retrieval.test_pairs.shape == (14681, 2)
    r = ds.retrieval
    assert len(ds.ranking_train) == 5 * (len(r.train_pairs) + len(r.validation_pairs))  # default neg_ratio=4
    assert len(ds.ranking_validation()) == 5 * len(r.validation_pairs)
