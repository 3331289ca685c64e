"""Fitting (or reusing) vocabularies and dense transforms, and turning raw columns into model inputs.

Every reader goes through one :class:`Preprocessor`: without a saved file it fits vocabularies and
transforms from the rows the reader hands it (its training rows); with one it reuses the saved ones
unchanged, so ids and scaling match a model trained earlier.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recserve.data.schema import DenseTransform, RankingData, SparseFeature, Vocabulary, load_preprocessing
from recserve.errors import DataError


def fit_vocabulary(name: str, values: np.ndarray, min_freq: int = 1, extend: np.ndarray | None = None,
                   counted: dict[str, int] | None = None) -> Vocabulary:
    """Like :meth:`Vocabulary.build` (most frequent first, ties by token, ``""`` = missing) on a numpy column.

    Tokens are ``str(value)``. ``extend`` (e.g. the whole catalog) adds, after the counted tokens and with
    count 0, the tokens that never occur in ``values``, so every catalog entity gets its own id.
    Tokens seen in ``values`` fewer than ``min_freq`` times stay out-of-vocabulary. ``counted``: the
    tokens' counts already made (a streamed pass over shards), instead of counting ``values``.
    """
    counted = _count(values) if counted is None else counted
    kept = sorted(((t, c) for t, c in counted.items() if c >= min_freq and t != ""), key=lambda tc: (-tc[1], tc[0]))
    tokens = [t for t, _ in kept]
    counts = [c for _, c in kept]
    if extend is not None:
        new = sorted(set(_count(extend)) - counted.keys() - {""})
        tokens += new
        counts += [0] * len(new)
    return Vocabulary(name, tokens, counts)


def _count(values: np.ndarray) -> dict[str, int]:
    values = np.asarray(values).ravel()
    if values.size == 0:
        return {}
    uniq, counts = np.unique(values, return_counts=True)
    return {str(u): int(c) for u, c in zip(uniq.tolist(), counts.tolist(), strict=True)}


def encode(vocab: Vocabulary, values: np.ndarray) -> np.ndarray:
    """int64 ids of ``str(value)`` for every value (OOV and ``""`` -> 0), same shape as ``values``."""
    values = np.asarray(values)
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.int64)
    uniq, inverse = np.unique(values.ravel(), return_inverse=True)
    ids = vocab.lookup(str(u) for u in uniq.tolist())
    return ids[inverse].reshape(values.shape)


def fit_transform(
    name: str, values: np.ndarray | None, kind: str = "identity", standardize: bool = True
) -> DenseTransform:
    """A transform ``kind`` whose mean/std come from the finite ``values`` (missing -> 0, i.e. the mean)."""
    if kind not in ("identity", "log1p"):
        raise ValueError(f"unknown dense transform kind {kind!r}")
    if not standardize or values is None:
        return DenseTransform(name, kind)
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if kind == "log1p":
        x = np.log1p(np.maximum(x, 0.0))
    return transform_from_moments(name, kind, x.size, float(x.mean()) if x.size else 0.0,
                                  float(((x - x.mean()) ** 2).sum()) if x.size else 0.0)


def transform_from_moments(name: str, kind: str, n: int, mean: float, m2: float) -> DenseTransform:
    """The standardizing transform of values (after ``kind``) whose count, mean and summed squared deviations
    are given (the population standard deviation; 1 for a constant column)."""
    if n == 0:
        return DenseTransform(name, kind)
    std = float(np.sqrt(m2 / n))
    return DenseTransform(name, kind, mean=mean, std=std if std > 0 else 1.0, fill=0.0)


class Preprocessor:
    """Hands out vocabularies and dense transforms, fitted on the values given or reused from ``saved``.

    ``saved`` is a JSON file written by :meth:`Dataset.save_preprocessing`. What was handed out is
    collected in :attr:`vocabularies` and :attr:`transforms` (in request order) for the Dataset.
    """

    def __init__(self, saved: Path | None = None) -> None:
        self.saved = Path(saved) if saved is not None else None
        self.vocabularies: dict[str, Vocabulary] = {}
        self.transforms: list[DenseTransform] = []
        self._saved_vocabs: dict[str, Vocabulary] | None = None
        self._saved_transforms: dict[str, DenseTransform] | None = None
        if self.saved is not None:
            if not self.saved.is_file():
                raise DataError(
                    f"preprocessing file {self.saved} not found; pass the JSON written by Dataset.save_preprocessing "
                    "when the model was trained"
                )
            try:
                vocabs, transforms = load_preprocessing(self.saved)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise DataError(
                    f"preprocessing file {self.saved} is not a valid preprocessing JSON ({e}); "
                    "pass the file written by Dataset.save_preprocessing"
                ) from e
            self._saved_vocabs = vocabs
            self._saved_transforms = {t.name: t for t in transforms}

    @property
    def reusing(self) -> bool:
        return self.saved is not None

    def vocabulary(
        self, name: str, fit_values: np.ndarray, *, extend: np.ndarray | None = None, min_freq: int = 1
    ) -> Vocabulary:
        """Vocabulary of ``name``: already handed out, else saved, else fitted on ``fit_values`` (fit_vocabulary)."""
        if name in self.vocabularies:
            return self.vocabularies[name]
        if self._saved_vocabs is not None:
            if name not in self._saved_vocabs:
                raise DataError(
                    f"preprocessing file {self.saved} has no vocabulary for feature {name!r} "
                    f"(it has: {', '.join(sorted(self._saved_vocabs)) or 'none'}); it was written for another dataset "
                    "kind; pass the file saved with the model trained on this kind of data"
                )
            vocab = self._saved_vocabs[name]
        else:
            vocab = fit_vocabulary(name, fit_values, min_freq=min_freq, extend=extend)
        self.vocabularies[name] = vocab
        return vocab

    def transform(
        self, name: str, fit_values: np.ndarray | None, *, kind: str = "identity", standardize: bool = True
    ) -> DenseTransform:
        """The transform of dense feature ``name``: the saved one, else fitted (see :func:`fit_transform`)."""
        if self._saved_transforms is not None:
            if name not in self._saved_transforms:
                raise DataError(
                    f"preprocessing file {self.saved} has no dense transform for feature {name!r} "
                    f"(it has: {', '.join(sorted(self._saved_transforms)) or 'none'}); it was written for another "
                    "dataset kind; pass the file saved with the model trained on this kind of data"
                )
            t = self._saved_transforms[name]
        else:
            t = fit_transform(name, fit_values, kind=kind, standardize=standardize)
        self.transforms.append(t)
        return t

    def features(self, names: Sequence[str]) -> list[SparseFeature]:
        """SparseFeature list for vocabularies already handed out."""
        return [SparseFeature(n, self.vocabularies[n].cardinality) for n in names]


def ranking_data(
    prep: Preprocessor,
    sparse_names: Sequence[str],
    sparse_ids: Sequence[np.ndarray],
    transforms: Sequence[DenseTransform],
    dense_raw: Sequence[np.ndarray],
    label: np.ndarray,
) -> RankingData:
    """Assemble RankingData (int64 sparse, float32 dense and label, all C-contiguous)."""
    n = len(label)
    sparse = (
        np.ascontiguousarray(np.stack(sparse_ids, axis=1), dtype=np.int64) if sparse_ids else np.zeros((n, 0), np.int64)
    )
    if transforms:
        dense = np.ascontiguousarray(np.stack([t.apply(r) for t, r in zip(transforms, dense_raw, strict=True)], axis=1))
    else:
        dense = np.zeros((n, 0), np.float32)
    return RankingData(
        prep.features(sparse_names),
        [t.name for t in transforms],
        sparse,
        dense.astype(np.float32, copy=False),
        np.ascontiguousarray(label, dtype=np.float32),
    )


def table(prep: Preprocessor, names: Sequence[str], columns: Sequence[np.ndarray]) -> np.ndarray:
    """int64 [rows, len(names)] table: each raw column encoded with the vocabulary of the same name."""
    ids = [encode(prep.vocabularies[n], c) for n, c in zip(names, columns, strict=True)]
    return np.ascontiguousarray(np.stack(ids, axis=1), dtype=np.int64)


def require_file(path: Path, kind: str, what: str, hint: str) -> Path:
    """``path`` if it is a file, else a DataError naming the spec kind, the file and what to do."""
    if not path.is_file():
        raise DataError(f"{kind}:{path}: {what} not found; {hint}")
    return path


def no_rows(kind: str, path: Path, corrupt: int, expected: str) -> DataError:
    """The error for a file that yielded no usable row."""
    return DataError(f"{kind}:{path}: no usable rows ({corrupt} corrupt); expected {expected}")


def shard_paths(path: Path | str, kind: str, suffixes: tuple[str, ...], hint: str) -> list[Path]:
    """The files a spec's path names (one file, a directory's files ending in ``suffixes``, or a glob), in a
    fixed order; DataError when there are none."""
    import glob

    text = str(path)
    if any(ch in text for ch in "*?["):
        found = [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_file()]
    elif Path(text).is_dir():
        found = sorted(p for p in Path(text).iterdir() if p.is_file() and p.name.endswith(suffixes))
    elif Path(text).is_file():
        found = [Path(text)]
    else:
        raise DataError(f"{kind}:{text}: file not found; {hint}")
    if not found:
        raise DataError(f"{kind}:{text}: no shards ({', '.join('*' + s for s in suffixes)}) there; {hint}")
    return found


def csv_batches(path: Path, kind: str, names: list[str], *, delimiter: str, skip_rows: int = 0, quoted: bool = True,
                check_utf8: bool = True, block_bytes: int = 8 << 20):
    """(pyarrow table of string columns ``names``, lines skipped as corrupt) per block of a delimited text file
    (``.gz`` too). A line with the wrong field count is corrupt; blank and whitespace-only lines are skipped."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    skipped = [0]

    def bad_line(row) -> str:
        if (row.text or "").strip():
            skipped[0] += 1
        return "skip"

    quoting = {} if quoted else {"quote_char": False, "escape_char": False, "double_quote": False}
    try:
        if path.stat().st_size == 0:
            return
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip_rows, block_size=block_bytes),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=bad_line, **quoting),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False, check_utf8=check_utf8))
        for batch in reader:
            corrupt, skipped[0] = skipped[0], 0
            yield pa.Table.from_batches([batch]), corrupt
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):  # nothing but blank lines (or a compressed empty file)
            return
        raise DataError(f"{kind}:{path}: not readable as delimited UTF-8 text ({str(e).splitlines()[0]})") from e
    except OSError as e:
        raise DataError(f"{kind}:{path}: cannot be read ({e})") from e
    if skipped[0]:  # lines skipped after the last batch (or a file with no valid line at all)
        yield reader.schema.empty_table(), skipped[0]


def read_text_blocks(path: Path, kind: str, what: str, block_bytes: int = 8 << 20):
    """(header, pyarrow table of whitespace-trimmed string columns, corrupt lines) per block of a file with a
    header line: CSV or TSV (tab if the header holds one, else comma; ``.gz`` too) or Parquet."""
    import csv
    import gzip

    import pyarrow as pa
    import pyarrow.compute as pc

    if path.name.endswith(".parquet"):
        yield from _parquet_blocks(path, kind)
        return
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="") as f:
            header_line = f.readline()
    except (OSError, EOFError) as e:
        raise DataError(f"{kind}:{path}: cannot be read ({e})") from e
    delimiter = "\t" if "\t" in header_line else ","
    header = [h.strip() for h in next(csv.reader([header_line], delimiter=delimiter), [])]
    if len(header) < 2:
        raise DataError(f"{kind}:{path}: the {what} header {header_line.strip()!r} has fewer than 2 columns; "
                        "write a header line with tab- or comma-separated column names")
    if len(set(header)) != len(header):
        raise DataError(f"{kind}:{path}: the {what} header {header} names a column twice; name each column once")
    for table, corrupt in csv_batches(path, kind, header, delimiter=delimiter, skip_rows=1, block_bytes=block_bytes):
        yield header, pa.table({n: pc.utf8_trim_whitespace(table.column(n)) for n in header}), corrupt


def _parquet_blocks(path: Path, kind: str):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        header = list(f.schema_arrow.names)
        for batch in f.iter_batches(batch_size=65536):
            table = pa.Table.from_batches([batch])
            cols = {}
            for n in header:
                col = table.column(n)
                if pa.types.is_timestamp(col.type):
                    col = col.cast(pa.int64())
                cols[n] = pc.fill_null(col.cast(pa.string()), "")
            yield header, pa.table(cols), 0
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{kind}:{path}: not a readable parquet file ({e})") from e
