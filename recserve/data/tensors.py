"""``tensors:PATH``: rows already in a model's input form, for a model trained outside recserve.

The file (``.npz``, or ``.parquet`` with one column per input: scalars, or fixed-size lists for
2-D inputs) holds one array per graph input, named as the input, plus ``label`` (0/1). No recserve
preprocessing is applied: the arrays are fed to the model as they are. Rows are split like the
other random readers (seeded 80/20, validation carved from the training rows by ``load_dataset``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.data.schema import Dataset, TensorRows
from recserve.data.splits import random_split
from recserve.errors import DataError

LABEL = "label"
HINT = "write one array per model input, named as the input, plus 'label' (0/1), e.g. np.savez(PATH, sparse=..., label=...)"


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """name -> array, from an .npz or a .parquet file."""
    if not path.is_file():
        raise DataError(f"tensors:{path}: file not found; {HINT}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise DataError(f"tensors:{path}: not a readable .npz file ({str(e).splitlines()[0]}); {HINT}") from e
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"tensors:{path}: unknown file type {suffix or '(none)'!r}; use .npz or .parquet")


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"tensors:{path}: not a readable parquet file ({str(e).splitlines()[0]})") from e
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type):
            if col.null_count:
                raise DataError(f"tensors:{path}: column {name!r} has empty (null) rows; every row needs a value")
            widths = np.unique(np.diff(np.asarray(col.offsets))) if pa.types.is_list(col.type) else [col.type.list_size]
            if len(widths) > 1:
                raise DataError(f"tensors:{path}: column {name!r} holds lists of different lengths; "
                                "a 2-D input needs the same width in every row")
            flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
            out[name] = flat.reshape(len(col), int(widths[0]) if len(widths) else 0)
        else:
            try:
                out[name] = col.to_numpy(zero_copy_only=False)
            except pa.ArrowException as e:
                raise DataError(f"tensors:{path}: column {name!r} of type {col.type} is not numeric") from e
    return out


def load(path: Path, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    path = Path(path)
    arrays = read_arrays(path)
    if LABEL not in arrays:
        raise DataError(f"tensors:{path}: no '{LABEL}' array (it has: {', '.join(sorted(arrays)) or 'none'}); {HINT}")
    label = np.asarray(arrays.pop(LABEL))
    if not arrays:
        raise DataError(f"tensors:{path}: only a label; {HINT}")
    if label.ndim == 2 and label.shape[1] == 1:
        label = label[:, 0]
    if label.ndim != 1 or label.dtype.kind not in "biuf" or not np.isin(label, (0, 1)).all():
        raise DataError(f"tensors:{path}: '{LABEL}' must be one 0/1 value per row (got {label.dtype} {label.shape})")
    n = len(label)
    for name, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise DataError(f"tensors:{path}: array {name!r} has dtype {a.dtype}; inputs must be numeric")
        if a.ndim == 0 or len(a) != n:
            raise DataError(f"tensors:{path}: array {name!r} has {a.shape[0] if a.ndim else 0} rows, '{LABEL}' has {n}")
    if len(np.unique(label)) < 2:
        raise DataError(f"tensors:{path}: every label is {label[0] if n else '-'}: AUC needs both 0 and 1 rows")
    rows = TensorRows({k: np.ascontiguousarray(v) for k, v in arrays.items()}, label.astype(np.float32))
    train, test = random_split(n, test_fraction, seed)
    return Dataset(name="tensors", spec=f"tensors:{path}", vocabularies={},
                   ranking_train=rows.take(train), ranking_test=rows.take(test))
