"""MovieLens-100k reader on a tiny fixture folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.data import Dataset, load_dataset
from recserve.data.checks import check_dataset
from recserve.data.movielens import GENRES, age_bucket
from recserve.errors import DataError

USERS = [
    "1|24|M|technician|85711",
    "2|53|F|other|94043",
    "3|17|M|student|T8H1N",
    "4|56|F|writer|02139",
    "5|45|M|artist|55105",
]


def genre_flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


ITEMS = [
    f"1|Toy Story (1995)|01-Jan-1995||http://x|{genre_flags('animation', 'childrens', 'comedy')}",
    f"2|Caf\xe9 (1954)|01-Jan-1954||http://x|{genre_flags('action', 'war')}",
    f"3|unknown||||{genre_flags('unknown')}",
    f"4|No Genre (1988)|01-Jan-1988||http://x|{genre_flags()}",
    f"5|Star Wars (1977)|01-Jan-1977||http://x|{genre_flags('sci_fi')}",
    f"6|Titanic (1997)|01-Jan-1997||http://x|{genre_flags('drama', 'romance')}",
]
# (user, item, rating, timestamp), file order
RATINGS = [
    (1, 1, 5, 100), (1, 2, 3, 300), (1, 3, 4, 200),
    (2, 1, 2, 50), (2, 4, 4, 50),  # tie: the later line is the last interaction
    (3, 5, 1, 10),  # a single rating: no test pair
    (4, 6, 5, 5), (4, 1, 4, 1), (4, 2, 1, 9),
    (5, 3, 4, 7), (5, 5, 2, 8),
]  # fmt: skip
CORRUPT = ["1\t99\t4\t5", "x\t1\t2\t3", "1\t2\t3"]
LAST = {"1": "2", "2": "4", "4": "2", "5": "5"}


def write_movielens(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "u.user").write_text("\n".join(USERS) + "\n")
    (folder / "u.item").write_bytes(("\n".join(ITEMS) + "\n").encode("iso-8859-1"))
    lines = ["\t".join(map(str, r)) for r in RATINGS]
    (folder / "u.data").write_text("\n".join(lines[:4] + CORRUPT + lines[4:]) + "\n")
    return folder


def decode(ds: Dataset, name: str, ids: np.ndarray) -> list[str]:
    tokens = ds.vocabularies[name].tokens
    return ["" if i == 0 else tokens[i - 1] for i in ids]


@pytest.fixture
def ds(tmp_path: Path) -> Dataset:
    return load_dataset(f"movielens:{write_movielens(tmp_path / 'ml')}", eval_negatives=3, test_fraction=0.3)


def test_age_buckets() -> None:
    cases = {17: "<18", 18: "18-24", 24: "18-24", 25: "25-34", 34: "25-34", 35: "35-44", 44: "35-44", 45: "45-49",
             49: "45-49", 50: "50-55", 55: "50-55", 56: "56+", 80: "56+"}  # fmt: skip
    assert {a: age_bucket(a) for a in cases} == cases


def test_ranking_rows(ds: Dataset) -> None:
    check_dataset(ds)
    assert ds.corrupt_rows == len(CORRUPT)
    train, test = ds.ranking_train, ds.ranking_test
    assert (len(train), len(test)) == (8, 3)
    assert [f.name for f in train.sparse_features] == [
        "user_id", "item_id", "age_bucket", "gender", "occupation", "zip_prefix", "release_decade",
    ]  # fmt: skip
    assert train.dense_names == [f"genre_{g}" for g in GENRES] + ["release_year"]
    sparse = np.concatenate([train.sparse, test.sparse])
    dense = np.concatenate([train.dense, test.dense])
    label = np.concatenate([train.label, test.label])
    rows = list(zip(decode(ds, "user_id", sparse[:, 0]), decode(ds, "item_id", sparse[:, 1]), strict=True))
    rating = {(str(u), str(i)): r for u, i, r, _ in RATINGS}
    assert sorted(rows) == sorted(rating)
    for (u, i), y, s, d in zip(rows, label, sparse, dense, strict=True):
        assert y == float(rating[u, i] >= 4)
        user = USERS[int(u) - 1].split("|")
        assert decode(ds, "age_bucket", s[2:3])[0] == age_bucket(int(user[1]))
        assert decode(ds, "gender", s[3:4])[0] == user[2]
        assert decode(ds, "zip_prefix", s[5:6])[0] == user[4][:2]
        decade = {"1": "1990s", "2": "1950s", "3": "", "4": "1980s", "5": "1970s", "6": "1990s"}[i]
        assert decode(ds, "release_decade", s[6:7])[0] == decade
        flags = ITEMS[int(i) - 1].split("|")[5:]
        assert d[:19].tolist() == [float(f) for f in flags]  # identity transform
        if i == "3":
            assert d[19] == 0.0  # missing release year -> mean
    year = ds.dense_transforms[-1]
    assert year.name == "release_year" and year.std > 0


def test_retrieval_leave_last_out(ds: Dataset) -> None:
    r = ds.retrieval
    assert [f.name for f in r.user_features] == ["user_id", "age_bucket", "gender", "occupation"]
    assert [f.name for f in r.item_features] == ["item_id", "release_decade", "primary_genre"]
    assert r.user_table.shape == (5, 4) and r.item_table.shape == (6, 3)
    user_tok = decode(ds, "user_id", r.user_table[:, 0])
    item_tok = decode(ds, "item_id", r.item_table[:, 0])
    assert sorted(user_tok) == ["1", "2", "3", "4", "5"] and sorted(item_tok) == ["1", "2", "3", "4", "5", "6"]
    test = {user_tok[u]: item_tok[i] for u, i in r.test_pairs}
    assert test == LAST
    assert len(r.train_pairs) + len(r.validation_pairs) == len(RATINGS) - len(LAST)
    train = {(user_tok[u], item_tok[i]) for u, i in np.concatenate([r.train_pairs, r.validation_pairs])}
    assert ("3", "5") in train
    genre = dict(zip(item_tok, decode(ds, "primary_genre", r.item_table[:, 2]), strict=True))
    assert genre == {"1": "animation", "2": "action", "3": "unknown", "4": "", "5": "sci_fi", "6": "drama"}
    assert decode(ds, "age_bucket", r.user_table[user_tok.index("3"), 1:2]) == ["<18"]


def test_eval_negatives_are_never_interacted(ds: Dataset) -> None:
    r = ds.retrieval
    user_tok = decode(ds, "user_id", r.user_table[:, 0])
    item_tok = decode(ds, "item_id", r.item_table[:, 0])
    seen: dict[str, set[str]] = {}
    for u, i, _, _ in RATINGS:
        seen.setdefault(str(u), set()).add(str(i))
    assert r.eval_negatives.shape == (4, 3)
    for (u, _), negs in zip(r.test_pairs, r.eval_negatives, strict=True):
        items = {item_tok[n] for n in negs}
        assert len(items) == 3 and not items & seen[user_tok[u]]
    # users 1 and 4 rated 3 of the 6 items: their 3 negatives are exactly the other 3
    row1 = list(r.test_pairs[:, 0]).index(user_tok.index("1"))
    assert {item_tok[n] for n in r.eval_negatives[row1]} == {"4", "5", "6"}


def test_deterministic_and_too_many_negatives(tmp_path: Path) -> None:
    folder = write_movielens(tmp_path / "ml")
    a = load_dataset(f"movielens:{folder}", eval_negatives=2, seed=5)
    b = load_dataset(f"movielens:{folder}", eval_negatives=2, seed=5)
    assert np.array_equal(a.retrieval.eval_negatives, b.retrieval.eval_negatives)
    assert np.array_equal(a.ranking_test.sparse, b.ranking_test.sparse)
    with pytest.raises(DataError, match=r"eval_negatives=4 is too many.*lower eval_negatives to at most 3"):
        load_dataset(f"movielens:{folder}", eval_negatives=4)


def test_missing_file(tmp_path: Path) -> None:
    folder = write_movielens(tmp_path / "ml")
    (folder / "u.item").unlink()
    with pytest.raises(DataError, match=r"movielens:.*: u\.item not found; point the spec at the ml-100k folder"):
        load_dataset(f"movielens:{folder}")
