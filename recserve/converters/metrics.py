"""Quality metrics, as pure functions of scores and labels."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present (nothing to rank)."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def ranking_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUC, logloss and calibration (mean predicted CTR / observed CTR) of a ranker's probabilities."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=np.float64).ravel()
    observed = float(y.mean()) if len(y) else float("nan")
    return {
        "auc": auc_score(y, p),
        "logloss": float(log_loss(y, p, labels=[0, 1])) if len(y) else float("nan"),
        "calibration": float(p.mean() / observed) if observed > 0 else float("nan"),
    }


def retrieval_metrics(user_emb: np.ndarray, item_emb: np.ndarray, test_pairs: np.ndarray,
                      negatives: np.ndarray, k: int = 10) -> dict[str, float]:
    """Rank each held-out positive among its sampled negatives by dot product.

    AUC is the mean share of negatives scored below the positive; recall@k the share of positives
    ranked in the top k; NDCG@k with one relevant item is ``1 / log2(rank + 2)`` inside the top k.
    """
    u = user_emb[test_pairs[:, 0]]
    pos = np.einsum("nd,nd->n", u, item_emb[test_pairs[:, 1]])
    neg = np.einsum("nd,nkd->nk", u, item_emb[negatives])
    # ties count half, as in the AUC's definition
    rank = (neg > pos[:, None]).sum(1) + 0.5 * (neg == pos[:, None]).sum(1)
    auc = 1.0 - rank / negatives.shape[1]
    hit = rank < k
    return {
        "auc": float(auc.mean()),
        f"recall@{k}": float(hit.mean()),
        f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(np.floor(rank) + 2), 0.0).mean()),
    }
