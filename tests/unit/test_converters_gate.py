"""check_gate: every limit passes at the boundary, fails beyond it, and says why in words."""

from __future__ import annotations

import math

import pytest

from recserve.converters.evaluate import Evaluation
from recserve.converters.pipeline import check_gate, relative_loss
from recserve.converters.recipe import Gate


def ranker_eval(auc: float, logloss: float = 0.4, size: int = 1000, thr: float | None = None,
                distinct: float = 1.0) -> Evaluation:
    return Evaluation({"auc": auc, "logloss": logloss, "calibration": 1.0, "distinct_score_ratio": distinct}, size, 10,
                      throughput_b256=thr)


def retriever_eval(auc: float, recall: float, size: int = 1000) -> Evaluation:
    return Evaluation({"auc": auc, "recall@10": recall, "ndcg@10": recall / 2}, size, 10)


BASE = ranker_eval(0.80, 0.40, 1000, thr=10_000.0)


def test_relative_loss() -> None:
    assert relative_loss(0.8, 0.76) == pytest.approx(0.05)
    assert relative_loss(0.8, 0.84) == pytest.approx(-0.05)
    assert math.isnan(relative_loss(0.0, 0.5))
    assert math.isnan(relative_loss(float("nan"), 0.5))


def test_empty_gate_passes_anything() -> None:
    assert check_gate(Gate(min_distinct_score_ratio=None), BASE, ranker_eval(0.1, 9.0, 10_000, thr=1.0,
                                                                           distinct=0.0)) == []


def test_distinct_score_ratio_is_on_by_default() -> None:
    assert Gate().min_distinct_score_ratio == 0.5
    assert check_gate(Gate(), BASE, ranker_eval(0.8, distinct=0.5)) == []  # the boundary passes
    (reason,) = check_gate(Gate(), BASE, ranker_eval(0.8, distinct=0.01))
    assert "distinct score ratio 0.010 < min_distinct_score_ratio 0.5" in reason and "rank" in reason


def test_paired_throughput_ratio_wins_over_the_evaluations() -> None:
    gate = Gate(min_throughput_ratio=2.0)
    assert check_gate(gate, BASE, ranker_eval(0.8, thr=30_000.0)) == []
    (reason,) = check_gate(gate, BASE, ranker_eval(0.8, thr=30_000.0), thr_ratio=1.5)
    assert "throughput ratio 1.50x" in reason


def test_auc_loss_limit() -> None:
    gate = Gate(max_relative_auc_loss=0.01)
    assert check_gate(gate, BASE, ranker_eval(0.7925)) == []  # loss 0.9375%
    assert check_gate(gate, BASE, ranker_eval(0.85)) == []  # a gain
    (reason,) = check_gate(gate, BASE, ranker_eval(0.78))  # loss 2.5%
    assert "relative AUC loss 0.02500" in reason and "max_relative_auc_loss 0.01" in reason


def test_nan_auc_fails_the_auc_gate() -> None:
    (reason,) = check_gate(Gate(max_relative_auc_loss=0.5), BASE, ranker_eval(float("nan")))
    assert "relative AUC loss nan" in reason


def test_logloss_limit() -> None:
    gate = Gate(max_logloss_increase=0.01)
    assert check_gate(gate, BASE, ranker_eval(0.8, 0.405)) == []
    assert check_gate(gate, BASE, ranker_eval(0.8, 0.30)) == []
    (reason,) = check_gate(gate, BASE, ranker_eval(0.8, 0.45))
    assert "logloss increase 0.05000" in reason and "max_logloss_increase 0.01" in reason


def test_size_ratio_limit() -> None:
    gate = Gate(min_size_ratio=4)
    assert check_gate(gate, BASE, ranker_eval(0.8, size=250)) == []  # exactly 4x passes
    (reason,) = check_gate(gate, BASE, ranker_eval(0.8, size=400))
    assert "size ratio 2.50x < min_size_ratio 4" in reason


def test_recall_limit_for_retrievers() -> None:
    gate = Gate(max_relative_recall_loss=0.05)
    base = retriever_eval(0.9, 0.40)
    assert check_gate(gate, base, retriever_eval(0.9, 0.39)) == []  # 2.5% loss
    (reason,) = check_gate(gate, base, retriever_eval(0.9, 0.30))
    assert "relative recall@10 loss 0.25000" in reason and "max_relative_recall_loss 0.05" in reason


def test_recall_limit_ignored_for_rankers() -> None:
    assert check_gate(Gate(max_relative_recall_loss=0.0), BASE, ranker_eval(0.7)) == []


def test_logloss_limit_ignored_for_retrievers() -> None:
    assert check_gate(Gate(max_logloss_increase=0.0), retriever_eval(0.9, 0.4), retriever_eval(0.9, 0.4)) == []


def test_throughput_limit() -> None:
    gate = Gate(min_throughput_ratio=0.9)
    assert check_gate(gate, BASE, ranker_eval(0.8, thr=9_000.0)) == []
    assert check_gate(gate, BASE, ranker_eval(0.8, thr=30_000.0)) == []
    (reason,) = check_gate(gate, BASE, ranker_eval(0.8, thr=5_000.0))
    assert "throughput ratio 0.50x < min_throughput_ratio 0.9x" in reason


def test_every_broken_limit_is_reported() -> None:
    gate = Gate(max_relative_auc_loss=0.001, max_logloss_increase=0.001, min_size_ratio=2, min_throughput_ratio=1.0)
    reasons = check_gate(gate, BASE, ranker_eval(0.7, 0.6, 900, thr=100.0))
    assert len(reasons) == 4
    assert [r.split()[0] for r in reasons] == ["relative", "logloss", "size", "throughput"]
