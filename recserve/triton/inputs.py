"""Request inputs for ``recserve infer``: from JSON typed by the model's config, or from held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recserve.converters.repository import versions
from recserve.data import load_dataset
from recserve.errors import ConfigError

_TRITON_TO_NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64, "TYPE_INT64": np.int64,
                    "TYPE_INT32": np.int32, "TYPE_INT8": np.int8, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_,
                    "TYPE_STRING": np.object_}


def inputs_from_json(text: str, config: dict) -> dict[str, np.ndarray]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--json is not valid JSON ({e.msg} at column {e.colno})") from e
    types = {i["name"]: _TRITON_TO_NUMPY.get(i.get("data_type", "TYPE_FP32"), np.float32) for i in config.get("input", [])}
    if not isinstance(raw, dict) or set(raw) != set(types):
        raise ConfigError(f"--json must be an object with exactly the model's inputs {sorted(types)}")
    try:
        return {k: np.asarray(v, dtype=types[k]) for k, v in raw.items()}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--json: {e}") from e


def inputs_from_data(spec: str, rows: int, model: str, repository: Path | None) -> dict[str, np.ndarray]:
    """The first ``rows`` held-out rows, id-mapped with the served model's preprocessing when known."""
    pre = None
    if repository is not None:
        vs = versions(Path(repository) / model)
        if vs and (Path(repository) / model / str(vs[-1]) / "preprocessing.json").exists():
            pre = Path(repository) / model / str(vs[-1]) / "preprocessing.json"
    data = load_dataset(spec, preprocessing=pre)
    if data.ranking_test is not None:
        t = data.ranking_test
        return {"sparse": t.sparse[:rows], "dense": t.dense[:rows]}
    r = data.retrieval
    return {"user_sparse": r.user_table[:rows], "item_sparse": r.item_table[:rows]}
