"""Quality metrics, as pure functions of scores and labels (numpy only).

AUC comes from mid-ranks, so ties count half; :func:`paired_auc_difference` gives DeLong's
standard error of the difference between two models scored on the same rows, which the
compression search uses to tell a real loss from noise.
"""

from __future__ import annotations

import numpy as np


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of their ranks."""
    x = np.asarray(x).ravel()
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    breaks = np.flatnonzero(xs[1:] != xs[:-1]) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, n]
    out = np.empty(n, dtype=np.float64)
    out[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return out


def auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (ties count half); NaN when only one class is present (nothing to rank)."""
    y = np.asarray(labels).ravel() > 0.5
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return float("nan")
    r = midranks(np.asarray(scores, dtype=np.float64).ravel())
    return float((r[y].sum() - m * (m + 1) / 2.0) / (m * n))


def _components(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components (per positive, per negative)."""
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    tz = midranks(np.r_[pos, neg])
    tx, ty = midranks(pos), midranks(neg)
    auc = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    return auc, (tz[:m] - tx) / n, 1.0 - (tz[m:] - ty) / m


def paired_auc_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(AUC(a) - AUC(b), its standard error) for two scorings of the same rows (DeLong et al., 1988).

    The error accounts for the correlation of the two models: a quantized copy of a model differs
    from it by far less noise than an independently trained one.
    """
    y = np.asarray(labels).ravel() > 0.5
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        return float("nan"), float("nan")
    auc_a, v10a, v01a = _components(y, np.asarray(a, dtype=np.float64).ravel())
    auc_b, v10b, v01b = _components(y, np.asarray(b, dtype=np.float64).ravel())
    var = np.var(v10a - v10b, ddof=1) / m + np.var(v01a - v01b, ddof=1) / n
    return float(auc_a - auc_b), float(np.sqrt(max(var, 0.0)))


def paired_mean_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean(a - b), its standard error) for per-unit metrics of two models on the same units."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) < 2:
        return float(d.mean()) if len(d) else float("nan"), float("nan")
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def distinct_ratio(scores: np.ndarray, inputs: dict[str, np.ndarray] | None = None) -> float:
    """Distinct scores / distinct input rows (all rows when ``inputs`` is None).

    A model that can still rank gives (nearly) every distinct input its own score: 1.0. A model
    whose output went through a coarse quantizer collapses many rows onto a few values.
    """
    s = np.asarray(scores).ravel()
    if not len(s):
        return float("nan")
    rows = len(s)
    if inputs:
        flat = np.concatenate([np.ascontiguousarray(v).reshape(len(s), -1).view(np.uint8) for v in inputs.values()],
                              axis=1)
        rows = len(np.unique(flat, axis=0))
    return float(min(1.0, len(np.unique(s)) / rows))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def logit_of(probability: np.ndarray) -> np.ndarray:
    """float64 logits of probabilities (clipped to [1e-7, 1 - 1e-7] first)."""
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def ranking_metrics(labels: np.ndarray, scores: np.ndarray, *, logits: bool = False) -> dict[str, float]:
    """AUC, logloss and calibration (mean predicted CTR / observed CTR) of a ranker's scores.

    ``logits``: the scores are logits (a model without a final sigmoid); logloss and calibration
    are computed on their sigmoid, AUC on the scores themselves.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    p = np.clip(_sigmoid(s) if logits else s, 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=np.float64).ravel()
    observed = float(y.mean()) if len(y) else float("nan")
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if len(y) else float("nan")
    return {
        "auc": auc_score(y, s),
        "logloss": logloss,
        "calibration": float(p.mean() / observed) if observed > 0 else float("nan"),
    }


def retrieval_ranks(user_emb: np.ndarray, item_emb: np.ndarray, pairs: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Per held-out pair, how many of its sampled negatives score above the positive (ties count half)."""
    u = user_emb[pairs[:, 0]]
    pos = np.einsum("nd,nd->n", u, item_emb[pairs[:, 1]])
    neg = np.einsum("nd,nkd->nk", u, item_emb[negatives])
    return (neg > pos[:, None]).sum(1) + 0.5 * (neg == pos[:, None]).sum(1)


def retrieval_metrics(user_emb: np.ndarray, item_emb: np.ndarray, test_pairs: np.ndarray,
                      negatives: np.ndarray, k: int = 10) -> dict[str, float]:
    """Rank each held-out positive among its sampled negatives by dot product.

    AUC is the mean share of negatives scored below the positive; recall@k the share of positives
    ranked in the top k; NDCG@k with one relevant item is ``1 / log2(rank + 2)`` inside the top k.
    """
    return metrics_from_ranks(retrieval_ranks(user_emb, item_emb, test_pairs, negatives), negatives.shape[1], k)


def metrics_from_ranks(rank: np.ndarray, negatives: int, k: int = 10) -> dict[str, float]:
    """AUC, recall@k and NDCG@k of held-out positives from their ranks among ``negatives`` sampled items."""
    hit = rank < k
    return {
        "auc": float((1.0 - rank / negatives).mean()),
        f"recall@{k}": float(hit.mean()),
        f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(np.floor(rank) + 2), 0.0).mean()),
    }
