"""Criteo shards streamed, never loaded whole (issue 20): one pass fits the preprocessing, then blocks are encoded
as they are read.

- :func:`fit` reads every shard once, block by block, and keeps only counts: per categorical column, each
  token's count over the training rows (merged in pyarrow every few blocks), and per integer column the
  count, mean and squared deviations of its log1p values (Chan's parallel update). The vocabularies and
  transforms it makes are those :func:`recserve.data.criteo.load` fits on the same rows in memory (same
  order, counts and statistics): memory grows with the vocabularies, not with the rows. It keeps the
  first ``max_validation_rows`` validation rows (raw) to score each epoch on.
- :class:`Encoder` turns a block into model inputs (token ids by pyarrow's ``index_in``, transformed
  integers) for the rows of one split; Ray Data runs it over the shards (:mod:`recserve.models.streamed`).
- :func:`write_synthetic` writes Criteo-format rows with a planted signal to shards, block by block, for
  runs larger than memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recserve.data import criteo
from recserve.data.features import Preprocessor, fit_vocabulary, no_rows, transform_from_moments
from recserve.data.schema import DenseTransform, RankingData, SparseFeature, Vocabulary
from recserve.data.splits import FIT, TEST, VALIDATION
from recserve.errors import DataError

MERGE_EVERY = 16
"""Blocks of token counts held per column before they are merged into one table."""


@dataclass(frozen=True)
class SplitSettings:
    seed: int = 0
    test_fraction: float = 0.2
    validation_fraction: float = 0.1

    def of(self, block: criteo.Block) -> np.ndarray:
        return block.split(self.seed, self.test_fraction, self.validation_fraction)


@dataclass
class Fitted:
    """What one pass over the shards learned."""

    vocabularies: dict[str, Vocabulary]
    transforms: list[DenseTransform]
    rows: dict[str, int]
    """Valid rows per split (``fit``, ``validation``, ``test``)."""
    corrupt: int
    validation: RankingData | None = None
    """The first ``max_validation_rows`` validation rows, encoded."""
    validation_total: int = 0


@dataclass
class _Moments:
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: np.ndarray) -> None:
        if not x.size:
            return
        n, mean, m2 = x.size, float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total


@dataclass
class Counts:
    """Token counts of one column, merged in pyarrow."""

    parts: list = field(default_factory=list)

    def add(self, values) -> None:
        import pyarrow.compute as pc

        if len(values):
            self.parts.append(pc.value_counts(values).flatten())
        if len(self.parts) >= MERGE_EVERY:
            self.parts = [self._merged()]

    def _merged(self):
        import pyarrow as pa

        values = pa.concat_arrays([p[0] for p in self.parts])
        counts = pa.concat_arrays([p[1] for p in self.parts])
        t = pa.table({"v": values, "c": counts}).group_by("v").aggregate([("c", "sum")])
        return [t.column("v").combine_chunks(), t.column("c_sum").combine_chunks()]

    def as_dict(self) -> dict[str, int]:
        if not self.parts:
            return {}
        values, counts = self._merged()
        return dict(zip(values.to_pylist(), counts.to_pylist(), strict=True))


def fit(paths: list[Path], split: SplitSettings, *, min_freq: int = 1, preprocessing: Path | None = None,
        max_validation_rows: int = 500_000, block_bytes: int = criteo.BLOCK_BYTES) -> Fitted:
    """One pass over ``paths`` (see the module's docstring); ``preprocessing`` reuses saved vocabularies and
    transforms instead of fitting them (the pass then only counts rows and keeps validation rows)."""
    counts = [Counts() for _ in criteo.SPARSE_NAMES]
    moments = [_Moments() for _ in criteo.DENSE_NAMES]
    rows = {"fit": 0, "validation": 0, "test": 0}
    corrupt = 0
    kept: list[criteo.Block] = []
    room = max_validation_rows
    for block in criteo.read_blocks(paths, block_bytes):
        corrupt += block.corrupt
        if not len(block):
            continue
        s = split.of(block)
        train = s != TEST
        rows["fit"] += int((s == FIT).sum())
        rows["validation"] += int((s == VALIDATION).sum())
        rows["test"] += int((s == TEST).sum())
        if preprocessing is None:
            mask = _arrow_mask(train)
            for c, values in zip(counts, block.cats, strict=True):
                c.add(values.filter(mask))
            for j, m in enumerate(moments):
                x = block.ints[train, j]
                x = x[np.isfinite(x)]
                m.add(np.log1p(np.maximum(x, 0.0)))
        if room > 0 and (s == VALIDATION).any():
            part = take(block, np.flatnonzero(s == VALIDATION)[:room])
            kept.append(part)
            room -= len(part)
    if not sum(rows.values()):
        raise no_rows("criteo", paths[0] if len(paths) == 1 else paths[0].parent, corrupt, criteo.EXPECTED)
    if not rows["fit"]:
        raise DataError(f"criteo: none of the {sum(rows.values()):,} rows fell in the training split; "
                        "train on more rows")
    prep = Preprocessor(preprocessing)
    for name, c in zip(criteo.SPARSE_NAMES, counts, strict=True):
        if prep.reusing:
            prep.vocabulary(name, np.zeros(0, str))
        else:
            prep.vocabularies[name] = vocabulary_from_counts(name, c.as_dict(), min_freq)
    for name, m in zip(criteo.DENSE_NAMES, moments, strict=True):
        if prep.reusing:
            prep.transform(name, None)
        else:
            prep.transforms.append(transform_from_moments(name, "log1p", m.n, m.mean, m.m2))
    fitted = Fitted(prep.vocabularies, prep.transforms, rows, corrupt, validation_total=rows["validation"])
    if kept:
        fitted.validation = Encoder(fitted.vocabularies, fitted.transforms, split, VALIDATION).rows(_concat(kept))
    return fitted


def vocabulary_from_counts(name: str, counts: dict[str, int], min_freq: int) -> Vocabulary:
    """The vocabulary :func:`recserve.data.features.fit_vocabulary` fits, from token counts."""
    return fit_vocabulary(name, np.zeros(0, str), min_freq=min_freq, counted=counts)


def _arrow_mask(mask: np.ndarray):
    import pyarrow as pa

    return pa.array(mask, type=pa.bool_())


def take(block: criteo.Block, index: np.ndarray) -> criteo.Block:
    """The rows ``index`` of ``block`` (their split is no longer that of a contiguous block: split first)."""
    import pyarrow as pa

    idx = pa.array(index, type=pa.int64())
    return criteo.Block(block.shard, -1, block.label[index], block.ints[index], [c.take(idx) for c in block.cats])


def _concat(blocks: list[criteo.Block]) -> criteo.Block:
    import pyarrow as pa

    return criteo.Block(-1, -1, np.concatenate([b.label for b in blocks]), np.concatenate([b.ints for b in blocks]),
                        [pa.concat_arrays([b.cats[j] for b in blocks]) for j in range(len(criteo.SPARSE_NAMES))])


class Encoder:
    """Blocks -> model inputs for the rows of one split (``keep``: FIT, VALIDATION or TEST)."""

    def __init__(self, vocabularies: dict[str, Vocabulary], transforms: list[DenseTransform],
                 split: SplitSettings, keep: int):
        import pyarrow as pa

        self.vocabularies = vocabularies
        self.token_sets = [pa.array(vocabularies[n].tokens, type=pa.string()) for n in criteo.SPARSE_NAMES]
        self.transforms = transforms
        self.split = split
        self.keep = keep

    def encoded(self, path: Path, shard: int):
        """The encoded rows of split ``keep`` of shard ``path`` (number ``shard``), block by block."""
        for block in criteo.read_blocks([path], shards=[shard]):
            rows = self.select(block)
            if len(rows):
                yield self.arrays(rows)

    def select(self, block: criteo.Block) -> criteo.Block:
        return take(block, np.flatnonzero(self.split.of(block) == self.keep))

    def arrays(self, block: criteo.Block) -> dict[str, np.ndarray]:
        """{"sparse": int64 [n, 26], "dense": float32 [n, 13], "label": float32 [n]} of every row of ``block``."""
        import pyarrow.compute as pc

        sparse = np.empty((len(block), len(self.token_sets)), dtype=np.int64)
        for j, (values, tokens) in enumerate(zip(block.cats, self.token_sets, strict=True)):
            index = pc.fill_null(pc.index_in(values, value_set=tokens), -1)
            sparse[:, j] = np.asarray(index, dtype=np.int64) + 1  # 0 = out of vocabulary
        dense = np.stack([t.apply(block.ints[:, j]) for j, t in enumerate(self.transforms)], axis=1) \
            if len(block) else np.zeros((0, len(self.transforms)), np.float32)
        return {"sparse": sparse, "dense": np.ascontiguousarray(dense, dtype=np.float32),
                "label": block.label.astype(np.float32)}

    def rows(self, block: criteo.Block) -> RankingData:
        a = self.arrays(block)
        features = [SparseFeature(n, self.vocabularies[n].cardinality) for n in criteo.SPARSE_NAMES]
        return RankingData(features, [t.name for t in self.transforms], a["sparse"], a["dense"], a["label"])


def write_synthetic(rows: int, out: Path, *, shard_rows: int = 1_000_000, seed: int = 0, fmt: str = "tsv") -> list[Path]:
    """Criteo-format rows with a planted signal, written block by block to ``out/part-NNNNN.tsv|parquet``.

    Each categorical column draws Zipf-distributed tokens from its own vocabulary (10 to 200,000 tokens);
    each token and each integer column carries a fixed weight, and the label is drawn from the logistic
    of their sum, so a ranker can learn it (AUC about 0.75-0.8). About 5% of integers are missing.
    """
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401  (pa.compute)
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if rows < 1 or shard_rows < 1:
        raise DataError("write_synthetic: rows and shard_rows must be positive")
    if fmt not in ("tsv", "parquet"):
        raise DataError(f"format {fmt!r}: write tsv or parquet")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = np.geomspace(10, 200_000, len(criteo.SPARSE_NAMES)).astype(np.int64)
    weight_rng = np.random.default_rng([seed, 1])
    token_weights = [weight_rng.normal(0, 0.6, size) * (j % 3 != 2) for j, size in enumerate(sizes)]
    token_text = [pa.array([f"{j:02d}{i:06x}" for i in range(size)]) for j, size in enumerate(sizes)]
    int_weights = weight_rng.normal(0, 0.3, len(criteo.DENSE_NAMES))
    paths = []
    block = 100_000
    for shard, start in enumerate(range(0, rows, shard_rows)):
        path = out / f"part-{shard:05d}.{fmt}"
        n_shard = min(shard_rows, rows - start)
        writer = None
        for b, first in enumerate(range(0, n_shard, block)):
            rng = np.random.default_rng([seed, 2, shard, b])
            n = min(block, n_shard - first)
            logit = np.full(n, -1.2)
            cols: dict[str, pa.Array] = {}
            ints = rng.poisson(np.exp(rng.normal(1.0, 1.0, (n, len(criteo.DENSE_NAMES)))))
            logit += (np.log1p(ints) - 1.0) @ int_weights
            for j, name in enumerate(criteo.DENSE_NAMES):
                cols[name] = pa.array(ints[:, j], mask=rng.random(n) < 0.05)
            cats = {}
            for j, (name, size) in enumerate(zip(criteo.SPARSE_NAMES, sizes, strict=True)):
                ids = np.minimum(rng.zipf(1.3, n) - 1, size - 1)
                logit += token_weights[j][ids]
                missing = pa.array(rng.random(n) < 0.02)
                cats[name] = pa.compute.if_else(missing, pa.scalar(None, pa.string()), token_text[j].take(ids))
            label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
            table = pa.table({"label": label, **cols, **cats})
            if fmt == "parquet":
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table)
            else:
                writer = writer or pacsv.CSVWriter(path, table.schema, write_options=pacsv.WriteOptions(
                    include_header=False, delimiter="\t", quoting_style="none"))
                writer.write_table(table)
        writer.close()
        paths.append(path)
    return paths
