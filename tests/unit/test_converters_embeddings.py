"""Row-wise embedding quantization and INT4 packing (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from recserve.converters.embeddings import pack_int4, plan_table, quantize_rows, unpack_int4


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rows_error_within_half_a_step(bits: int) -> None:
    rng = np.random.default_rng(bits)
    table = (rng.normal(size=(200, 12)) * rng.uniform(0.01, 3.0, size=(200, 1))).astype(np.float32)
    q, scale = quantize_rows(table, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == np.int8 and q.shape == table.shape
    assert scale.dtype == np.float16 and scale.shape == (200, 1)
    assert np.abs(q).max() <= qmax
    # every row uses its full range
    assert (np.abs(q).max(axis=1) == qmax).all()
    s = scale.astype(np.float32)
    err = np.abs(q.astype(np.float32) * s - table)
    assert (err <= s / 2 + 1e-6).all(), float((err - s / 2).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rows_zero_rows_are_safe(bits: int) -> None:
    table = np.zeros((3, 5), np.float32)
    table[1] = [0.4, -1.0, 0.25, 0.0, 1.0]
    with np.errstate(all="raise"):  # no division by zero for the all-zero rows
        q, scale = quantize_rows(table, bits)
    assert np.isfinite(scale.astype(np.float32)).all() and (scale > 0).all()
    assert (q[0] == 0).all() and (q[2] == 0).all()
    np.testing.assert_array_equal(q[[0, 2]].astype(np.float32) * scale[[0, 2]].astype(np.float32), 0.0)
    assert q[1].tolist() == ([51, -127, 32, 0, 127] if bits == 8 else [3, -7, 2, 0, 7])


def test_quantize_rows_int4_range() -> None:
    table = np.random.default_rng(0).normal(size=(50, 9)).astype(np.float32) * 10
    q, _ = quantize_rows(table, 4)
    assert q.min() >= -7 and q.max() <= 7
    assert q.min() == -7 or q.max() == 7


@pytest.mark.parametrize("dim", [1, 2, 5, 8, 13])
def test_pack_unpack_int4_round_trip(dim: int) -> None:
    rng = np.random.default_rng(dim)
    q = rng.integers(-7, 8, size=(17, dim)).astype(np.int8)
    q[0] = -7
    q[1] = 7
    packed = pack_int4(q)
    assert packed.dtype == np.uint8
    assert packed.shape == (17, (dim + 1) // 2)
    back = unpack_int4(packed, dim)
    assert back.shape == q.shape
    np.testing.assert_array_equal(back, q)


def test_pack_int4_layout_low_then_high_nibbles() -> None:
    q = np.array([[1, -2, 3, -4]], np.int8)
    # columns 0, 1 in the low nibbles, columns 2, 3 in the high ones; values stored + 8
    assert pack_int4(q).tolist() == [[(1 + 8) | ((3 + 8) << 4), (-2 + 8) | ((-4 + 8) << 4)]]


@settings(max_examples=50, deadline=None)
@given(arrays(np.int8, st.tuples(st.integers(1, 6), st.integers(1, 11)), elements=st.integers(-7, 7)))
def test_pack_unpack_int4_property(q: np.ndarray) -> None:
    np.testing.assert_array_equal(unpack_int4(pack_int4(q), q.shape[1]), q)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 9)),
              elements=st.floats(-100, 100, width=32).filter(lambda v: v == 0 or abs(v) > 1e-2)))
def test_quantize_then_pack_round_trip_property(table: np.ndarray) -> None:
    q, scale = quantize_rows(table, 4)
    deq = unpack_int4(pack_int4(q), table.shape[1]).astype(np.float32) * scale.astype(np.float32)
    assert (np.abs(deq - table) <= scale.astype(np.float32) / 2 * 1.01 + 1e-6).all()


# ------------------------------------------------------------------- tiers of rows by frequency


def test_plan_table_tiers() -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 6)).astype(np.float32)
    counts = np.array([50, 0, 3, 30, 1, 7, 0, 100, 4, 20])
    plan = plan_table(table, counts, min_count=1, rare_threshold=5, rare_dim=2)
    shared, low = counts < 1, (counts >= 1) & (counts < 5)
    assert plan.shared == 2 and len(plan.low) == int(low.sum()) and plan.low.shape[1] == 2
    assert len(plan.full) == int((counts >= 5).sum()) + 1  # the frequent rows, then the shared row
    got = plan.lookup(np.arange(10))
    np.testing.assert_array_equal(got[counts >= 5], table[counts >= 5])  # frequent rows exactly
    np.testing.assert_allclose(got[shared], np.broadcast_to(table[shared].mean(0), (2, 6)), rtol=1e-6)
    # rare rows: their best rank-2 approximation
    u, s, vt = np.linalg.svd(table[low].astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(got[low], (u[:, :2] * s[:2]) @ vt[:2], rtol=1e-4, atol=1e-5)
    # with as many dimensions as rare rows the projection is exact
    exact = plan_table(table, counts, rare_threshold=5, rare_dim=5).lookup(np.arange(10))
    np.testing.assert_allclose(exact, table, rtol=1e-4, atol=1e-5)


def test_plan_table_without_counts_or_tiers_keeps_the_table() -> None:
    table = np.ones((4, 3), np.float32)
    for plan in (plan_table(table, None, min_count=3), plan_table(table, np.array([9, 9, 9, 9]), min_count=3),
                 plan_table(table, np.array([1, 1, 1, 1]), rare_threshold=5, rare_dim=3)):
        assert plan.remap is None and plan.full is table
    # every row rare: one is kept whole so the lookup has a table
    plan = plan_table(table * np.arange(4)[:, None], np.array([1, 2, 3, 4]), rare_threshold=9, rare_dim=1)
    assert len(plan.full) == 1 and len(plan.low) == 3
