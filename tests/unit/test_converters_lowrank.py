"""Truncated-SVD factorization, and the graph rewrite on small hand-built ONNX graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from recserve.converters.lowrank import LowRankStage, svd_factor
from recserve.converters.stage import ModelState


def _low_rank(n_in: int, n_out: int, r: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_in, r)) @ rng.normal(size=(r, n_out))


def test_energy_one_reconstructs() -> None:
    m = _low_rank(20, 10, 2)
    pq = svd_factor(m, rank=None, energy=1.0, min_saving=0.0)
    assert pq is not None
    p, q = pq
    assert p.dtype == np.float32 and q.dtype == np.float32
    assert p.shape == (20, 2) and q.shape == (2, 10)
    np.testing.assert_allclose(p @ q, m, rtol=1e-4, atol=1e-4)


def test_fixed_rank_gives_rank_r_product_and_best_approximation() -> None:
    rng = np.random.default_rng(3)
    m = rng.normal(size=(30, 12))
    p, q = svd_factor(m, rank=3, energy=None, min_saving=0.0)
    assert p.shape == (30, 3) and q.shape == (3, 12)
    prod = p.astype(np.float64) @ q
    assert np.linalg.matrix_rank(prod, tol=1e-4) == 3
    # Eckart-Young: the error is the energy of the dropped singular values
    s = np.linalg.svd(m, compute_uv=False)
    assert np.linalg.norm(m - prod) ** 2 == pytest.approx(float(np.sum(s[3:] ** 2)), rel=1e-4)


def test_energy_picks_smallest_rank_reaching_it() -> None:
    # singular values 4, 2, 1 -> energies 16/21, 20/21, 1
    u, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(40, 3)))
    v, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(30, 3)))
    m = u @ np.diag([4.0, 2.0, 1.0]) @ v.T
    for energy, want in [(0.5, 1), (16 / 21 + 1e-6, 2), (0.95, 2), (0.99, 3)]:
        pq = svd_factor(m, rank=None, energy=energy, min_saving=0.0)
        assert pq is not None and pq[0].shape[1] == want, energy


def test_rank_larger_than_matrix_is_capped() -> None:
    m = _low_rank(50, 4, 4)
    pq = svd_factor(m, rank=100, energy=None, min_saving=0.0)
    # rank 4 on a 50x4 matrix never saves anything
    assert pq is None


def test_returns_none_when_saving_below_min_saving() -> None:
    m = np.random.default_rng(0).normal(size=(10, 10))
    # rank 4: 4 * 20 = 80 of 100 weights -> saves 20%
    assert svd_factor(m, rank=4, energy=None, min_saving=0.2) is not None
    assert svd_factor(m, rank=4, energy=None, min_saving=0.21) is None
    assert svd_factor(m, rank=5, energy=None, min_saving=0.0) is not None  # 100 of 100: saves exactly 0
    assert svd_factor(m, rank=6, energy=None, min_saving=0.0) is None  # 120 of 100: costs more


def test_spec_requires_exactly_one_of_rank_and_energy() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        LowRankStage(rank=2, energy=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        LowRankStage()


def _matmul_chain(names: tuple[str, str], seed: int = 0) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(6, 6)).astype(np.float32) for _ in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name=names[0]),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name=names[1])]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 6])],
        [numpy_helper.from_array(ws[0], "W1"), numpy_helper.from_array(ws[1], "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, ws


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _expected(x: np.ndarray, ws: list[np.ndarray], rank: int) -> np.ndarray:
    out = x
    for w in ws:
        p, q = svd_factor(w, rank=rank, energy=None, min_saving=0.0)
        out = out @ p @ q
    return out


def test_graph_rewrite_named_nodes() -> None:
    model, ws = _matmul_chain(("first", "second"))
    new, details = LowRankStage(rank=1, min_saving=0.0).apply(ModelState("ranker", model), None)
    assert new.module is None
    assert details["ranks"] == {"first": 1, "second": 1}
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.graph.initializer}
    assert inits["first_P"].shape == (6, 1) and inits["first_Q"].shape == (1, 6)
    assert "W1" not in inits and "W2" not in inits
    assert sum(n.op_type == "MatMul" for n in new.graph.graph.node) == 4
    x = np.random.default_rng(5).normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(new.graph, x), _expected(x, ws, 1), rtol=1e-4, atol=1e-4)


def test_graph_rewrite_unnamed_nodes() -> None:
    model, ws = _matmul_chain(("", ""))
    onnx.checker.check_model(model)
    new, details = LowRankStage(rank=1, min_saving=0.0).apply(ModelState("ranker", model), None)
    assert len(details["ranks"]) == 2
    x = np.random.default_rng(5).normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(new.graph, x), _expected(x, ws, 1), rtol=1e-4, atol=1e-4)
