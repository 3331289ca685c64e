"""Evaluate an ONNX recommender on held-out data: quality, size and onnxruntime speed.

Every number in a compression report comes from here, measured on the exact ONNX bytes that
would be served. What is scored (:class:`Scoring`) and on which rows (:class:`HeldOut`: the
validation split for choices, the test split once for the report) are explicit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import numpy as np
import onnx
import onnxruntime as ort

from recserve.converters.metrics import (
    distinct_ratio,
    metrics_from_ranks,
    paired_auc_difference,
    paired_mean_difference,
    ranking_metrics,
    retrieval_ranks,
)
from recserve.data.schema import Dataset, RetrievalData, Rows
from recserve.errors import DataError, ModelError
from recserve.models.export import RANKER_INPUTS, RANKER_OUTPUTS, TWO_TOWER_INPUTS
from recserve.onnxrt import session

RECALL_K = 10
SPLITS = ("validation", "test")

__all__ = ["Evaluation", "HeldOut", "Scoring", "evaluate", "held_out", "model_kind", "paired_loss", "predict", "session"]


@dataclass(frozen=True)
class Scoring:
    """What a model's quality is read from."""

    kind: str
    """``ranker`` (scores and labels: AUC) or ``two-tower`` (embeddings: recall@k)."""
    score_output: str = RANKER_OUTPUTS[0]
    """Rankers: the graph output holding the score."""
    logits: bool = False
    """Rankers: the score is a logit (logloss and calibration use its sigmoid)."""


@dataclass
class HeldOut:
    """Rows a model is scored on: ranking rows, or retrieval pairs each with sampled negatives."""

    split: str
    """``validation`` (every choice) or ``test`` (the report and the gate, once)."""
    rows: Rows | None = None
    retrieval: RetrievalData | None = None
    pairs: np.ndarray | None = None
    negatives: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.pairs)

    def feed(self, batch: int | None = None) -> dict[str, np.ndarray]:
        """The model inputs of the rows (``batch`` of them, repeated if there are fewer, for timing)."""
        if self.rows is not None:
            feed = self.rows.inputs()
            if batch is None:
                return feed
            idx = np.arange(batch) % len(self.rows)
            return {k: v[idx] for k, v in feed.items()}
        r = self.retrieval
        if batch is None:
            return {"user_sparse": r.user_table, "item_sparse": r.item_table}
        return {"user_sparse": r.user_table[np.arange(batch) % len(r.user_table)],
                "item_sparse": r.item_table[np.arange(batch) % len(r.item_table)]}


def held_out(data: Dataset, kind: str, split: str) -> HeldOut:
    """The validation or test split of ``data`` for a model of ``kind``; DataError when it has none."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if kind == "ranker":
        rows = data.ranking_test if split == "test" else (data.ranking_validation() if data.ranking_train else None)
        if rows is None or len(rows) == 0:
            raise DataError(f"dataset {data.spec} has no {split} ranking rows to evaluate a ranker on")
        return HeldOut(split, rows=rows)
    r = data.retrieval
    if r is None:
        raise DataError(f"dataset {data.spec} has no user-item pairs to evaluate a retriever on")
    pairs, negs = (r.test_pairs, r.eval_negatives) if split == "test" else (r.validation_pairs, r.validation_negatives)
    if not len(pairs):
        raise DataError(f"dataset {data.spec} has no {split} pairs (no user has enough interactions)")
    return HeldOut(split, retrieval=r, pairs=pairs, negatives=negs)


@dataclass
class Evaluation:
    """Quality and cost of one model on one held-out set."""

    quality: dict[str, float]
    """``auc`` and ``distinct_score_ratio`` always; ``logloss``/``calibration`` for rankers,
    ``recall@k``/``ndcg@k`` for retrievers."""
    size_bytes: int
    parameters: int
    latency_ms_b1: float | None = None
    """Median onnxruntime latency of one batch-1 request, milliseconds (2 threads)."""
    throughput_b256: float | None = None
    """onnxruntime rows/s at batch 256 (2 threads)."""
    extra: dict = field(default_factory=dict)
    units: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Per-unit scores the paired comparison needs (rankers: each row's score; retrievers: each
    pair's AUC); not written to reports."""

    @property
    def auc(self) -> float:
        return self.quality["auc"]

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "units"} | {
            "quality": dict(self.quality), "extra": dict(self.extra)}


def model_kind(model: onnx.ModelProto) -> str:
    """``ranker`` or ``two-tower`` from a recserve graph's input names; ModelError for anything else."""
    names = graph_inputs(model)
    if names == set(RANKER_INPUTS):
        return "ranker"
    if names == set(TWO_TOWER_INPUTS):
        return "two-tower"
    raise ModelError(
        f"model inputs {sorted(names)} are not a recserve recommender's (a ranker takes 'sparse' int64 [B,S] and "
        "'dense' float32 [B,D]; a two-tower retriever 'user_sparse' and 'item_sparse'): for a model of your own, "
        "pass its inputs as data with --data tensors:PATH (.npz or .parquet, one array per input plus 'label')"
    )


def graph_inputs(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}


def count_parameters(model: onnx.ModelProto) -> int:
    dense = sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer)
    sparse = sum(np.prod(t.values.dims, dtype=np.int64) for t in model.graph.sparse_initializer)
    return int(dense + sparse)


def predict(sess: ort.InferenceSession, feed: dict[str, np.ndarray], outputs: list[str] | None = None,
            batch_size: int = 8192) -> list[np.ndarray]:
    """Run in batches along axis 0 of every input (for rankers) and concatenate."""
    n = len(next(iter(feed.values())))
    parts = [sess.run(outputs, {k: v[s:s + batch_size] for k, v in feed.items()}) for s in range(0, n, batch_size)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def scores(model: onnx.ModelProto | ort.InferenceSession, scoring: Scoring, held: HeldOut,
           threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(per-unit scores, the scores that must stay distinct): rankers, one score per row (both); retrievers,
    each pair's rank among its negatives, and the positive pairs' dot products."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model, threads)
    if scoring.kind == "ranker":
        (s,) = predict(sess, held.feed(), [scoring.score_output])
        s = np.asarray(s, dtype=np.float64)
        if s.ndim > 1 and s.shape[1:] != (1,) * (s.ndim - 1):
            raise ModelError(f"output '{scoring.score_output}' has shape {list(s.shape)}; a ranker's score is one "
                             "value per row ([B] or [B, 1]): name the score with --score-output")
        s = s.reshape(len(held))
        return s, s
    user_emb, item_emb = sess.run(["user_embedding", "item_embedding"], held.feed())
    positives = np.einsum("nd,nd->n", user_emb[held.pairs[:, 0]], item_emb[held.pairs[:, 1]])
    return retrieval_ranks(user_emb, item_emb, held.pairs, held.negatives), positives


def quality_of(unit_scores: np.ndarray, distinct_basis: np.ndarray, scoring: Scoring, held: HeldOut) -> dict[str, float]:
    if scoring.kind == "ranker":
        q = ranking_metrics(held.rows.label, unit_scores, logits=scoring.logits)
        q["distinct_score_ratio"] = distinct_ratio(distinct_basis, held.rows.inputs())
        return q
    q = metrics_from_ranks(unit_scores, held.negatives.shape[1], RECALL_K)
    q["distinct_score_ratio"] = distinct_ratio(distinct_basis, {"pairs": held.pairs}) if len(held) else float("nan")
    return q


def measure_speed(model: onnx.ModelProto, held: HeldOut, *, threads: int = 2,
                  seconds: float = 0.5) -> tuple[float, float]:
    """(median batch-1 latency in ms, batch-256 rows/s), each measured for about ``seconds``."""
    sess = session(model, threads)
    one, big = held.feed(1), held.feed(256)

    def timed(feed: dict[str, np.ndarray]) -> list[float]:
        for _ in range(5):
            sess.run(None, feed)
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 10:
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        return times

    lat = float(np.median(timed(one)) * 1e3)
    thr = float(256 / np.median(timed(big)))
    return lat, thr


def evaluate(model: onnx.ModelProto, scoring: Scoring, held: HeldOut, *, speed: bool = True,
             threads: int = 2, speed_seconds: float = 0.5) -> Evaluation:
    sess = session(model, threads)
    units, basis = scores(sess, scoring, held)
    ev = Evaluation(quality=quality_of(units, basis, scoring, held), size_bytes=model.ByteSize(),
                    parameters=count_parameters(model), units=units)
    if speed:
        ev.latency_ms_b1, ev.throughput_b256 = measure_speed(model, held, threads=threads, seconds=speed_seconds)
    return ev


def paired_loss(base: Evaluation, new: Evaluation, held: HeldOut) -> tuple[float, float]:
    """(relative AUC loss of ``new`` against ``base``, its standard error), both on ``held``.

    Rankers: DeLong's paired test on the rows; retrievers: the paired per-pair AUCs.
    """
    if base.units is None or new.units is None:
        raise ValueError("paired_loss needs evaluations with their per-unit scores")
    if held.rows is not None:
        diff, se = paired_auc_difference(held.rows.label, base.units, new.units)
    else:
        k = held.negatives.shape[1]
        diff, se = paired_mean_difference(1.0 - base.units / k, 1.0 - new.units / k)
    return diff / base.auc, se / base.auc


def relative_loss(base: float, new: float) -> float:
    return (base - new) / base if base and not np.isnan(base) else float("nan")


def is_logit(unit_scores: np.ndarray) -> bool:
    """Scores outside [0, 1]: the model returns logits, not probabilities."""
    return bool(len(unit_scores)) and (float(np.min(unit_scores)) < 0.0 or float(np.max(unit_scores)) > 1.0)

