"""The compression search's decisions, as pure functions: acceptance, choice, the Pareto front, the ladder."""

from __future__ import annotations

import math

import pytest

from recserve.converters.search import (
    TIE,
    Budget,
    Measure,
    Reference,
    TeacherShape,
    choose,
    limit_reasons,
    pareto_front,
    prediction_se,
    quality_reasons,
    rare_row_variants,
    steps_worth_running,
    student_ladder,
    z_for,
)

REF = Reference(size_bytes=10_000, throughput=1_000.0)
BUDGET = Budget(max_relative_loss=0.001, z=1.645, test_to_validation=0.4)


def m(size: int = 1000, loss: float = 0.0, se: float = 0.0, thr: float | None = 3000.0, distinct: float = 1.0,
      auc: float = 0.8) -> Measure:
    return Measure(size, thr, loss, se, distinct, auc)


def test_z_for_confidence() -> None:
    assert z_for(0.5) == pytest.approx(0.0, abs=1e-9)
    assert z_for(0.95) == pytest.approx(1.645, abs=1e-3)
    assert z_for(0.9) == pytest.approx(1.2816, abs=1e-3)


def test_prediction_error_adds_the_test_splits_own() -> None:
    # validation 8,000 rows, test 20,000: the test loss's variance is 0.4 of the validation loss's
    assert prediction_se(m(se=0.001), BUDGET) == pytest.approx(0.001 * math.sqrt(1.4))
    assert prediction_se(m(se=float("nan")), BUDGET) == 0.0


def test_acceptance_keeps_a_margin_for_noise() -> None:
    se = 0.0004
    margin = 1.645 * se * math.sqrt(1.4)
    assert quality_reasons(m(loss=0.001 - margin - 1e-9, se=se), BUDGET) == []
    (reason,) = quality_reasons(m(loss=0.001 - margin + 1e-6, se=se), BUDGET)
    assert "validation loss" in reason and "budget 0.100%" in reason
    # a candidate that looks better than the teacher, but only by noise, is not accepted on that alone
    assert quality_reasons(m(loss=-0.0005, se=0.002), BUDGET)
    # an exact copy (no error) is accepted up to the budget itself
    assert quality_reasons(m(loss=0.001, se=0.0), BUDGET) == []
    assert quality_reasons(m(loss=float("nan")), BUDGET)


def test_acceptance_checks_the_scores_still_rank() -> None:
    (reason,) = quality_reasons(m(distinct=0.2), BUDGET)
    assert "distinct score ratio 0.200 < 0.5" in reason
    assert quality_reasons(m(distinct=0.2), Budget(0.001, min_distinct_score_ratio=None)) == []


def test_limits() -> None:
    b = Budget(0.001, min_size_ratio=8, min_throughput_ratio=2.5)
    assert limit_reasons(m(size=1250, thr=2500.0), REF, b) == []
    size, thr = limit_reasons(m(size=1300, thr=2000.0), REF, b)
    assert "size ratio 7.69x < 8" in size and "throughput ratio 2.00x < 2.5" in thr
    (unmeasured,) = limit_reasons(m(size=100, thr=None), REF, b)
    assert "throughput ratio -x" in unmeasured


def test_choose_the_smallest_accepted_within_limits() -> None:
    b = Budget(0.001, min_size_ratio=8)
    ms = [m(size=10_000), m(size=2000), m(size=500), m(size=900), m(size=100)]
    accepted = [True, True, True, True, False]
    c = choose(ms, accepted, REF, b, "size")
    assert c.index == 2 and "within the budget and limits" in c.why
    # throughput objective: the fastest accepted
    ms[3] = m(size=900, thr=9000.0)
    assert choose(ms, accepted, REF, b, "throughput").index == 3


def test_choose_ties_go_to_fewer_stages() -> None:
    # 40.2x against 39.8x: a 1% gain from one more stage is not worth its risk
    ms = [m(size=10_000), m(size=1005, loss=0.0001), m(size=995, loss=-0.0003)]
    assert 995 * (1 + TIE) > 1005
    assert choose(ms, [True] * 3, REF, BUDGET, "size", depth=[0, 2, 3]).index == 1
    # a real gain still wins
    ms[2] = m(size=900)
    assert choose(ms, [True] * 3, REF, BUDGET, "size", depth=[0, 2, 3]).index == 2


def test_choose_when_limits_or_budget_cannot_be_met() -> None:
    b = Budget(0.001, min_size_ratio=100)
    ms = [m(size=10_000), m(size=2000), m(size=5000, loss=0.0002)]
    c = choose(ms, [True, True, False], REF, b, "size")
    assert c.index == 1 and "no candidate met the size/throughput limits" in c.why
    c = choose([m(loss=0.01), m(loss=0.005), None], [False, False, False], REF, b, "size")
    assert c.index == 1 and "least loss" in c.why
    assert choose([None], [False], REF, b, "size").index is None


def test_pareto_front() -> None:
    ms = [
        m(size=1000, thr=100.0, auc=0.80),   # 0: front (best AUC)
        m(size=500, thr=100.0, auc=0.79),    # 1: front (smaller)
        m(size=600, thr=90.0, auc=0.78),     # 2: dominated by 1
        m(size=2000, thr=500.0, auc=0.70),   # 3: front (fastest)
        None,                                # a failed candidate
        m(size=500, thr=100.0, auc=0.79),    # 5: equal to 1: neither dominates
    ]
    assert pareto_front(ms) == [0, 1, 3, 5]


def test_steps_worth_running() -> None:
    assert steps_worth_running(dense_bytes=1_900, table_bytes=350, total_bytes=2_300) == ["dense", "tables"]
    # a small student: its dense layers are not worth the risk of another step
    assert steps_worth_running(dense_bytes=20, table_bytes=240, total_bytes=260) == ["tables"]
    assert steps_worth_running(0, 0, 0) == []


def test_student_ladder_is_sized_from_the_teacher_and_sorted() -> None:
    t = TeacherShape(embedding_dim=32, rows=2770, fields=8, num_dense=20, cross_layers=3, top_mlp=(512, 256, 128),
                     bottom_mlp=(64,))
    ladder = student_ladder(t)
    params = [s.parameters(t) for s in ladder]
    assert params == sorted(params) and len(ladder) == 5
    assert [s.embedding_dim for s in ladder] == [8, 16, 32, 32, 32]
    assert ladder[0].top_mlp == [32, 16] and ladder[-1].top_mlp == [256, 128] and ladder[-1].cross_layers == 2
    teacher_params = 2770 * 32 + (20 * 64 + 64 + 64 * 32 + 32) + 3 * (256 * 256 + 256) + (
        256 * 512 + 512 + 512 * 256 + 256 + 256 * 128 + 128 + 129)
    assert all(p < teacher_params / 2 for p in params)
    # a tiny teacher: no rung wider than it, no duplicates
    small = TeacherShape(embedding_dim=4, rows=100, fields=3, top_mlp=(16,), bottom_mlp=())
    rungs = student_ladder(small)
    assert rungs and all(s.embedding_dim == 4 and s.top_mlp == [8] for s in rungs)
    assert len({(s.embedding_dim, s.cross_layers, tuple(s.top_mlp)) for s in rungs}) == len(rungs)


def test_rare_row_variants_most_aggressive_first() -> None:
    v = rare_row_variants(32)
    assert [(x.min_count, x.threshold, x.dim) for x in v] == [(1, 20, 8), (1, 5, 8), (1, 0, None)]
    assert [x.dim for x in rare_row_variants(2)] == [1, 1, None]
    assert [(x.min_count, x.dim) for x in rare_row_variants(1)] == [(1, None)]  # nothing narrower than 1
