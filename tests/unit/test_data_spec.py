"""Spec parsing, spec errors, preprocessing reuse, and smoke loads of the real datasets (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.data import VALID_FORMS, Dataset, load_dataset, parse_spec
from recserve.data.checks import check_dataset
from recserve.errors import DataError, RecserveError

SHARED = Path("/work/shared/datasets")


def criteo_line(label: str, ints: list[str], cats: list[str]) -> str:
    return "\t".join([label, *ints, *cats])


def write_criteo(path: Path, rows: int, token: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(rows):
        ints = [str(int(v)) for v in rng.integers(0, 50, 13)]
        cats = [f"{token if j == 0 else 'c'}{rng.integers(0, 3)}" for j in range(26)]
        lines.append(criteo_line(str(i % 2), ints, cats))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parse_spec_forms() -> None:
    s = parse_spec("criteo:/x/train.txt,min_freq=3")
    assert (s.kind, s.path, s.options) == ("criteo", "/x/train.txt", {"min_freq": 3})
    s = parse_spec("interactions:/x/log.csv,meta=/x/meta.csv,neg_ratio=2")
    assert (s.kind, s.path, s.options) == ("interactions", "/x/log.csv", {"meta": "/x/meta.csv", "neg_ratio": 2})
    assert parse_spec("synthetic").path is None
    s = parse_spec("synthetic:500,users=10,items=20,seed=3")
    assert (s.path, s.options) == ("500", {"users": 10, "items": 20, "seed": 3})
    assert parse_spec("movielens:/data/ml-100k").kind == "movielens"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("parquet:/x", "unknown kind 'parquet'"),
        ("criteo", "criteo needs a path"),
        ("movielens:", "movielens needs a path"),
        ("criteo:/x,min_freq=abc", "must be a non-negative integer"),
        ("criteo:/x,bogus=1", "unknown option 'bogus' for criteo"),
        ("synthetic:lots", "positive integer row count"),
        ("synthetic,users", "is not key=value"),
        ("movielens:/x,meta=/y", "unknown option 'meta' for movielens"),
    ],
)
def test_bad_specs_list_valid_forms(spec: str, needle: str) -> None:
    with pytest.raises(DataError) as e:
        load_dataset(spec)
    assert needle in str(e.value)
    assert VALID_FORMS in str(e.value)
    assert isinstance(e.value, RecserveError)


def test_missing_files_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"criteo:.*nope\.txt: file not found; point the spec at a Criteo"):
        load_dataset(f"criteo:{tmp_path}/nope.txt")
    with pytest.raises(DataError, match=r"u\.data not found; point the spec at the ml-100k folder"):
        load_dataset(f"movielens:{tmp_path}")
    with pytest.raises(DataError, match="folder not found"):
        load_dataset(f"movielens:{tmp_path}/absent")
    with pytest.raises(DataError, match="interaction log with a header"):
        load_dataset(f"interactions:{tmp_path}/log.csv")


def test_bad_load_arguments() -> None:
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset("synthetic:100", test_fraction=1.5)
    with pytest.raises(DataError, match="eval_negatives"):
        load_dataset("synthetic:100", eval_negatives=-1)
    with pytest.raises(DataError, match="lower eval_negatives"):
        load_dataset("synthetic:2000,users=20,items=30", eval_negatives=50)


def test_spec_is_kept_and_split_is_deterministic(tmp_path: Path) -> None:
    path = write_criteo(tmp_path / "a.txt", 60, "a", seed=0)
    spec = f"criteo:{path}"
    a, b = load_dataset(spec, seed=7), load_dataset(spec, seed=7)
    c = load_dataset(spec, seed=8)
    assert a.spec == spec
    assert np.array_equal(a.ranking_test.dense, b.ranking_test.dense)
    assert not np.array_equal(a.ranking_test.dense, c.ranking_test.dense)


def test_preprocessing_reuse_gives_identical_ids(tmp_path: Path) -> None:
    first = load_dataset(f"criteo:{write_criteo(tmp_path / 'a.txt', 80, 'a', seed=0)}")
    saved = tmp_path / "prep.json"
    first.save_preprocessing(saved)

    # A second file: column C1 holds tokens b0..b2 never seen before; the other columns share tokens.
    other = write_criteo(tmp_path / "b.txt", 40, "b", seed=1)
    fresh = load_dataset(f"criteo:{other}")
    reused = load_dataset(f"criteo:{other}", preprocessing=saved)
    check_dataset(reused)
    assert reused.vocabularies["C2"].tokens == first.vocabularies["C2"].tokens
    assert reused.dense_transforms == first.dense_transforms
    assert fresh.dense_transforms != first.dense_transforms
    for data in (reused.ranking_train, reused.ranking_test):
        assert (data.sparse[:, 0] == 0).all()  # unseen tokens -> OOV
        vocab = first.vocabularies["C2"]
        ids = data.sparse[:, 1]
        assert all(vocab.tokens[i - 1] in {"c0", "c1", "c2"} for i in ids)
    # the same raw value maps to the same id in both datasets
    assert first.vocabularies["C5"].lookup(["c1"])[0] == reused.vocabularies["C5"].lookup(["c1"])[0]
    assert [f.cardinality for f in reused.ranking_train.sparse_features] == [
        f.cardinality for f in first.ranking_train.sparse_features
    ]


def test_preprocessing_reuse_synthetic_and_errors(tmp_path: Path) -> None:
    a = load_dataset("synthetic:3000,users=50,items=80,seed=1", eval_negatives=5)
    saved = tmp_path / "prep.json"
    a.save_preprocessing(saved)
    b = load_dataset("synthetic:3000,users=50,items=80,seed=2", eval_negatives=5, preprocessing=saved)
    check_dataset(b)
    for name in ("user_id", "item_id", "brand"):
        assert b.vocabularies[name].tokens == a.vocabularies[name].tokens
    item = a.vocabularies["item_id"]
    assert np.array_equal(b.retrieval.item_table[:, 0], item.lookup(str(i) for i in range(80)))

    with pytest.raises(DataError, match="no vocabulary for feature 'C1'"):
        load_dataset(f"criteo:{write_criteo(tmp_path / 'c.txt', 20, 'a', 0)}", preprocessing=saved)
    with pytest.raises(DataError, match=r"preprocessing file .* not found"):
        load_dataset("synthetic:100", preprocessing=tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid preprocessing JSON"):
        load_dataset("synthetic:100", preprocessing=tmp_path / "broken.json")


REAL = [
    ("criteo:{d}/criteo_sample/train.txt", "criteo_sample"),
    ("movielens:{d}/movielens_100k", "movielens_100k"),
    ("interactions:{d}/ecommerce_amazon_grocery/train.csv,meta={d}/ecommerce_amazon_grocery/item_meta.csv",
     "ecommerce_amazon_grocery"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "folder"), REAL)
def test_real_datasets_load(spec: str, folder: str) -> None:
    if not (SHARED / folder).is_dir():
        pytest.skip(f"{SHARED / folder} is absent in this environment")
    ds: Dataset = load_dataset(spec.format(d=SHARED))
    check_dataset(ds)
    assert ds.corrupt_rows == 0
    assert len(ds.ranking_train) > len(ds.ranking_test) > 0
