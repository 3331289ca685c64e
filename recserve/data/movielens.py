"""MovieLens-100k folder (``u.data``, ``u.item``, ``u.user``): ratings as ranking rows and as retrieval pairs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.data.features import Preprocessor, encode, no_rows, ranking_data, require_file, table
from recserve.data.schema import Dataset
from recserve.data.splits import build_retrieval, random_split
from recserve.errors import DataError

GENRES = [
    "unknown", "action", "adventure", "animation", "childrens", "comedy", "crime", "documentary", "drama",
    "fantasy", "film_noir", "horror", "musical", "mystery", "romance", "sci_fi", "thriller", "war", "western",
]  # fmt: skip
AGE_BUCKETS = [(18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55")]
OLDEST_BUCKET = "56+"

SPARSE_NAMES = ["user_id", "item_id", "age_bucket", "gender", "occupation", "zip_prefix", "release_decade"]
DENSE_NAMES = [f"genre_{g}" for g in GENRES] + ["release_year"]
USER_COLUMNS = ["user_id", "age_bucket", "gender", "occupation"]
ITEM_COLUMNS = ["item_id", "release_decade", "primary_genre"]
HINT = "point the spec at the ml-100k folder holding u.data, u.item, u.user"


@dataclass
class Users:
    """u.user, one entry per user row (raw strings, ``""`` = missing)."""

    columns: dict[str, np.ndarray]
    row_of: dict[int, int]


@dataclass
class Items:
    """u.item, one entry per item row."""

    columns: dict[str, np.ndarray]
    genres: np.ndarray
    """float64 [I, 19] genre flags."""
    year: np.ndarray
    """float64 [I], NaN = unknown release date."""
    row_of: dict[int, int]


def age_bucket(age: int) -> str:
    for upper, name in AGE_BUCKETS:
        if age < upper:
            return name
    return OLDEST_BUCKET


def _lines(path: Path) -> list[list[str]]:
    with open(path, encoding="iso-8859-1") as f:
        return [line.rstrip("\r\n").split("|") for line in f if line.strip()]


def read_users(path: Path) -> tuple[Users, int]:
    ids, buckets, genders, occupations, zips = [], [], [], [], []
    corrupt = 0
    for f in _lines(path):
        if len(f) != 5 or not f[0].strip().isdigit():
            corrupt += 1
            continue
        age = f[1].strip()
        ids.append(int(f[0]))
        buckets.append(age_bucket(int(age)) if age.isdigit() else "")
        genders.append(f[2].strip())
        occupations.append(f[3].strip())
        zips.append(f[4].strip()[:2])
    columns = {
        "user_id": np.asarray(ids, dtype=np.int64),
        "age_bucket": np.asarray(buckets, dtype=str),
        "gender": np.asarray(genders, dtype=str),
        "occupation": np.asarray(occupations, dtype=str),
        "zip_prefix": np.asarray(zips, dtype=str),
    }
    return Users(columns, {u: r for r, u in enumerate(ids)}), corrupt


def read_items(path: Path) -> tuple[Items, int]:
    ids, decades, primaries, years, flags = [], [], [], [], []
    corrupt = 0
    for f in _lines(path):
        if len(f) != 5 + len(GENRES) or not f[0].strip().isdigit():
            corrupt += 1
            continue
        try:
            genre = [int(v) for v in f[5:]]
        except ValueError:
            corrupt += 1
            continue
        year_text = f[2].strip().rsplit("-", 1)[-1]
        year = int(year_text) if year_text.isdigit() and len(year_text) == 4 else None
        ids.append(int(f[0]))
        years.append(np.nan if year is None else float(year))
        decades.append("" if year is None else f"{year // 10 * 10}s")
        primaries.append(next((g for g, flag in zip(GENRES, genre, strict=True) if flag), ""))
        flags.append(genre)
    columns = {
        "item_id": np.asarray(ids, dtype=np.int64),
        "release_decade": np.asarray(decades, dtype=str),
        "primary_genre": np.asarray(primaries, dtype=str),
    }
    genres = np.asarray(flags, dtype=np.float64).reshape(len(ids), len(GENRES))
    return Items(columns, genres, np.asarray(years, dtype=np.float64), {i: r for r, i in enumerate(ids)}), corrupt


def read_ratings(path: Path, users: Users, items: Items) -> tuple[np.ndarray, int]:
    """int64 [N, 4]: (user row, item row, rating, timestamp); ratings of unknown users/items count as corrupt."""
    rows: list[tuple[int, int, int, int]] = []
    corrupt = 0
    with open(path, encoding="iso-8859-1") as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            try:
                user, item, rating, ts = (int(v) for v in fields)
                rows.append((users.row_of[user], items.row_of[item], rating, ts))
            except (ValueError, KeyError):  # wrong field count, non-integer field, unknown user/item
                corrupt += 1
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 4), corrupt


def load(
    folder: Path,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    eval_negatives: int = 100,
    preprocessing: Path | None = None,
) -> Dataset:
    """Ranking (label = rating >= 4, random split) and leave-last-out retrieval over every rating."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"movielens:{folder}: folder not found; {HINT}")
    paths = {n: require_file(folder / n, "movielens", n, HINT) for n in ("u.data", "u.item", "u.user")}
    prep = Preprocessor(preprocessing)
    users, bad_users = read_users(paths["u.user"])
    items, bad_items = read_items(paths["u.item"])
    ratings, bad_ratings = read_ratings(paths["u.data"], users, items)
    corrupt = bad_users + bad_items + bad_ratings
    if len(ratings) == 0:
        raise no_rows(
            "movielens",
            folder,
            corrupt,
            "u.data lines 'user<TAB>item<TAB>rating<TAB>timestamp' of users/items in u.user/u.item",
        )
    user_row, item_row, rating, ts = ratings.T
    train, test = random_split(len(ratings), test_fraction, seed)

    # Per-rating raw values of every ranking feature; vocabularies count the training rows and are
    # extended with the whole catalog so every user/item row of the retrieval tables has its own id.
    per_row = {n: users.columns[n][user_row] for n in ("user_id", "age_bucket", "gender", "occupation", "zip_prefix")}
    per_row |= {n: items.columns[n][item_row] for n in ("item_id", "release_decade")}
    catalog = users.columns | items.columns
    sparse_ids = [encode(prep.vocabulary(n, per_row[n][train], extend=catalog[n]), per_row[n]) for n in SPARSE_NAMES]
    genres = items.genres[item_row]
    year = items.year[item_row]
    transforms = [prep.transform(n, None, standardize=False) for n in DENSE_NAMES[:-1]]
    transforms.append(prep.transform("release_year", year[train]))
    data = ranking_data(prep, SPARSE_NAMES, sparse_ids, transforms, [*genres.T, year], (rating >= 4).astype(np.float32))

    # Retrieval: the split is per user, so the retrieval-only vocabulary sees every rating.
    prep.vocabulary("primary_genre", items.columns["primary_genre"][item_row], extend=items.columns["primary_genre"])
    retrieval, _, _ = build_retrieval(
        prep.features(USER_COLUMNS),
        prep.features(ITEM_COLUMNS),
        table(prep, USER_COLUMNS, [users.columns[n] for n in USER_COLUMNS]),
        table(prep, ITEM_COLUMNS, [items.columns[n] for n in ITEM_COLUMNS]),
        user_row,
        item_row,
        ts,
        eval_negatives,
        seed,
    )
    return Dataset(
        name="movielens",
        spec=f"movielens:{folder}",
        vocabularies=prep.vocabularies,
        dense_transforms=prep.transforms,
        ranking_train=data.take(train),
        ranking_test=data.take(test),
        retrieval=retrieval,
        corrupt_rows=corrupt,
    )
