"""The benchmarks' timing helpers (bench/timing.py)."""

from __future__ import annotations

import pytest

from bench.timing import paired_ratio, split


@pytest.mark.parametrize("n, parts, expect", [(64, 4, [16, 16, 16, 16]), (10, 4, [3, 3, 2, 2]), (1, 1, [1])])
def test_split_shares_out_everything(n: int, parts: int, expect: list[int]) -> None:
    assert split(n, parts) == expect


def test_paired_ratio_is_the_median_of_the_round_by_round_ratios() -> None:
    # round 2 was slow for both: pairing keeps that drift out of the ratio
    assert paired_ratio([30.0, 15.0, 33.0], [10.0, 5.0, 10.0]) == pytest.approx(3.0)
