"""``tensors:PATH`` rows in a model's own input form: .npz and .parquet, split like the other readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recserve.data import load_dataset
from recserve.data.schema import TensorRows
from recserve.errors import DataError


def rows(n: int = 500) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"ids": rng.integers(0, 50, (n, 3)), "x": rng.normal(size=n).astype(np.float32),
            "label": (rng.random(n) < 0.3).astype(np.float32)}


def test_npz_is_split_train_validation_test(tmp_path: Path) -> None:
    data = rows()
    np.savez(tmp_path / "r.npz", **data)
    ds = load_dataset(f"tensors:{tmp_path}/r.npz")
    assert ds.name == "tensors" and ds.vocabularies == {}
    assert isinstance(ds.ranking_train, TensorRows) and set(ds.ranking_train.inputs()) == {"ids", "x"}
    assert len(ds.ranking_train) == 400 and len(ds.ranking_test) == 100
    assert len(ds.ranking_validation()) == 40 and len(ds.ranking_fit()) == 360
    # every row lands in exactly one split, unchanged
    seen = np.concatenate([ds.ranking_fit().inputs()["x"], ds.ranking_validation().inputs()["x"],
                           ds.ranking_test.inputs()["x"]])
    assert sorted(seen.tolist()) == sorted(data["x"].tolist())
    assert ds.ranking_train.inputs()["ids"].dtype == np.int64


def test_parquet_lists_become_2d(tmp_path: Path) -> None:
    data = rows()
    table = pa.table({"ids": pa.FixedSizeListArray.from_arrays(pa.array(data["ids"].ravel()), 3),
                      "x": data["x"], "label": data["label"]})
    pq.write_table(table, tmp_path / "r.parquet")
    a = load_dataset(f"tensors:{tmp_path}/r.parquet")
    np.savez(tmp_path / "r.npz", **data)
    b = load_dataset(f"tensors:{tmp_path}/r.npz")
    np.testing.assert_array_equal(a.ranking_test.inputs()["ids"], b.ranking_test.inputs()["ids"])
    # variable-length lists are fine when every row has the same length
    table = pa.table({"ids": pa.array([list(r) for r in data["ids"]]), "x": data["x"], "label": data["label"]})
    pq.write_table(table, tmp_path / "v.parquet")
    assert load_dataset(f"tensors:{tmp_path}/v.parquet").ranking_train.inputs()["ids"].shape == (400, 3)


@pytest.mark.parametrize(("arrays", "needle"), [
    ({"x": np.zeros(4)}, "no 'label' array"),
    ({"label": np.array([0, 1, 0, 1])}, "only a label"),
    ({"x": np.zeros(3), "label": np.array([0, 1, 0, 1])}, "has 3 rows, 'label' has 4"),
    ({"x": np.array(["a", "b", "c", "d"]), "label": np.array([0, 1, 0, 1])}, "dtype <U1"),
    ({"x": np.zeros(4), "label": np.array([0, 1, 2, 1])}, "one 0/1 value per row"),
    ({"x": np.zeros(4), "label": np.zeros(4)}, "AUC needs both 0 and 1"),
])
def test_bad_arrays_are_data_errors(tmp_path: Path, arrays, needle: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=needle):
        load_dataset(f"tensors:{tmp_path}/bad.npz")


def test_bad_files_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_dataset(f"tensors:{tmp_path}/none.npz")
    (tmp_path / "r.csv").write_text("a,label\n1,0\n")
    with pytest.raises(DataError, match="use .npz or .parquet"):
        load_dataset(f"tensors:{tmp_path}/r.csv")
    (tmp_path / "r.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(f"tensors:{tmp_path}/r.npz")
    (tmp_path / "r.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        load_dataset(f"tensors:{tmp_path}/r.parquet")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("tensors")
