"""Interaction logs read in blocks (recserve.data.logs): the streamed passes give the in-memory reader's view."""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from recserve.data import interactions, load_dataset, logs
from recserve.data.features import fit_vocabulary
from recserve.data.splits import FIT, TEST, VALIDATION, leave_last_out
from recserve.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("log")
    logs.write_synthetic(30_000, out, shard_rows=12_000, users=900, items=400, categories=8)
    return out


def raw(log_dir: Path) -> tuple[list[str], list[str], np.ndarray]:
    """The log read with Python's csv module: the oracle."""
    users, items, times = [], [], []
    for path in sorted((log_dir / "log").iterdir()):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                users.append(row["user"])
                items.append(row["item"])
                times.append(float(row["time"]))
    return users, items, np.asarray(times)


def streamed(log_dir: Path, block_bytes: int = 8 << 20, neg_ratio: int = 3, seed: int = 0) -> logs.Fitted:
    paths = logs.log_paths(log_dir / "log")
    meta = interactions.read_meta(log_dir / "item_meta.csv")
    return logs.fit(lambda: logs.read_blocks(paths, block_bytes), str(log_dir), meta=meta, neg_ratio=neg_ratio,
                    seed=seed)


def fit_rows(fitted: logs.Fitted, log_dir: Path) -> np.ndarray:
    enc = logs.Encoder(fitted)
    parts = [np.c_[a["sparse"], a["dense"], a["label"]]
             for shard, path in enumerate(logs.log_paths(log_dir / "log")) for a in enc.encoded(path, shard)]
    return np.concatenate(parts)


def test_vocabularies_split_and_popularity_match_an_independent_reading(log_dir: Path) -> None:
    users, items, times = raw(log_dir)
    f = streamed(log_dir)
    assert f.vocabularies["user_id"] == fit_vocabulary("user_id", np.asarray(users))
    meta = dict(csv.reader(open(log_dir / "item_meta.csv")))
    assert f.vocabularies["item_id"] == fit_vocabulary("item_id", np.asarray(items),
                                                       extend=np.asarray([k for k in meta if k != "item"]))
    assert f.vocabularies["category"] == fit_vocabulary("category", np.asarray([meta[i] for i in items]),
                                                        extend=np.asarray([v for k, v in meta.items() if k != "item"]))
    # leave-last-out twice: test = each user's last, validation = the one before
    u = np.asarray(f.vocabularies["user_id"].lookup(users))
    train, test = leave_last_out(u, times)
    fit, val = leave_last_out(u[train], times[train])
    assert f.rows == {"test": len(test) * 4, "validation": len(val) * 4, "fit": len(fit) * 4}
    t = f.held_out(TEST)
    positives = t.sparse[t.label == 1]
    assert sorted(map(tuple, positives[:, :2].tolist())) == sorted(
        (int(u[r]), f.vocabularies["item_id"].lookup([items[r]])[0]) for r in test)
    popularity = Counter(items[r] for r in train)
    tokens = f.vocabularies["item_id"].tokens
    for item_id, dense in zip(t.sparse[:, 1], t.dense[:, 0], strict=True):
        assert dense == pytest.approx(f.transforms[0].apply(np.array([popularity[tokens[item_id - 1]]]))[0])


def test_negatives_are_never_seen_pairs_and_features_follow_the_item(log_dir: Path) -> None:
    users, items, _ = raw(log_dir)
    f = streamed(log_dir)
    seen = {(f.vocabularies["user_id"].lookup([a])[0], f.vocabularies["item_id"].lookup([b])[0])
            for a, b in zip(users, items, strict=True)}
    rows = fit_rows(f, log_dir)
    sparse, label = rows[:, :3].astype(np.int64), rows[:, -1]
    assert len(rows) == f.rows["fit"]
    assert label.tolist() == [1.0, 0.0, 0.0, 0.0] * (len(rows) // 4)
    pairs = [tuple(p) for p in sparse[:, :2].tolist()]
    assert all((p in seen) == (y == 1) for p, y in zip(pairs, label, strict=True))
    groups = sparse[:, 1].reshape(-1, 4)
    assert (np.sort(groups, axis=1)[:, 1:] != np.sort(groups, axis=1)[:, :-1]).all()  # distinct per row
    cat_of = dict(zip(sparse[:, 1].tolist(), sparse[:, 2].tolist(), strict=True))
    assert len(cat_of) > 100 and all(cat_of[i] == c for i, c in zip(sparse[:, 1], sparse[:, 2], strict=True))


def test_rows_do_not_depend_on_the_block_size_and_the_in_memory_reader_agrees(log_dir: Path) -> None:
    whole, small = streamed(log_dir), streamed(log_dir, block_bytes=4096)
    assert np.array_equal(fit_rows(whole, log_dir), fit_rows(small, log_dir))
    for which in (TEST, VALIDATION):
        a, b = whole.held_out(which), small.held_out(which)
        assert np.array_equal(a.sparse, b.sparse) and np.array_equal(a.dense, b.dense)
    ds = load_dataset(f"interactions:{log_dir / 'log'},meta={log_dir / 'item_meta.csv'},neg_ratio=3",
                      eval_negatives=5)
    assert ds.vocabularies == whole.vocabularies and ds.dense_transforms == whole.transforms
    mem = ds.ranking_fit()
    assert np.array_equal(np.c_[mem.sparse, mem.dense, mem.label], fit_rows(whole, log_dir))
    assert np.array_equal(ds.ranking_test.sparse, whole.held_out(TEST).sparse)
    assert np.array_equal(ds.ranking_validation().sparse, whole.held_out(VALIDATION).sparse)
    # the retriever's leave-last-out agrees with the ranking view's
    r = ds.retrieval
    assert len(r.test_pairs) * 4 == whole.rows["test"] and len(r.validation_pairs) * 4 == whole.rows["validation"]
    other = streamed(log_dir, seed=1)
    assert not np.array_equal(fit_rows(other, log_dir), fit_rows(whole, log_dir))  # the seed draws the negatives


def test_parquet_and_gzip_shards_read_as_csv(tmp_path: Path, log_dir: Path) -> None:
    first = sorted((log_dir / "log").iterdir())[0]
    table = pacsv.read_csv(first)
    pq.write_table(table, tmp_path / "a.parquet")
    (tmp_path / "b.csv.gz").write_bytes(gzip.compress(first.read_bytes()))
    blocks = [list(logs.read_blocks([p])) for p in (first, tmp_path / "a.parquet", tmp_path / "b.csv.gz")]
    for other in blocks[1:]:
        assert [b.users.to_pylist() for b in other] == [b.users.to_pylist() for b in blocks[0]]
        assert np.array_equal(np.concatenate([b.times for b in other]), np.concatenate([b.times for b in blocks[0]]))


def test_bloom_filter_has_no_false_negatives_and_about_one_percent_false_positives() -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**40, 50_000)
    bloom = logs.Bloom(len(keys))
    bloom.add(keys[:25_000])
    bloom.add(keys[25_000:])
    assert bloom.contains(keys).all()
    others = rng.integers(2**41, 2**42, 50_000)
    assert 0.001 < bloom.contains(others).mean() < 0.03


def test_split_of_a_row(log_dir: Path) -> None:
    f = streamed(log_dir)
    heavy = int(np.argmax(f.counts))
    (p1, _), (p2, _) = f.last[heavy]
    other = min(int(p) for p in (p1, p2)) - 1
    assert f.split_of(np.array([heavy] * 3), np.array([p1, p2, other])).tolist() == [TEST, VALIDATION, FIT]


def test_errors(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text("user,item,when\nu,i,1\n")
    with pytest.raises(DataError, match="no time column"):
        streamed_fit(tmp_path / "log.csv")
    (tmp_path / "dup.csv").write_text("user,user,time\nu,i,1\n")
    with pytest.raises(DataError, match="names a column twice"):
        streamed_fit(tmp_path / "dup.csv")
    (tmp_path / "blank.csv").write_text("user,item,time\n\n  \n")
    with pytest.raises(DataError, match="no usable rows"):
        streamed_fit(tmp_path / "blank.csv")
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable parquet file"):
        streamed_fit(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="no shards"):
        logs.log_paths(tmp_path / "*.json")
    (tmp_path / "few.csv").write_text("user,item,time\nu,a,1\nu,b,2\nv,a,1\n")
    with pytest.raises(DataError, match="lower neg_ratio"):
        streamed_fit(tmp_path / "few.csv")  # u saw both items: nothing left to draw


def streamed_fit(path: Path) -> logs.Fitted:
    paths = logs.log_paths(path)
    return logs.fit(lambda: logs.read_blocks(paths), str(path), neg_ratio=1).held_out(TEST)


def test_write_shards_cli_for_logs(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "from recserve.cli import main; main()", "write-shards", "--kind", "interactions",
           "--rows", "2500", "--shard-rows", "1000", "--out", str(tmp_path / "s"), "--format", "parquet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"COLUMNS": "80", "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2,500 rows in 3 shards" in proc.stdout
    ds = load_dataset(f"interactions:{tmp_path / 's' / 'log'},meta={tmp_path / 's' / 'item_meta.csv'}")
    assert [f.name for f in ds.ranking_train.sparse_features] == ["user_id", "item_id", "category"]
    assert sum(len(b) for b in logs.read_blocks(logs.log_paths(tmp_path / "s" / "log"))) == 2500


def test_saved_preprocessing_is_reused_and_new_users_are_out_of_vocabulary(tmp_path: Path, log_dir: Path) -> None:
    ds = load_dataset(f"interactions:{log_dir / 'log'},meta={log_dir / 'item_meta.csv'}", eval_negatives=5)
    saved = tmp_path / "preprocessing.json"
    ds.save_preprocessing(saved)
    (tmp_path / "new.csv").write_text("user,item,time\nstranger,i1,1\nstranger,i2,2\nstranger,i3,3\n")
    meta = interactions.read_meta(log_dir / "item_meta.csv")
    f = logs.fit(lambda: logs.read_blocks([tmp_path / "new.csv"]), "new.csv", meta=meta, preprocessing=saved)
    assert f.vocabularies == ds.vocabularies and f.transforms == ds.dense_transforms
    test = f.held_out(TEST)
    assert (test.sparse[:, 0] == 0).all()  # the stranger is out of vocabulary for the saved model
    assert test.sparse[0, 1] == ds.vocabularies["item_id"].lookup(["i3"])[0]
