"""Interaction logs read in blocks: the ranking view of ``interactions:`` without holding the log whole (issue 20).

A log is one CSV/TSV file (``.gz`` too), a directory of such shards (``*.csv``, ``*.tsv``, ``*.txt``, ``*.gz``,
``*.parquet``) or a glob; each shard has a header naming user, item and time columns. Its ranking view is each
interaction (label 1) followed by ``neg_ratio`` items the user never interacted with (label 0), split
leave-last-out: a user's latest interaction is TEST, the one before it VALIDATION (users with 3+ interactions),
the rest FIT. :func:`fit` makes that view in two passes over the blocks and keeps only what grows with the
users and the catalog, never with the rows:

1. token counts of users and items (merged in pyarrow): the vocabularies, the catalog and the rows;
2. per user the last two interactions (time, then position in the log), and a Bloom filter of the
   (user, item) pairs seen (about 1.2 bytes per interaction, no false negatives).

A row's negatives are drawn from a hash of (seed, its position in the log), rejecting the pairs in the Bloom
filter, so they do not depend on how the log is read or batched: :func:`recserve.data.interactions.load` builds
its ranking view from the same :class:`Fitted` over blocks held in memory, and the streamed reader
(:mod:`recserve.models.streamed`) gives the same rows. The held-out rows (one per user) are built in memory by
:meth:`Fitted.held_out`; :class:`Encoder` turns a block into the FIT rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.data.features import Preprocessor, fit_vocabulary, no_rows, read_text_blocks, shard_paths, transform_from_moments
from recserve.data.schema import DenseTransform, RankingData, SparseFeature, Vocabulary
from recserve.data.shards import Counts
from recserve.data.splits import FIT, TEST, VALIDATION, repeats_in_rows, splitmix64
from recserve.errors import DataError

USER_KEYS = ("user", "user_id")
ITEM_KEYS = ("item", "item_id")
TIME_KEYS = ("time", "timestamp")
SUFFIXES = (".csv", ".tsv", ".txt", ".gz", ".parquet")
HINT = "point the spec at a CSV/TSV interaction log with a header holding user, item and time columns"
POSITION_BITS = 40
"""A row's position in the log: shard << 40 | valid row in the shard."""
NEGATIVE_CHUNK = 8192
"""Rows whose negatives are drawn at once (bounds the candidates' hashes held: ~1.3 KB a row at neg_ratio 4)."""
BLOOM_BITS_PER_PAIR = 10
BLOOM_HASHES = 7
"""About 1% of unseen pairs test as seen (and are not drawn as negatives); a seen pair never tests unseen."""


@dataclass
class LogBlock:
    """Consecutive valid interactions of one shard."""

    shard: int
    first_row: int
    users: object
    """pyarrow string array."""
    items: object
    times: np.ndarray
    """float64."""
    corrupt: int = 0

    def __len__(self) -> int:
        return len(self.times)

    @property
    def positions(self) -> np.ndarray:
        return (np.int64(self.shard) << POSITION_BITS) + self.first_row + np.arange(len(self), dtype=np.int64)


def log_paths(path: Path | str) -> list[Path]:
    return shard_paths(path, "interactions", SUFFIXES, HINT)


def column(header: list[str], keys: tuple[str, ...], where: str, what: str) -> str:
    """The first header column named one of ``keys`` (case-insensitive)."""
    for k in keys:
        for h in header:
            if h.lower() == k:
                return h
    raise DataError(f"interactions:{where}: no {what} column in header {header}; name it one of {', '.join(keys)}")


def read_blocks(paths: list[Path], block_bytes: int = 8 << 20, shards: list[int] | None = None) -> Iterator[LogBlock]:
    """The valid interactions of ``paths`` (``shards``: their positions in the full list): a row needs a user, an
    item and a finite numeric time (the others are corrupt)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for n, path in enumerate(paths):
        shard = shards[n] if shards is not None else n
        row = 0
        for header, table, corrupt in read_text_blocks(path, "interactions", "interaction log", block_bytes):
            names = [column(header, keys, str(path), what)
                     for keys, what in ((USER_KEYS, "user"), (ITEM_KEYS, "item"), (TIME_KEYS, "time"))]
            users, items, times = (table.column(n) for n in names)
            t = _times(times)
            ok = np.isfinite(t) & (np.asarray(pc.utf8_length(users)) > 0) & (np.asarray(pc.utf8_length(items)) > 0)
            mask = pa.array(ok)
            block = LogBlock(shard, row, users.filter(mask).combine_chunks(), items.filter(mask).combine_chunks(),
                             t[ok], corrupt + int((~ok).sum()))
            row += len(block)
            yield block


def _times(col) -> np.ndarray:
    """float64 of a string column (NaN where it is not a number); Python's float() where pyarrow's cast refuses."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except pa.ArrowInvalid:
        out = np.full(len(col), np.nan)
        for j, v in enumerate(col.to_pylist()):
            try:
                out[j] = float(v)
            except (TypeError, ValueError):
                pass
        return out


class Bloom:
    """A Bloom filter of int64 keys (numpy, vectorized)."""

    def __init__(self, n: int):
        self.m = max(1024, int(n) * BLOOM_BITS_PER_PAIR)
        self.words = np.zeros((self.m + 63) // 64, dtype=np.uint64)

    def _bits(self, keys: np.ndarray) -> np.ndarray:
        h = splitmix64(np.asarray(keys, dtype=np.int64).view(np.uint64))
        h1, h2 = h & np.uint64(0xFFFFFFFF), (h >> np.uint64(32)) | np.uint64(1)
        with np.errstate(over="ignore"):
            return (h1[..., None] + np.arange(BLOOM_HASHES, dtype=np.uint64) * h2[..., None]) % np.uint64(self.m)

    def add(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys)
        if len(keys) > NEGATIVE_CHUNK * 8:
            for i in range(0, len(keys), NEGATIVE_CHUNK * 8):
                self.add(keys[i:i + NEGATIVE_CHUNK * 8])
            return
        bits = self._bits(keys).ravel()
        if not bits.size:
            return
        words, order = bits >> np.uint64(6), np.argsort(bits >> np.uint64(6), kind="stable")
        words, masks = words[order], np.uint64(1) << (bits[order] & np.uint64(63))
        starts = np.flatnonzero(np.r_[True, words[1:] != words[:-1]])
        self.words[words[starts]] |= np.bitwise_or.reduceat(masks, starts)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """bool per key: True for every key added (and about 1% of the others)."""
        bits = self._bits(keys)
        return ((self.words[bits >> np.uint64(6)] >> (bits & np.uint64(63))) & np.uint64(1)).all(axis=-1).astype(bool)


def draw_negatives(positions: np.ndarray, users: np.ndarray, seen: Bloom, n_items: int, k: int,
                   seed: int) -> np.ndarray:
    """int64 [n, k] catalog indices per row: the first ``k`` distinct candidates of the row's hashed sequence
    (seed, position) whose (user, item) pair is not in ``seen``."""
    if len(positions) > NEGATIVE_CHUNK:
        return np.concatenate([draw_negatives(positions[i:i + NEGATIVE_CHUNK], users[i:i + NEGATIVE_CHUNK], seen,
                                              n_items, k, seed) for i in range(0, len(positions), NEGATIVE_CHUNK)])
    n = len(positions)
    out = np.full((n, k), -1, dtype=np.int64)
    todo = np.arange(n)
    width = 2 * k + 16
    while len(todo):
        j = np.arange(width, dtype=np.uint64)
        with np.errstate(over="ignore"):
            key = (positions[todo].astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
                   + j[None, :] + np.uint64((seed * 0xD1B54A32D192ED03 + 1) % 2**64))
        cand = (splitmix64(key) % np.uint64(n_items)).astype(np.int64)
        ok = ~seen.contains(users[todo, None] * n_items + cand) & ~repeats_in_rows(cand)
        enough = ok.sum(axis=1) >= k
        first = np.argsort(~ok, axis=1, kind="stable")[:, :k]
        out[todo[enough]] = np.take_along_axis(cand, first, axis=1)[enough]
        todo = todo[~enough]
        if len(todo) and width > 64 * max(n_items, k):
            raise DataError(f"neg_ratio={k} is too many: a user interacted with all but fewer than {k} of the "
                            f"{n_items} items, leaving too few to sample negatives from; lower neg_ratio")
        width *= 4
    return out


class Catalog:
    """The users and items of a log (its own vocabularies' tokens), and a block's rows as their indices."""

    def __init__(self, users: list[str], items: list[str]):
        import pyarrow as pa

        self.users, self.items = users, items
        self._user_set = pa.array(users, type=pa.string())
        self._item_set = pa.array(items, type=pa.string())

    def indices(self, block: LogBlock) -> tuple[np.ndarray, np.ndarray]:
        """(user index, item index) per row of ``block`` (-1 where unknown)."""
        return _index(block.users, self._user_set), _index(block.items, self._item_set)


@dataclass
class Fitted:
    """What two passes over a log learned (see the module's docstring); indices are catalog / user positions in
    the data's own vocabularies (the model's may be reused from a saved file)."""

    vocabularies: dict[str, Vocabulary]
    transforms: list[DenseTransform]
    feature_names: list[str]
    """user_id, item_id, then the metadata columns."""
    catalog: Catalog
    user_model: np.ndarray
    """int64 [users]: the model's user_id of each user."""
    item_table: np.ndarray
    """int64 [items, 1 + attributes]: the model's item_id and attribute ids of each catalog item."""
    popularity: np.ndarray
    """float64 [items]: interactions per item, test rows left out."""
    last: np.ndarray
    """int64 [users, 2, 2]: (position, item) of each user's last and second-last interaction (-1: none)."""
    counts: np.ndarray
    """int64 [users]: interactions per user."""
    seen: Bloom
    neg_ratio: int
    seed: int
    rows: dict[str, int]
    corrupt: int

    def split_of(self, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
        out = np.full(len(users), FIT, dtype=np.int8)
        out[(positions == self.last[users, 1, 0]) & (self.counts[users] >= 3)] = VALIDATION
        out[(positions == self.last[users, 0, 0]) & (self.counts[users] >= 2)] = TEST
        return out

    def ranking(self, users: np.ndarray, items: np.ndarray, positions: np.ndarray) -> RankingData:
        """[positive, neg_ratio negatives] per interaction (own user / catalog indices)."""
        k = self.neg_ratio
        negs = draw_negatives(positions, users, self.seen, len(self.catalog.items), k, self.seed)
        row_items = np.concatenate([items[:, None], negs], axis=1).ravel()
        row_users = np.repeat(users, 1 + k)
        sparse = np.concatenate([self.user_model[row_users, None], self.item_table[row_items]], axis=1)
        dense = self.transforms[0].apply(self.popularity[row_items])[:, None]
        label = np.tile(np.r_[1.0, np.zeros(k)], len(users)).astype(np.float32)
        features = [SparseFeature(n, self.vocabularies[n].cardinality) for n in self.feature_names]
        return RankingData(features, [self.transforms[0].name], np.ascontiguousarray(sparse, dtype=np.int64),
                           np.ascontiguousarray(dense, dtype=np.float32), label)

    def held_out(self, which: int) -> RankingData:
        """The ranking rows of each user's TEST (last) or VALIDATION (second-last) interaction, by user."""
        j, least = (0, 2) if which == TEST else (1, 3)
        users = np.flatnonzero(self.counts >= least)
        return self.ranking(users, self.last[users, j, 1], self.last[users, j, 0])


def _index(values, token_set) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(pc.index_in(values, value_set=token_set), -1), dtype=np.int64)


class Encoder:
    """A block -> the ranking rows of its interactions in split ``keep`` (arrays for Ray Data)."""

    def __init__(self, fitted: Fitted, keep: int = FIT):
        self.fitted, self.keep = fitted, keep

    def rows(self, block: LogBlock) -> RankingData:
        users, items = self.fitted.catalog.indices(block)
        pos = block.positions
        sel = np.flatnonzero(self.fitted.split_of(users, pos) == self.keep)
        return self.fitted.ranking(users[sel], items[sel], pos[sel])

    def encoded(self, path: Path, shard: int) -> Iterator[dict[str, np.ndarray]]:
        for block in read_blocks([path], shards=[shard]):
            rows = self.rows(block)
            if len(rows):
                yield {"sparse": rows.sparse, "dense": rows.dense, "label": rows.label}


def fit(blocks: Callable[[], Iterable[LogBlock]], where: str, *, meta=None, neg_ratio: int = 4, seed: int = 0,
        preprocessing: Path | None = None) -> Fitted:
    """Two passes over ``blocks()`` (see the module's docstring). ``meta``: item metadata
    (:class:`recserve.data.interactions.Meta`) or None."""
    if neg_ratio < 1:
        raise DataError(f"interactions:{where}: neg_ratio={neg_ratio} must be at least 1 (negatives per positive)")
    user_counts, item_counts, corrupt, n = Counts(), Counts(), 0, 0
    for block in blocks():
        user_counts.add(block.users)
        item_counts.add(block.items)
        corrupt += block.corrupt
        n += len(block)
    if not n:
        raise no_rows("interactions", Path(where), corrupt, "rows with a user, an item and a numeric time")
    users_counted, items_counted = user_counts.as_dict(), item_counts.as_dict()
    meta_names = list(meta.names) if meta is not None else []
    meta_values = meta.values if meta is not None else {}
    own_users = fit_vocabulary("user_id", np.zeros(0, str), counted=users_counted)
    own_items = fit_vocabulary("item_id", np.zeros(0, str), counted=items_counted,
                               extend=np.asarray(list(meta_values), dtype=str))

    # pass 2: each user's last two interactions; the seen pairs
    n_users, n_items = len(own_users.tokens), len(own_items.tokens)
    last = np.full((n_users, 2, 2), -1, dtype=np.int64)
    last_time = np.full((n_users, 2), -np.inf)
    seen = Bloom(n)
    catalog = Catalog(own_users.tokens, own_items.tokens)
    for block in blocks():
        u, i = catalog.indices(block)
        seen.add(u * n_items + i)
        _keep_last_two(last, last_time, u, i, block.times, block.positions)
    counts = np.asarray([users_counted[t] for t in own_users.tokens], dtype=np.int64)
    test_users = np.flatnonzero(counts >= 2)
    popularity = np.asarray([items_counted.get(t, 0) for t in own_items.tokens], dtype=np.float64)
    np.subtract.at(popularity, last[test_users, 0, 1], 1.0)

    # the model's vocabularies (fitted on every interaction, extended with the catalog) and transform
    prep = Preprocessor(preprocessing)
    item_attr = [np.asarray([meta_values.get(t, [""] * len(meta_names))[j] for t in own_items.tokens], dtype=str)
                 for j in range(len(meta_names))]
    item_weight = np.asarray([items_counted.get(t, 0) for t in own_items.tokens], dtype=np.int64)
    if prep.reusing:
        for name in ["user_id", "item_id", *meta_names]:
            prep.vocabulary(name, np.zeros(0, str))
        prep.transform("item_popularity", None)
    else:
        prep.vocabularies["user_id"] = own_users
        prep.vocabularies["item_id"] = own_items
        for name, attr in zip(meta_names, item_attr, strict=True):
            prep.vocabularies[name] = fit_vocabulary(name, np.zeros(0, str), counted=_weighted(attr, item_weight),
                                                     extend=attr)
        prep.transforms.append(_popularity_transform(popularity, neg_ratio))
    user_model = prep.vocabularies["user_id"].lookup(own_users.tokens)
    item_table = np.stack([prep.vocabularies[name].lookup(column) for name, column
                           in zip(["item_id", *meta_names], [own_items.tokens, *(a.tolist() for a in item_attr)],
                                  strict=True)], axis=1)
    rows = {"test": int(len(test_users)), "validation": int((counts >= 3).sum())}
    rows["fit"] = n - rows["test"] - rows["validation"]
    return Fitted(prep.vocabularies, prep.transforms, ["user_id", "item_id", *meta_names], catalog, user_model,
                  item_table, popularity, last, counts, seen, neg_ratio, seed,
                  {k: v * (1 + neg_ratio) for k, v in rows.items()}, corrupt)


def _weighted(values: np.ndarray, weight: np.ndarray) -> dict[str, int]:
    out: dict[str, int] = {}
    for v, w in zip(values.tolist(), weight.tolist(), strict=True):
        if w:
            out[v] = out.get(v, 0) + w
    return out


def _popularity_transform(popularity: np.ndarray, neg_ratio: int) -> DenseTransform:
    """log1p + standardize of item popularity over the training rows: each positive (an item as often as it was
    interacted with) and ``neg_ratio`` negatives per positive, drawn uniformly over the catalog (their
    expectation: the negatives are hashed draws, the same in every reader)."""
    x = np.log1p(popularity)
    positives = popularity.sum()
    weight = popularity + neg_ratio * positives / len(popularity)
    n = positives * (1 + neg_ratio)
    if n <= 0:
        return transform_from_moments("item_popularity", "log1p", 0, 0.0, 0.0)
    mean = float((weight * x).sum() / n)
    return transform_from_moments("item_popularity", "log1p", int(round(n)), mean,
                                  float((weight * (x - mean) ** 2).sum()))


def _keep_last_two(last: np.ndarray, last_time: np.ndarray, users: np.ndarray, items: np.ndarray,
                   times: np.ndarray, positions: np.ndarray) -> None:
    """Merge a block's interactions into each user's (time, position)-latest two."""
    if not len(users):
        return
    have = np.unique(users)
    u = np.concatenate([users, have, have])
    t = np.concatenate([times, last_time[have, 0], last_time[have, 1]])
    p = np.concatenate([positions, last[have, 0, 0], last[have, 1, 0]])
    i = np.concatenate([items, last[have, 0, 1], last[have, 1, 1]])
    order = np.lexsort((p, t, u))
    u, t, p, i = u[order], t[order], p[order], i[order]
    first_of_next = np.r_[u[1:] != u[:-1], True]  # the user's latest entry
    top = np.flatnonzero(first_of_next)
    second = top - 1
    ok = (second >= 0) & (u[np.maximum(second, 0)] == u[top])
    last[u[top], 0] = np.stack([p[top], i[top]], axis=1)
    last_time[u[top], 0] = t[top]
    s = second[ok]
    last[u[s], 1] = np.stack([p[s], i[s]], axis=1)
    last_time[u[s], 1] = t[s]


def write_synthetic(rows: int, out: Path, *, shard_rows: int = 1_000_000, seed: int = 0, fmt: str = "csv",
                    users: int = 100_000, items: int = 20_000, categories: int = 50) -> list[Path]:
    """An interaction log with a planted signal, written block by block to ``out/log/part-NNNNN.csv|parquet``
    (columns user, item, time), and ``out/item_meta.csv`` (item, category) for ``meta=``; returns the shards.

    Each user prefers one category; 80% of their interactions are with items of it, drawn by a Zipf
    popularity, the rest with any item by popularity; user activity is Zipf too, and time grows with the row.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if rows < 1 or shard_rows < 1 or users < 1 or items < 2:
        raise DataError("write_synthetic: rows, shard_rows and users must be positive and items at least 2")
    if fmt not in ("csv", "parquet"):
        raise DataError(f"format {fmt!r}: write csv or parquet")
    out = Path(out)
    (out / "log").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 11])
    categories = max(1, min(categories, items))
    item_category = rng.integers(0, categories, items)
    item_weight = 1.0 / np.arange(1, items + 1) ** 0.9
    rng.shuffle(item_weight)
    by_category = [np.flatnonzero(item_category == c) for c in range(categories)]
    in_category = [item_weight[ix] / item_weight[ix].sum() for ix in by_category]
    user_weight = 1.0 / np.arange(1, users + 1) ** 0.7
    user_weight /= user_weight.sum()
    user_category = rng.integers(0, categories, users)
    pacsv.write_csv(pa.table({"item": [f"i{i}" for i in range(items)],
                              "category": [f"c{c}" for c in item_category]}), out / "item_meta.csv")
    paths, block = [], 100_000
    for shard, start in enumerate(range(0, rows, shard_rows)):
        path = out / "log" / f"part-{shard:05d}.{fmt}"
        n_shard = min(shard_rows, rows - start)
        writer = None
        for b, first in enumerate(range(0, n_shard, block)):
            r = np.random.default_rng([seed, 12, shard, b])
            n = min(block, n_shard - first)
            u = r.choice(users, size=n, p=user_weight)
            it = r.choice(items, size=n, p=item_weight / item_weight.sum())
            own = r.random(n) < 0.8
            for c in np.unique(user_category[u[own]]):
                rows_c = np.flatnonzero(own & (user_category[u] == c))
                it[rows_c] = r.choice(by_category[c], size=len(rows_c), p=in_category[c])
            table = pa.table({"user": pa.array(np.char.add("u", u.astype(str))),
                              "item": pa.array(np.char.add("i", it.astype(str))),
                              "time": np.arange(start + first, start + first + n, dtype=np.int64)})
            if fmt == "parquet":
                writer = writer or pq.ParquetWriter(path, table.schema)
            else:
                writer = writer or pacsv.CSVWriter(path, table.schema,
                                                   write_options=pacsv.WriteOptions(quoting_style="none"))
            writer.write_table(table)
        writer.close()
        paths.append(path)
    return paths
