"""Raw request features -> model inputs, with the vocabularies and transforms saved at training time.

Used by the Triton ensemble's preprocessing model and by the router's edge path, so that both map
raw values exactly as training did.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.data.schema import DenseTransform, Vocabulary, load_preprocessing
from recserve.errors import InferenceError


@dataclass
class FeatureEncoder:
    """Encodes raw ranker rows: categorical strings by vocabulary (unknown -> OOV 0), numbers by transform."""

    sparse_names: list[str]
    vocabularies: list[Vocabulary]
    transforms: list[DenseTransform]

    @classmethod
    def load(cls, path: Path, sparse_names: list[str] | None = None, *, dense: bool = True) -> FeatureEncoder:
        """The encoder of ``sparse_names`` (default: every vocabulary) and, with ``dense``, the dense transforms."""
        vocabs, transforms = load_preprocessing(path)
        names = sparse_names or list(vocabs)
        return cls(names, [vocabs[n] for n in names], transforms if dense else [])

    def encode(self, sparse_raw: np.ndarray, dense_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``sparse_raw`` [N, S] strings (or bytes), ``dense_raw`` [N, D] numbers (NaN = missing)."""
        sparse_raw, dense_raw = np.asarray(sparse_raw), np.asarray(dense_raw, dtype=np.float64)
        if sparse_raw.ndim != 2 or sparse_raw.shape[1] != len(self.vocabularies):
            raise InferenceError(f"sparse features: expected [N, {len(self.vocabularies)}] "
                                 f"({', '.join(self.sparse_names)}), got {list(sparse_raw.shape)}")
        if dense_raw.ndim != 2 or dense_raw.shape[1] != len(self.transforms):
            raise InferenceError(f"dense features: expected [N, {len(self.transforms)}] "
                                 f"({', '.join(t.name for t in self.transforms)}), got {list(dense_raw.shape)}")
        if len(sparse_raw) != len(dense_raw):
            raise InferenceError(f"{len(sparse_raw)} sparse rows but {len(dense_raw)} dense rows")
        try:
            texts = [[v.decode() if isinstance(v, bytes) else str(v) for v in col] for col in sparse_raw.T]
        except UnicodeDecodeError as e:  # Triton's BYTES tensors carry any bytes: the caller's mistake
            raise InferenceError(f"sparse features: a value is not UTF-8 text ({e.reason} at byte {e.start})") from None
        sparse = np.stack([vocab.lookup(col) for vocab, col in zip(self.vocabularies, texts)], axis=1) if texts else \
            np.zeros((len(sparse_raw), 0), np.int64)
        dense = np.zeros((len(dense_raw), len(self.transforms)), np.float32)
        for j, t in enumerate(self.transforms):
            dense[:, j] = t.apply(dense_raw[:, j])
        return np.ascontiguousarray(sparse, dtype=np.int64), np.ascontiguousarray(dense)

    def encode_one(self, values: Mapping[str, str], numbers: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """One row given by name (a missing value: "" or NaN), as :meth:`encode` maps it: ``[S]`` ids, ``[D]``
        floats. For the router's request context, where encode's array checks cost more than the lookups."""
        sparse = np.array([v.id(values.get(n, "")) for n, v in zip(self.sparse_names, self.vocabularies)], np.int64)
        dense = np.array([t.apply_one(numbers.get(t.name, math.nan)) for t in self.transforms], np.float32)
        return sparse, dense

    def decode(self, sparse: np.ndarray, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw rows (object array of str, float32) that :meth:`encode` maps back to ``sparse``/``dense``."""
        raw_sparse = np.array([[v.token(int(i)) for v, i in zip(self.vocabularies, row)] for row in sparse], dtype=object)
        raw_dense = np.stack([t.invert(dense[:, j]) for j, t in enumerate(self.transforms)], axis=1) \
            if self.transforms else np.zeros((len(dense), 0))
        return raw_sparse.reshape(len(sparse), len(self.vocabularies)), raw_dense.astype(np.float32)


def model_parameters(args: dict) -> dict[str, str]:
    """The ``parameters`` of a Triton python model's config (``initialize``'s ``args``), name -> string value."""
    parameters = json.loads(args["model_config"]).get("parameters", {})
    return {name: value["string_value"] for name, value in parameters.items()}


def sibling_file(this_model_dir: str, model: str, filename: str) -> Path:
    """``filename`` in the newest version of another model of the same repository (from a python model)."""
    root = Path(this_model_dir.rstrip("/")).parent / model
    versions = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    if not versions:
        raise FileNotFoundError(f"model '{model}' has no version in {root.parent}; build it first")
    return root / str(versions[-1]) / filename


def read_columns(path: Path) -> dict[str, list[str]]:
    """The model-input column order saved with the vocabularies (see ``Dataset.columns``)."""
    return json.loads(Path(path).read_text()).get("columns", {})


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first (stable for ties)."""
    scores = np.asarray(scores).ravel()
    k = max(0, min(int(k), len(scores)))
    return np.argsort(-scores, kind="stable")[:k]
