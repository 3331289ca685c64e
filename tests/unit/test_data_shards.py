"""Criteo shards streamed (recserve/data/shards.py) against the in-memory reader (recserve/data/criteo.py): one
pass gives the same vocabularies, transforms, splits and encoded rows; the split of a row does not depend on
how the shards are read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recserve.data import criteo, load_dataset, shards
from recserve.data.splits import FIT, TEST, VALIDATION, hashed_split
from recserve.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tsv_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tsv")
    shards.write_synthetic(30_000, out, shard_rows=12_000, seed=4)
    return out


def read_all(paths: list[Path], block_bytes: int = criteo.BLOCK_BYTES) -> tuple:
    blocks = [b for b in criteo.read_blocks(paths, block_bytes) if len(b)]
    return (np.concatenate([b.label for b in blocks]), np.concatenate([b.ints for b in blocks]),
            np.concatenate([b.cats_numpy() for b in blocks]),
            np.concatenate([b.split(7, 0.2, 0.1) for b in blocks]))


def test_write_synthetic_writes_the_shards_it_says(tsv_dir: Path) -> None:
    paths = criteo.shard_paths(tsv_dir)
    assert [p.name for p in paths] == ["part-00000.tsv", "part-00001.tsv", "part-00002.tsv"]
    label, ints, cats, _ = read_all(paths)
    assert len(label) == 30_000 and set(np.unique(label)) == {0.0, 1.0}
    assert 0.05 < label.mean() < 0.6
    assert 0.02 < np.isnan(ints).mean() < 0.08 and 0.005 < (cats == "").mean() < 0.04


def test_parquet_shards_hold_the_same_rows_as_tsv(tmp_path: Path, tsv_dir: Path) -> None:
    shards.write_synthetic(30_000, tmp_path, shard_rows=12_000, seed=4, fmt="parquet")
    a, b = read_all(criteo.shard_paths(tsv_dir)), read_all(criteo.shard_paths(tmp_path))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f")


def test_a_rows_split_does_not_depend_on_the_block_size(tsv_dir: Path) -> None:
    paths = criteo.shard_paths(tsv_dir)
    big, small = read_all(paths)[3], read_all(paths, block_bytes=64 << 10)[3]
    assert np.array_equal(big, small)
    assert abs((big == TEST).mean() - 0.2) < 0.02 and abs((big == VALIDATION).mean() - 0.08) < 0.02
    # adding a shard moves no row of the others
    assert np.array_equal(hashed_split(1, np.arange(100), 7, 0.2, 0.1)[:50], hashed_split(1, np.arange(50), 7, 0.2, 0.1))
    assert not np.array_equal(hashed_split(1, np.arange(100), 7, 0.2, 0.1), hashed_split(2, np.arange(100), 7, 0.2, 0.1))


@pytest.mark.parametrize("min_freq", [1, 3])
def test_one_streamed_pass_fits_what_the_in_memory_reader_fits(tsv_dir: Path, min_freq: int) -> None:
    fitted = shards.fit(criteo.shard_paths(tsv_dir), shards.SplitSettings(seed=5), min_freq=min_freq,
                        max_validation_rows=1_000, block_bytes=256 << 10)
    ds = load_dataset(f"criteo:{tsv_dir},min_freq={min_freq}", seed=5)
    assert list(fitted.vocabularies) == list(ds.vocabularies) == criteo.SPARSE_NAMES
    for name in criteo.SPARSE_NAMES:
        assert fitted.vocabularies[name].tokens == ds.vocabularies[name].tokens, name
        assert fitted.vocabularies[name].counts == ds.vocabularies[name].counts, name
    if min_freq > 1:
        assert min(min(v.counts) for v in fitted.vocabularies.values() if v.counts) >= min_freq
    for a, b in zip(fitted.transforms, ds.dense_transforms, strict=True):
        assert (a.name, a.kind) == (b.name, b.kind)
        assert a.mean == pytest.approx(b.mean, rel=1e-9, abs=1e-12) and a.std == pytest.approx(b.std, rel=1e-9)
    assert fitted.rows == {"fit": len(ds.ranking_fit()), "validation": len(ds.ranking_validation()),
                           "test": len(ds.ranking_test)}
    # the validation rows kept (the first 1,000), encoded as the in-memory reader encodes them
    v = ds.ranking_validation()
    assert len(fitted.validation) == 1_000 and fitted.validation_total == len(v)
    assert np.array_equal(fitted.validation.sparse, v.sparse[:1_000])
    assert np.allclose(fitted.validation.dense, v.dense[:1_000], atol=1e-6)
    assert np.array_equal(fitted.validation.label, v.label[:1_000])
    assert (fitted.validation.sparse == 0).any()  # missing values and (with min_freq) rare tokens are OOV


def test_the_encoder_keeps_one_split_and_encodes_as_in_memory(tsv_dir: Path) -> None:
    paths = criteo.shard_paths(tsv_dir)
    split = shards.SplitSettings(seed=5)
    fitted = shards.fit(paths, split, max_validation_rows=10)
    ds = load_dataset(f"criteo:{tsv_dir}", seed=5)
    for keep, expect in ((TEST, ds.ranking_test), (FIT, ds.ranking_fit())):
        enc = shards.Encoder(fitted.vocabularies, fitted.transforms, split, keep)
        parts = [enc.arrays(enc.select(b)) for b in criteo.read_blocks(paths)]
        sparse = np.concatenate([p["sparse"] for p in parts])
        assert np.array_equal(sparse, expect.sparse)
        assert np.allclose(np.concatenate([p["dense"] for p in parts]), expect.dense, atol=1e-6)


def test_corrupt_lines_are_counted_alike(tmp_path: Path, tsv_dir: Path) -> None:
    good = (tsv_dir / "part-00000.tsv").read_text().splitlines()[:200]
    lines = good[:100] + ["1\t2\t3", "x" + good[0][1:], "", "   ", good[1].replace("\t", "\t1.5", 1)] + good[100:]
    (tmp_path / "a.tsv").write_text("\n".join(lines))
    fitted = shards.fit([tmp_path / "a.tsv"], shards.SplitSettings())
    ds = load_dataset(f"criteo:{tmp_path / 'a.tsv'}")
    assert fitted.corrupt == ds.corrupt_rows == 3
    assert sum(fitted.rows.values()) == 200


def test_reusing_saved_preprocessing(tmp_path: Path, tsv_dir: Path) -> None:
    ds = load_dataset(f"criteo:{tsv_dir / 'part-00000.tsv'},min_freq=2")
    ds.save_preprocessing(tmp_path / "prep.json")
    fitted = shards.fit(criteo.shard_paths(tsv_dir), shards.SplitSettings(), preprocessing=tmp_path / "prep.json")
    assert {n: v.tokens for n, v in fitted.vocabularies.items()} == {n: v.tokens for n, v in ds.vocabularies.items()}
    assert [t.mean for t in fitted.transforms] == [t.mean for t in ds.dense_transforms]


def test_shard_paths_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no shards"):
        criteo.shard_paths(tmp_path)
    with pytest.raises(DataError, match="file not found"):
        criteo.shard_paths(tmp_path / "nope")
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        list(criteo.read_blocks(criteo.shard_paths(f"{tmp_path}/*.parquet")))


def test_write_shards_cli(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "from recserve.cli import main; main()", "write-shards", "--rows", "2500",
           "--shard-rows", "1000", "--out", str(tmp_path / "s")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"COLUMNS": "80", "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2,500 rows in 3 shards" in proc.stdout
    assert len(load_dataset(f"criteo:{tmp_path / 's'}").ranking_test) > 0
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"COLUMNS": "80", "PATH": "/usr/bin"})
    assert again.returncode != 0
    assert again.stderr.startswith("error:") and "not an empty directory" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert json.loads(json.dumps(sorted(p.name for p in (tmp_path / "s").iterdir()))) == [
        "part-00000.tsv", "part-00001.tsv", "part-00002.tsv"]


def test_empty_blank_and_broken_files_are_data_errors(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "blank.tsv").write_text("\n\n  \n")
    (tmp_path / "broken.tsv.gz").write_bytes(gzip.compress(b"1\t2\n" * 100)[:20])
    for name, needle in (("empty.tsv", "no usable rows"), ("blank.tsv", "no usable rows"),
                         ("broken.tsv.gz", "cannot be read")):
        with pytest.raises(DataError, match=needle):
            load_dataset(f"criteo:{tmp_path / name}")
    with pytest.raises(DataError, match="no usable rows"):
        shards.fit([tmp_path / "empty.tsv", tmp_path / "blank.tsv"], shards.SplitSettings())
