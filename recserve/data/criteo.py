"""Criteo display-advertising data: ``label, I1..I13, C1..C26``, empty field = missing. Ranking only.

A spec's path is one TSV file (``train.txt``, ``.gz`` too), a directory of shards (``*.tsv``, ``*.txt``,
``*.tsv.gz``, ``*.parquet`` with those column names) or a glob. Every shard is read in blocks
(:func:`read_blocks`, pyarrow's streaming CSV and Parquet readers); :func:`load` gathers the blocks in memory,
:mod:`recserve.data.shards` streams them. Both split rows with :func:`recserve.data.splits.hashed_split`, so
they agree row for row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.data import features
from recserve.data.features import Preprocessor, encode, no_rows, ranking_data
from recserve.data.schema import Dataset
from recserve.data.splits import FIT, TEST, VALIDATION, hashed_split
from recserve.errors import DataError

DENSE_NAMES = [f"I{i}" for i in range(1, 14)]
SPARSE_NAMES = [f"C{i}" for i in range(1, 27)]
NAMES = ["label", *DENSE_NAMES, *SPARSE_NAMES]
N_FIELDS = len(NAMES)
EXPECTED = f"{N_FIELDS} tab-separated fields per line: label (0/1), I1..I13 (integers), C1..C26 (categorical)"
SHARD_SUFFIXES = (".txt", ".tsv", ".gz", ".parquet")
BLOCK_BYTES = 8 << 20
"""Bytes of TSV parsed per block (a block is a few tens of thousands of rows)."""
INTEGER = r"^\s*[+-]?[0-9]+\s*$"


@dataclass
class Block:
    """Consecutive valid rows of one shard."""

    shard: int
    """The shard's position in :func:`shard_paths`'s list."""
    first_row: int
    """Index of the block's first valid row among the shard's valid rows."""
    label: np.ndarray
    """float32 [n], 0 or 1."""
    ints: np.ndarray
    """float64 [n, 13], NaN = missing."""
    cats: list
    """26 pyarrow string arrays of n values, ``""`` = missing."""
    corrupt: int = 0
    """Lines of this block skipped as corrupt."""

    def __len__(self) -> int:
        return len(self.label)

    def split(self, seed: int, test_fraction: float, validation_fraction: float) -> np.ndarray:
        return hashed_split(self.shard, self.first_row + np.arange(len(self)), seed, test_fraction,
                            validation_fraction)

    def cats_numpy(self) -> np.ndarray:
        """str [n, 26]."""
        if not len(self):
            return np.zeros((0, len(SPARSE_NAMES)), dtype=str)
        return np.stack([np.asarray(c.to_numpy(zero_copy_only=False), dtype=str) for c in self.cats], axis=1)


def shard_paths(path: Path | str) -> list[Path]:
    """The shards a spec's path names, in a fixed order; DataError when there are none."""
    return features.shard_paths(path, "criteo", SHARD_SUFFIXES, "point the spec at a Criteo train.txt (label, "
                                "I1..I13, C1..C26, tab-separated), a directory of such shards or a glob")


def read_blocks(paths: list[Path], block_bytes: int = BLOCK_BYTES, shards: list[int] | None = None) -> Iterator[Block]:
    """The valid rows of ``paths`` block by block (``shards``: their positions in the full shard list)."""
    for i, path in enumerate(paths):
        shard = shards[i] if shards is not None else i
        reader = _parquet_batches(path) if path.name.endswith(".parquet") else _tsv_batches(path, block_bytes)
        row = 0
        for table, corrupt in reader:
            block = _valid(table, shard, row, corrupt)
            row += len(block)
            yield block


def _tsv_batches(path: Path, block_bytes: int):
    return features.csv_batches(path, "criteo", NAMES, delimiter="\t", quoted=False, check_utf8=False,
                                block_bytes=block_bytes)


def _parquet_batches(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        missing = [n for n in NAMES if n not in f.schema_arrow.names]
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"criteo:{path}: not a readable parquet file ({e})") from e
    if missing:
        raise DataError(f"criteo:{path}: parquet shard lacks columns {', '.join(missing[:5])}; a Criteo parquet "
                        f"shard has columns {', '.join(NAMES[:3])}, ..., C26")
    for batch in f.iter_batches(batch_size=65536, columns=NAMES):
        yield pa.Table.from_batches([batch]).cast(pa.schema([(n, pa.string()) for n in NAMES])), 0


def _valid(table, shard: int, first_row: int, corrupt: int) -> Block:
    """The rows whose label is 0/1 and integer columns integers (or empty); the others counted corrupt."""
    import pyarrow as pa
    import pyarrow.compute as pc

    label = pc.fill_null(table.column("label"), "")
    ok = pc.is_in(label, value_set=pa.array(["0", "1"]))
    for name in DENSE_NAMES:
        col = pc.fill_null(table.column(name), "")
        ok = pc.and_(ok, pc.or_(pc.equal(col, ""), pc.match_substring_regex(col, INTEGER)))
    good = table.filter(ok)
    ints = np.full((good.num_rows, len(DENSE_NAMES)), np.nan)
    for j, name in enumerate(DENSE_NAMES):
        col = pc.fill_null(good.column(name), "")
        present = pc.not_equal(col, "")
        values = pc.cast(pc.utf8_trim_whitespace(pc.if_else(present, col, "0")), pa.int64())
        ints[:, j] = np.where(np.asarray(present), np.asarray(values, dtype=np.float64), np.nan)
    return Block(
        shard=shard, first_row=first_row,
        label=np.asarray(pc.cast(good.column("label"), pa.int8()), dtype=np.float32),
        ints=ints,
        cats=[pc.fill_null(good.column(n), "").combine_chunks() for n in SPARSE_NAMES],
        corrupt=corrupt + table.num_rows - good.num_rows,
    )


def parse(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(label float32 [N], integers float64 [N, 13] with NaN = missing, categoricals str [N, 26], corrupt count).

    Lines with the wrong field count or a non-integer label / integer column are corrupt and skipped;
    blank lines are skipped silently.
    """
    label, ints, cats, corrupt, _ = _gather(read_blocks(shard_paths(path)), 0, 0.0, 0.0)
    return label, ints, cats, corrupt


def _gather(blocks: Iterator[Block], seed: int, test_fraction: float, validation_fraction: float):
    parts = list(blocks)
    corrupt = sum(b.corrupt for b in parts)
    parts = [b for b in parts if len(b)]
    if not parts:
        return (np.zeros(0, np.float32), np.zeros((0, len(DENSE_NAMES))), np.zeros((0, len(SPARSE_NAMES)), str),
                corrupt, np.zeros(0, np.int8))
    return (np.concatenate([b.label for b in parts]), np.concatenate([b.ints for b in parts]),
            np.concatenate([b.cats_numpy() for b in parts]), corrupt,
            np.concatenate([b.split(seed, test_fraction, validation_fraction) for b in parts]))


def load(
    path: Path,
    *,
    min_freq: int = 1,
    seed: int = 0,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.1,
    preprocessing: Path | None = None,
) -> Dataset:
    """Read Criteo rows into memory; hashed split (test, and validation of the rest); vocabularies
    (``min_freq``) and log1p+standardize fitted on the training rows (validation included)."""
    prep = Preprocessor(preprocessing)
    label, ints, cats, corrupt, split = _gather(read_blocks(shard_paths(path)), seed, test_fraction,
                                                validation_fraction)
    if len(label) == 0:
        raise no_rows("criteo", path, corrupt, EXPECTED)
    split = _both_sides(split)
    train, test = np.flatnonzero(split != TEST), np.flatnonzero(split == TEST)

    sparse_ids = [
        encode(prep.vocabulary(name, cats[train, j], min_freq=min_freq), cats[:, j])
        for j, name in enumerate(SPARSE_NAMES)
    ]
    transforms = [prep.transform(name, ints[train, j], kind="log1p") for j, name in enumerate(DENSE_NAMES)]
    data = ranking_data(prep, SPARSE_NAMES, sparse_ids, transforms, list(ints.T), label)
    return Dataset(
        name="criteo",
        spec=f"criteo:{path}",
        vocabularies=prep.vocabularies,
        dense_transforms=prep.transforms,
        ranking_train=data.take(train),
        ranking_test=data.take(test),
        corrupt_rows=corrupt,
        validation_index=np.flatnonzero(split[train] == VALIDATION),
    )


def _both_sides(split: np.ndarray) -> np.ndarray:
    """With two rows or more, at least one test and one training row (a tiny file can hash all to one side)."""
    split = split.copy()
    if len(split) >= 2 and not (split == TEST).any():
        split[-1] = TEST
    if len(split) >= 2 and (split == TEST).all():
        split[0] = FIT
    return split
