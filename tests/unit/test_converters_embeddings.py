"""Row-wise embedding quantization and INT4 packing (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from recserve.converters.embeddings import pack_int4, quantize_rows, unpack_int4


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
