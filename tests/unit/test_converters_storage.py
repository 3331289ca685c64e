"""Sparse storage of pruned weights: smaller files only where it pays, the same answers, dense for TensorRT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from recserve.converters.storage import densify, pack_sparse, storage_note
from recserve.onnxrt import session


def matmul_model(w: np.ndarray) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])],
                          initializer=[numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("zeros", [0.9, 0.75])
def test_mostly_zero_weights_are_stored_sparse_and_answer_the_same(zeros: float) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 32)).astype(np.float32)
    w[rng.random(w.shape) < zeros] = 0
    model = matmul_model(w)
    packed, details = pack_sparse(model)
    assert list(details["sparse_initializers"]) == ["W"] and details["bytes_saved"] > 0
    assert packed.ByteSize() < model.ByteSize() and model.graph.initializer, "the input model is left as it was"
    x = rng.normal(size=(5, 64)).astype(np.float32)
    np.testing.assert_allclose(session(packed).run(None, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-5)
    dense = densify(packed)
    assert not dense.graph.sparse_initializer
    np.testing.assert_array_equal(numpy_helper.to_array(dense.graph.initializer[0]), w)


def test_half_zero_weights_stay_dense() -> None:
    # 8 bytes of index per kept float32 value: at 50% zeros sparse storage would be larger
    w = np.tile(np.array([[0.0, 1.5]], np.float32), (64, 16))
    model = matmul_model(w)
    packed, details = pack_sparse(model)
    assert packed is model and details["sparse_initializers"] == {} and details["zero_weights"] == w.size // 2
    note = storage_note(details, pruned=True)
    assert "did not shrink" in note["note"]
    assert storage_note(details, pruned=False) == {"sparse_initializers": {}}
    assert densify(model) is model
