"""Criteo TSV reader on tiny fixture files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.data import criteo, load_dataset
from recserve.data.checks import check_dataset
from recserve.errors import DataError


def line(label: str = "1", ints: list[str] | None = None, cats: list[str] | None = None) -> str:
    ints = ints if ints is not None else ["1"] * 13
    cats = cats if cats is not None else ["aa"] * 26
    return "\t".join([label, *ints, *cats])


def test_parse_missing_values_and_corrupt_rows(tmp_path: Path) -> None:
    ints = ["3", "", "-2", *["0"] * 10]
    cats = ["x1", "", *["zz"] * 24]
    lines = [
        line("0", ints, cats),
        "",  # blank: skipped silently
        line("1"),
        "1\t2\t3",  # wrong field count
        line("x"),  # non-integer label
        line("1", ["1.5", *["1"] * 12]),  # non-integer integer column
        line("2"),  # label is not 0/1
        line("1")[:-3],  # truncated: the last field is gone (39 fields)
        line("1", cats=[""] * 26),  # every categorical missing: still a valid row
    ]
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines))  # no trailing newline, like the real sample
    label, dense, cats_out, corrupt = criteo.parse(path)
    assert corrupt == 5
    assert label.tolist() == [0.0, 1.0, 1.0]
    assert dense.shape == (3, 13) and cats_out.shape == (3, 26)
    assert (cats_out[2] == "").all()
    assert dense[0, 0] == 3 and np.isnan(dense[0, 1]) and dense[0, 2] == -2
    assert cats_out[0, 0] == "x1" and cats_out[0, 1] == ""


def test_load_dense_transform_and_oov(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(50):
        ints = ["" if i % 5 == 0 else str(rng.integers(0, 100)) for _ in range(13)]
        cats = ["common" if i % 2 else "other", f"unique{i}", ""] + ["k"] * 23
        lines.append(line(str(i % 2), ints, cats))
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(f"criteo:{path},min_freq=2", seed=3)
    check_dataset(ds)
    assert ds.retrieval is None and ds.corrupt_rows == 0
    assert len(ds.ranking_train) == 40 and len(ds.ranking_test) == 10
    assert [f.name for f in ds.ranking_train.sparse_features] == [f"C{i}" for i in range(1, 27)]
    assert ds.ranking_train.dense_names == [f"I{i}" for i in range(1, 14)]

    # min_freq=2: every "uniqueN" token is rare -> OOV; the all-missing column is OOV too.
    assert ds.vocabularies["C2"].cardinality == 1
    assert ds.vocabularies["C3"].cardinality == 1
    for data in (ds.ranking_train, ds.ranking_test):
        assert (data.sparse[:, 1] == 0).all() and (data.sparse[:, 2] == 0).all()
        assert (data.sparse[:, 0] > 0).all()
    assert set(ds.vocabularies["C1"].tokens) == {"common", "other"}
    assert sum(ds.vocabularies["C1"].counts) == 40  # counted on the 40 training rows only

    # log1p + standardize with train statistics; missing -> 0.
    t = ds.dense_transforms[0]
    assert t.kind == "log1p" and t.fill == 0.0
    train_dense = ds.ranking_train.dense
    observed = train_dense[:, 0] != 0
    assert abs(float(train_dense[observed, 0].mean())) < 1e-5
    assert abs(float(train_dense[observed, 0].std()) - 1) < 1e-4

    # without min_freq, the unique tokens of the training rows get ids, test-only ones are OOV
    ds1 = load_dataset(f"criteo:{path}", seed=3)
    assert ds1.vocabularies["C2"].cardinality == 41
    assert (ds1.ranking_train.sparse[:, 1] > 0).all()
    assert (ds1.ranking_test.sparse[:, 1] == 0).all()


def test_missing_dense_is_zero(tmp_path: Path) -> None:
    lines = [line(str(i % 2), ["" if i == 0 else str(i)] + ["1"] * 12) for i in range(10)]
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines))
    ds = load_dataset(f"criteo:{path}", test_fraction=0.5)
    both = np.concatenate([ds.ranking_train.dense, ds.ranking_test.dense])
    assert (both[:, 0] == 0).sum() == 1  # the only missing value, all others are non-zero after standardizing
    assert np.allclose(both[:, 1], 0.0)  # constant column: std -> 1, value - mean = 0


def test_all_corrupt_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "test_unlabeled.txt"
    path.write_text("\n".join("\t".join(["1"] * 13 + ["a"] * 26) for _ in range(3)))
    with pytest.raises(DataError, match=r"no usable rows \(3 corrupt\); expected 40 tab-separated fields"):
        load_dataset(f"criteo:{path}")


def test_real_sample() -> None:
    path = Path("/work/shared/datasets/criteo_sample/train.txt")
    if not path.is_file():
        pytest.skip("criteo sample absent in this environment")
    ds = load_dataset(f"criteo:{path}")
    check_dataset(ds)
    assert len(ds.ranking_train) + len(ds.ranking_test) == 900
    assert ds.corrupt_rows == 0
    assert int(ds.ranking_train.label.sum() + ds.ranking_test.label.sum()) == 176
