"""A text encoder judged on search data (issue 19): products retrieved for held-out queries against the
raters' graded labels, agreement with a teacher encoder, and CPU speed. Pure numpy on embeddings, plus
onnxruntime and the tokenizer to make them: no torch.

- NDCG@10: the products nearest a query (cosine over the whole corpus), gains as the data gives them;
  a product the query was not judged against counts as gain 0. Queries with no positive gain are left out.
- recall@10: of a query's products with a positive gain, the share found in its top 10.
- teacher_overlap_at_10: the share of the teacher's top 10 the encoder's top 10 keeps (mean over queries);
  mean_cosine: between the encoder's and the teacher's embedding of the same query.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.data.search import SearchData
from recserve.encoder.artifact import INPUTS, load_info
from recserve.encoder.text import TextTokenizer
from recserve.onnxrt import session
from recserve.timing import interleaved

K = 10
CHUNK = 512
"""Queries scored against the corpus at once (a [CHUNK, products] matrix)."""


class Encoder:
    """An exported encoder on the CPU: ``embed(texts)`` -> float32 [n, dim]."""

    def __init__(self, directory: Path, threads: int = 2):
        self.directory = Path(directory)
        self.info = load_info(self.directory)
        self.tokenizer = TextTokenizer.of(self.directory, self.info)
        self.session = session((self.directory / "model.onnx").read_bytes(), threads)

    def embed(self, texts: list[str], batch: int = 64) -> np.ndarray:
        out = [self.session.run(None, dict(zip(INPUTS, self.tokenizer.encode(texts[i:i + batch]))))[0]
               for i in range(0, len(texts), batch)]
        return np.concatenate(out) if out else np.zeros((0, self.info.dim), np.float32)

    def bytes(self) -> int:
        return (self.directory / "model.onnx").stat().st_size


def top_k(queries: np.ndarray, products: np.ndarray, k: int = K) -> np.ndarray:
    """Per query, the indices of the ``k`` products of highest cosine, best first."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    p = products / np.linalg.norm(products, axis=1, keepdims=True).clip(1e-12)
    k = min(k, len(p))
    out = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), CHUNK):
        scores = q[start:start + CHUNK] @ p.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[start:start + CHUNK] = np.take_along_axis(part, order, axis=1)
    return out


def per_query(top: np.ndarray, judgments: list[dict[int, float]], k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """NDCG@k and recall@k of each query with a positive gain (in order; the others left out)."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ndcgs, recalls = [], []
    for ranked, judged in zip(top, judgments):
        gains = sorted((g for g in judged.values() if g > 0), reverse=True)
        if not gains:
            continue
        dcg = sum(judged.get(int(p), 0.0) * d for p, d in zip(ranked[:k], discounts))
        ideal = sum(g * d for g, d in zip(gains[:k], discounts))
        ndcgs.append(dcg / ideal)
        relevant = {p for p, g in judged.items() if g > 0}
        recalls.append(len(relevant & {int(p) for p in ranked[:k]}) / len(relevant))
    return np.array(ndcgs), np.array(recalls)


def retrieval_quality(top: np.ndarray, judgments: list[dict[int, float]], k: int = K) -> dict[str, float]:
    """Mean NDCG@k and recall@k of ranked product lists against graded judgments (see the module's docstring)."""
    ndcgs, recalls = per_query(top, judgments, k)
    return {f"ndcg_at_{k}": float(ndcgs.mean()) if len(ndcgs) else 0.0,
            f"recall_at_{k}": float(recalls.mean()) if len(recalls) else 0.0, "queries": len(ndcgs)}


def teacher_agreement(top: np.ndarray, teacher_top: np.ndarray, queries: np.ndarray,
                      teacher_queries: np.ndarray) -> dict[str, float]:
    """Top-k overlap with the teacher's lists and the mean cosine between the two embeddings of each query."""
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(top, teacher_top)])
    cos = (queries * teacher_queries).sum(1) / (np.linalg.norm(queries, axis=1)
                                               * np.linalg.norm(teacher_queries, axis=1)).clip(1e-12)
    return {f"teacher_overlap_at_{K}": float(overlap), "mean_cosine": float(cos.mean())}


def judge(encoders: dict[str, Encoder], data: SearchData, teacher: str, catalog: str = "self") -> dict[str, dict]:
    """Each encoder on the held-out queries of ``data``: bytes, retrieval quality, and agreement with
    ``encoders[teacher]`` (``size_ratio`` and ``relative_ndcg_loss`` against it too). With ``catalog`` ``teacher``
    every encoder's queries are matched against the teacher's embeddings of the titles (an index the teacher
    built offline), else against its own."""
    import time

    queries, judgments = data.split(held_out=True)
    out, tops, embedded = {}, {}, {}
    shared = encoders[teacher].embed(data.titles) if catalog == "teacher" else None
    for name, enc in encoders.items():
        t0 = time.perf_counter()
        corpus = enc.embed(data.titles) if shared is None else shared
        seconds = time.perf_counter() - t0
        embedded[name] = enc.embed(queries)
        tops[name] = top_k(embedded[name], corpus)
        out[name] = {"bytes": enc.bytes(), "parameters": enc.info.parameters, "corpus_embed_s": round(seconds, 1),
                     **retrieval_quality(tops[name], judgments)}
    base = out[teacher]
    for name, m in out.items():
        m.update(teacher_agreement(tops[name], tops[teacher], embedded[name], embedded[teacher]))
        m["size_ratio"] = base["bytes"] / m["bytes"]
        m["relative_ndcg_loss"] = 1 - m[f"ndcg_at_{K}"] / base[f"ndcg_at_{K}"] if base[f"ndcg_at_{K}"] else 0.0
    return out


@dataclass
class Speed:
    batch: int
    ms_per_batch: float
    texts_per_s: float


def speeds(encoders: dict[str, Encoder], texts: list[str], seq_len: int = 16,
           batches: tuple[int, ...] = (1, 64), rounds: int = 5) -> dict[str, dict[int, Speed]]:
    """CPU latency and throughput of each encoder at each batch size, on ``texts`` tokenized and cut or padded to
    ``seq_len`` tokens; the encoders run in turn, round after round (machine drift hits all alike)."""
    out: dict[str, dict[int, Speed]] = {name: {} for name in encoders}
    for b in batches:
        feeds = {}
        for name, enc in encoders.items():
            ids, mask = enc.tokenizer.encode((texts * (b // max(len(texts), 1) + 1))[:b])
            ids, mask = _fit(ids, seq_len), _fit(mask, seq_len)
            feeds[name] = dict(zip(INPUTS, (ids, mask)))
        runs = interleaved({name: (lambda e=enc, f=feeds[name]: e.session.run(None, f))
                            for name, enc in encoders.items()}, rounds=rounds)
        for name, times in runs.items():
            ms = float(np.median(times)) * 1e3
            out[name][b] = Speed(b, ms, b / ms * 1e3)
    return out


def _fit(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` cut or padded (with 0: padding, masked out) to ``n`` columns."""
    if a.shape[1] >= n:
        return np.ascontiguousarray(a[:, :n])
    return np.pad(a, ((0, 0), (0, n - a.shape[1])))
