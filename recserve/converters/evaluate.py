"""Evaluate an ONNX recommender on held-out data: quality, size and onnxruntime speed.

Every number in a compression report comes from here, measured on the exact ONNX bytes that
would be served.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from recserve.converters.metrics import ranking_metrics, retrieval_metrics
from recserve.data.schema import Dataset
from recserve.errors import ModelError
from recserve.models.export import RANKER_INPUTS, TWO_TOWER_INPUTS

RECALL_K = 10


@dataclass
class Evaluation:
    """Quality and cost of one model on one held-out set."""

    quality: dict[str, float]
    """``auc`` always; ``logloss``/``calibration`` for rankers, ``recall@k``/``ndcg@k`` for retrievers."""
    size_bytes: int
    parameters: int
    latency_ms_b1: float | None = None
    """Median onnxruntime latency of one batch-1 request, milliseconds (2 threads)."""
    throughput_b256: float | None = None
    """onnxruntime rows/s at batch 256 (2 threads)."""
    extra: dict = field(default_factory=dict)

    @property
    def auc(self) -> float:
        return self.quality["auc"]

    def to_json(self) -> dict:
        return asdict(self)


def model_kind(model: onnx.ModelProto) -> str:
    """``ranker`` or ``two-tower`` from the graph's input names; ModelError for anything else."""
    names = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    if names == set(RANKER_INPUTS):
        return "ranker"
    if names == set(TWO_TOWER_INPUTS):
        return "two-tower"
    raise ModelError(
        f"model inputs {sorted(names)} are not a recserve recommender's: a ranker takes 'sparse' (int64 [B,S]) and "
        f"'dense' (float32 [B,D]); a two-tower retriever takes 'user_sparse' and 'item_sparse'. Rename the inputs "
        "when exporting, or train one with `recserve train`"
    )


def count_parameters(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer))


def session(model: onnx.ModelProto | bytes, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise ModelError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from e


def predict(sess: ort.InferenceSession, feed: dict[str, np.ndarray], batch_size: int = 8192) -> list[np.ndarray]:
    """Run in batches along axis 0 of every input (for rankers) and concatenate."""
    n = len(next(iter(feed.values())))
    parts = [sess.run(None, {k: v[s:s + batch_size] for k, v in feed.items()}) for s in range(0, n, batch_size)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def _check_feed(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> None:
    for inp in sess.get_inputs():
        arr = feed[inp.name]
        width = inp.shape[1] if len(inp.shape) > 1 else None
        if isinstance(width, int) and arr.shape[1] != width:
            raise ModelError(
                f"model input '{inp.name}' expects {width} columns but the data has {arr.shape[1]}: "
                "evaluate with the dataset the model was trained on (same --data spec)"
            )


def quality(model: onnx.ModelProto, kind: str, data: Dataset, *, threads: int = 2) -> dict[str, float]:
    sess = session(model, threads)
    if kind == "ranker":
        test = data.ranking_test
        if test is None:
            raise ModelError(f"dataset {data.spec} has no ranking rows to evaluate a ranker on")
        _check_feed(sess, test.inputs())
        (scores,) = predict(sess, test.inputs())
        return ranking_metrics(test.label, scores)
    r = data.retrieval
    if r is None:
        raise ModelError(f"dataset {data.spec} has no user-item pairs to evaluate a retriever on")
    feed = {"user_sparse": r.user_table, "item_sparse": r.item_table}
    _check_feed(sess, feed)
    user_emb, item_emb = sess.run(None, feed)
    return retrieval_metrics(user_emb, item_emb, r.test_pairs, r.eval_negatives, k=RECALL_K)


def speed_feed(kind: str, data: Dataset, batch: int) -> dict[str, np.ndarray]:
    """A batch of real held-out inputs for timing (for retrievers: users and items both ``batch`` rows)."""
    if kind == "ranker":
        t = data.ranking_test
        idx = np.arange(batch) % len(t)
        return {"sparse": t.sparse[idx], "dense": t.dense[idx]}
    r = data.retrieval
    return {"user_sparse": r.user_table[np.arange(batch) % len(r.user_table)],
            "item_sparse": r.item_table[np.arange(batch) % len(r.item_table)]}


def measure_speed(model: onnx.ModelProto, kind: str, data: Dataset, *, threads: int = 2,
                  seconds: float = 0.5) -> tuple[float, float]:
    """(median batch-1 latency in ms, batch-256 rows/s), each measured for about ``seconds``."""
    sess = session(model, threads)
    one, big = speed_feed(kind, data, 1), speed_feed(kind, data, 256)

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


def evaluate(model: onnx.ModelProto, kind: str, data: Dataset, *, speed: bool = True, threads: int = 2) -> Evaluation:
    q = quality(model, kind, data, threads=threads)
    ev = Evaluation(quality=q, size_bytes=model.ByteSize(), parameters=count_parameters(model))
    if speed:
        ev.latency_ms_b1, ev.throughput_b256 = measure_speed(model, kind, data, threads=threads)
    return ev
