"""The distillation's learning-rate schedule (``recserve.encoder.distill.learning_rate_factor``): pure, no torch."""

from __future__ import annotations

import pytest

from recserve.encoder.distill import WARMUP, learning_rate_factor


def test_constant_is_the_peak_at_every_step() -> None:
    assert {learning_rate_factor("constant", i, 50) for i in range(50)} == {1.0}


@pytest.mark.parametrize("total", [1, 2, 17, 1000])
def test_linear_warms_up_to_the_peak_then_falls_to_nothing_at_the_last_step(total: int) -> None:
    f = [learning_rate_factor("linear", i, total) for i in range(total)]
    warmup = max(1, round(WARMUP * total))
    peak = f.index(max(f))
    assert max(f) == 1.0 and peak == warmup - 1, "the peak comes at the end of the warm-up"
    assert all(0 < a < b for a, b in zip(f[:peak], f[1:peak + 1])), "the warm-up rises from above 0"
    assert all(a > b for a, b in zip(f[peak:], f[peak + 1:])), "then it only falls"
    assert learning_rate_factor("linear", total, total) == 0.0, "nothing is left after the last step"
    assert all(x > 0 for x in f), "every step learns something"


def test_the_warm_up_is_a_small_share_of_a_long_run() -> None:
    total = 2500
    f = [learning_rate_factor("linear", i, total) for i in range(total)]
    assert f.index(1.0) == round(WARMUP * total) - 1 < total // 10
    assert f[total // 2] == pytest.approx(0.53, abs=0.01), "halfway down the decay at about half the run"
