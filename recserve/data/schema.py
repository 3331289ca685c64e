"""In-memory shapes of the data every reader produces and every model consumes.

Ids: every categorical feature is mapped to ``[0, cardinality)`` by a :class:`Vocabulary`;
id 0 is reserved for out-of-vocabulary and missing values.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OOV_ID = 0


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature: its name and how many ids it has (OOV included)."""

    name: str
    cardinality: int


@dataclass
class Vocabulary:
    """Maps raw string values of one feature to ids; 0 is OOV, known tokens start at 1."""

    name: str
    tokens: list[str]
    counts: list[int] = field(default_factory=list)
    """Training-set frequency of each token, aligned with ``tokens`` (empty if unknown)."""

    def __post_init__(self) -> None:
        self._index = {t: i + 1 for i, t in enumerate(self.tokens)}

    @property
    def cardinality(self) -> int:
        return len(self.tokens) + 1

    @classmethod
    def build(cls, name: str, values: Iterable[str], min_freq: int = 1) -> Vocabulary:
        """Tokens seen at least ``min_freq`` times, most frequent first (ties by value)."""
        counter = Counter(v for v in values if v != "")
        kept = sorted(((t, c) for t, c in counter.items() if c >= min_freq), key=lambda tc: (-tc[1], tc[0]))
        return cls(name, [t for t, _ in kept], [c for _, c in kept])

    def token(self, index: int) -> str:
        """The raw value of an id ("" for the OOV id)."""
        return self.tokens[index - 1] if 0 < index <= len(self.tokens) else ""

    def lookup(self, values: Iterable[str]) -> np.ndarray:
        index = self._index
        return np.fromiter((index.get(v, OOV_ID) for v in values), dtype=np.int64)

    def id(self, value: str) -> int:
        """The id of one raw value (OOV for unknown and missing ones)."""
        return self._index.get(value, OOV_ID)

    def to_json(self) -> dict:
        return {"name": self.name, "tokens": self.tokens, "counts": self.counts}

    @classmethod
    def from_json(cls, d: dict) -> Vocabulary:
        return cls(d["name"], list(d["tokens"]), list(d.get("counts", [])))


@dataclass(frozen=True)
class DenseTransform:
    """How a raw numeric value becomes a model input: ``(f(x) - mean) / std``, missing -> ``fill``."""

    name: str
    kind: str = "identity"
    """``identity`` or ``log1p`` (``log(1 + max(x, 0))``, for counts)."""
    mean: float = 0.0
    std: float = 1.0
    fill: float = 0.0

    def apply(self, raw: np.ndarray) -> np.ndarray:
        x = np.asarray(raw, dtype=np.float64)
        missing = ~np.isfinite(x)
        x = np.where(missing, 0.0, x)
        if self.kind == "log1p":
            x = np.log1p(np.maximum(x, 0.0))
        out = (x - self.mean) / (self.std or 1.0)
        out[missing] = self.fill
        return out.astype(np.float32)

    def apply_one(self, raw: float) -> float:
        """:meth:`apply` of one value, in float64 (without numpy's per-call cost: the router's context row)."""
        x = float(raw)
        if not math.isfinite(x):
            return self.fill
        if self.kind == "log1p":
            x = float(np.log1p(max(x, 0.0)))  # numpy's log1p, not math's: they differ in the last bit
        return (x - self.mean) / (self.std or 1.0)

    def invert(self, values: np.ndarray) -> np.ndarray:
        """A raw value that :meth:`apply` maps to ``values`` (for building requests from encoded rows)."""
        x = np.asarray(values, dtype=np.float64) * (self.std or 1.0) + self.mean
        return np.expm1(x) if self.kind == "log1p" else x

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "mean": self.mean, "std": self.std, "fill": self.fill}


@dataclass
class RankingData:
    """Rows for a ranker (CTR model): one categorical id per sparse feature, dense floats, a 0/1 label."""

    sparse_features: list[SparseFeature]
    dense_names: list[str]
    sparse: np.ndarray
    """int64 [N, S]; column j holds ids of ``sparse_features[j]``."""
    dense: np.ndarray
    """float32 [N, D]."""
    label: np.ndarray
    """float32 [N], 0 or 1."""

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def take(self, index: np.ndarray) -> RankingData:
        return RankingData(self.sparse_features, self.dense_names, self.sparse[index], self.dense[index], self.label[index])

    @staticmethod
    def concat(parts: list[RankingData]) -> RankingData:
        """The rows of ``parts`` (at least one, same features) one after the other."""
        first = parts[0]
        return RankingData(first.sparse_features, first.dense_names, np.concatenate([p.sparse for p in parts]),
                           np.concatenate([p.dense for p in parts]), np.concatenate([p.label for p in parts]))

    def inputs(self) -> dict[str, np.ndarray]:
        """The ONNX feed for a recserve ranker."""
        return {"sparse": self.sparse, "dense": self.dense}


@dataclass
class TensorRows:
    """Rows already in a model's input form (bring-your-own model): one array per graph input, plus labels.

    Duck-types :class:`RankingData` where only the feed and the labels matter (evaluation,
    calibration, row counts); it has no recserve feature layout, so nothing that trains a recserve
    ranker (distillation, fine-tuning) can use it.
    """

    features: dict[str, np.ndarray]
    """Graph input name -> array, axis 0 the rows."""
    label: np.ndarray
    """float32 [N], 0 or 1."""

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def take(self, index: np.ndarray) -> TensorRows:
        return TensorRows({k: v[index] for k, v in self.features.items()}, self.label[index])

    def inputs(self) -> dict[str, np.ndarray]:
        return self.features


Rows = RankingData | TensorRows
"""Labelled rows a ranker is scored on."""


@dataclass
class RetrievalData:
    """Positive user-item pairs for a two-tower retriever, split leave-last-out.

    Rows of ``user_table`` / ``item_table`` are users / items; column 0 is the id feature and the
    rest are attributes. Pairs index those rows.
    """

    user_features: list[SparseFeature]
    item_features: list[SparseFeature]
    user_table: np.ndarray
    """int64 [U, Fu]."""
    item_table: np.ndarray
    """int64 [I, Fi]."""
    train_pairs: np.ndarray
    """int64 [P, 2]: (user row, item row), every positive except each user's last."""
    test_pairs: np.ndarray
    """int64 [T, 2]: each evaluated user's last positive."""
    eval_negatives: np.ndarray
    """int64 [T, K]: item rows the user never interacted with, sampled deterministically."""
    validation_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    """int64 [V, 2]: each user's last training positive, held out of ``train_pairs`` for choices."""
    validation_negatives: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    """int64 [V, K]: sampled like ``eval_negatives``, for ``validation_pairs``."""


@dataclass
class Dataset:
    """What a reader returns: the splits it can provide plus the preprocessing learned from training rows."""

    name: str
    spec: str
    vocabularies: dict[str, Vocabulary]
    dense_transforms: list[DenseTransform] = field(default_factory=list)
    ranking_train: Rows | None = None
    ranking_test: Rows | None = None
    retrieval: RetrievalData | None = None
    corrupt_rows: int = 0
    """Rows that could not be parsed and were skipped."""
    validation_index: np.ndarray | None = None
    """Rows of ``ranking_train`` held back for every choice made on data (best epoch, kept layers, the
    compression search), carved the way the reader carved the test split; None until
    :func:`recserve.data.load_dataset` or the reader sets it."""

    def ranking_fit(self) -> Rows:
        """The training rows models learn from: ``ranking_train`` without the validation rows."""
        keep = np.ones(len(self.ranking_train), dtype=bool)
        if self.validation_index is not None:
            keep[self.validation_index] = False
        return self.ranking_train.take(np.flatnonzero(keep))

    def ranking_validation(self) -> Rows:
        """The validation rows (empty when none were carved)."""
        index = self.validation_index if self.validation_index is not None else np.zeros(0, np.int64)
        return self.ranking_train.take(index)

    def columns(self) -> dict[str, list[str]]:
        """Feature names in model-input column order: ranking sparse/dense, retrieval user/item."""
        out: dict[str, list[str]] = {}
        if self.ranking_train is not None:
            out["ranking_sparse"] = [f.name for f in self.ranking_train.sparse_features]
            out["ranking_dense"] = list(self.ranking_train.dense_names)
        if self.retrieval is not None:
            out["user_sparse"] = [f.name for f in self.retrieval.user_features]
            out["item_sparse"] = [f.name for f in self.retrieval.item_features]
        return out

    def save_preprocessing(self, path: Path) -> None:
        """Write vocabularies and dense transforms (what serving needs to map raw features to ids)."""
        path.write_text(
            json.dumps(
                {
                    "dataset": self.name,
                    "spec": self.spec,
                    "vocabularies": {k: v.to_json() for k, v in self.vocabularies.items()},
                    "dense_transforms": [t.to_json() for t in self.dense_transforms],
                    "columns": self.columns(),
                }
            )
        )


def load_preprocessing(path: Path) -> tuple[dict[str, Vocabulary], list[DenseTransform]]:
    d = json.loads(Path(path).read_text())
    vocabs = {k: Vocabulary.from_json(v) for k, v in d["vocabularies"].items()}
    transforms = [DenseTransform(**t) for t in d["dense_transforms"]]
    return vocabs, transforms
