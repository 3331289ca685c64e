"""Criteo display-advertising TSV: ``label, I1..I13, C1..C26``, empty field = missing. Ranking only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.data.features import Preprocessor, encode, no_rows, ranking_data, require_file
from recserve.data.schema import Dataset
from recserve.data.splits import random_split

DENSE_NAMES = [f"I{i}" for i in range(1, 14)]
SPARSE_NAMES = [f"C{i}" for i in range(1, 27)]
N_FIELDS = 1 + len(DENSE_NAMES) + len(SPARSE_NAMES)
EXPECTED = f"{N_FIELDS} tab-separated fields per line: label (0/1), I1..I13 (integers), C1..C26 (categorical)"


def parse(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(label float32 [N], integers float64 [N, 13] with NaN = missing, categoricals str [N, 26], corrupt count).

    Lines with the wrong field count or a non-integer label / integer column are corrupt and skipped;
    blank lines are skipped silently.
    """
    labels: list[float] = []
    ints: list[list[float]] = []
    cats: list[list[str]] = []
    corrupt = 0
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != N_FIELDS or fields[0] not in ("0", "1"):
                corrupt += 1
                continue
            try:
                row = [float(int(v)) if v != "" else np.nan for v in fields[1:14]]
            except ValueError:
                corrupt += 1
                continue
            labels.append(float(fields[0]))
            ints.append(row)
            cats.append(fields[14:])
    n = len(labels)
    return (
        np.asarray(labels, dtype=np.float32),
        np.asarray(ints, dtype=np.float64).reshape(n, len(DENSE_NAMES)),
        np.asarray(cats, dtype=str).reshape(n, len(SPARSE_NAMES)),
        corrupt,
    )


def load(
    path: Path,
    *,
    min_freq: int = 1,
    seed: int = 0,
    test_fraction: float = 0.2,
    preprocessing: Path | None = None,
) -> Dataset:
    """Read a Criteo TSV; random seeded split; vocabularies (``min_freq``) and log1p+standardize fitted on train."""
    path = Path(path)
    require_file(
        path, "criteo", "file", "point the spec at a Criteo train.txt (label, I1..I13, C1..C26, tab-separated)"
    )
    prep = Preprocessor(preprocessing)
    label, ints, cats, corrupt = parse(path)
    if len(label) == 0:
        raise no_rows("criteo", path, corrupt, EXPECTED)
    train, test = random_split(len(label), test_fraction, seed)

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
    )
