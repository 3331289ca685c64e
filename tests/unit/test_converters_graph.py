"""graph.linear_layers / embedding_gathers / set_initializer on a small hand-built ONNX model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from recserve.converters.graph import embedding_gathers, initializers, linear_layers, set_initializer

RNG = np.random.default_rng(0)
W_GEMM_T = RNG.normal(size=(5, 4)).astype(np.float32)  # [out, in] for transB=1
W_GEMM = RNG.normal(size=(5, 3)).astype(np.float32)  # [in, out]
W_MATMUL = RNG.normal(size=(3, 2)).astype(np.float32)
W_ALPHA = RNG.normal(size=(2, 2)).astype(np.float32)
W_TRANS_A = RNG.normal(size=(2, 2)).astype(np.float32)
W_INT = np.ones((2, 2), np.int64)
W_1D = np.ones((2,), np.float32)
W_FP16 = RNG.normal(size=(2, 3)).astype(np.float16)
TABLE = RNG.normal(size=(10, 4)).astype(np.float32)
TABLE_FP16 = RNG.normal(size=(7, 4)).astype(np.float16)
TABLE_INT = np.arange(10, dtype=np.int64).reshape(5, 2)


def build() -> onnx.ModelProto:
    n = helper.make_node
    nodes = [
        n("Gemm", ["x", "w_gemm_t", "b"], ["h1"], name="gemm_t", transB=1),
        n("Gemm", ["h1", "w_gemm"], ["h2"], name="gemm"),
        n("MatMul", ["h2", "w_matmul"], ["h3"], name="matmul"),
        n("Gemm", ["h3", "w_alpha"], ["h4"], name="gemm_alpha", alpha=0.5),
        n("Gemm", ["h4", "w_trans_a"], ["h5"], name="gemm_trans_a", transA=1),
        n("MatMul", ["h5", "h5"], ["h6"], name="matmul_dynamic"),  # no initializer weight
        n("Cast", ["h6"], ["h6i"], name="cast", to=TensorProto.INT64),
        n("MatMul", ["h6i", "w_int"], ["h7"], name="matmul_int"),
        n("Mul", ["h6", "w_1d"], ["h8"], name="mul"),
        n("Cast", ["h8"], ["h8h"], name="cast16", to=TensorProto.FLOAT16),
        n("MatMul", ["h8h", "w_fp16"], ["h9"], name="matmul_fp16"),
        n("Gather", ["table", "ids"], ["e1"], name="gather"),
        n("Gather", ["table_fp16", "ids"], ["e2"], name="gather_fp16", axis=0),
        n("Gather", ["table", "cols"], ["e3"], name="gather_axis1", axis=1),
        n("Gather", ["table_int", "ids"], ["e4"], name="gather_int"),
        n("Gather", ["w_1d", "ids"], ["e5"], name="gather_1d"),
        n("Gather", ["h1", "ids"], ["e6"], name="gather_dynamic"),
    ]
    inits = [numpy_helper.from_array(a, name) for name, a in [
        ("w_gemm_t", W_GEMM_T), ("b", np.zeros(5, np.float32)), ("w_gemm", W_GEMM), ("w_matmul", W_MATMUL),
        ("w_alpha", W_ALPHA), ("w_trans_a", W_TRANS_A), ("w_int", W_INT), ("w_1d", W_1D), ("w_fp16", W_FP16),
        ("table", TABLE), ("table_fp16", TABLE_FP16), ("table_int", TABLE_INT)]]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", f, ["B", 4]), helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"]),
         helper.make_tensor_value_info("cols", TensorProto.INT64, [2])],
        [helper.make_empty_tensor_value_info(o) for o in ["h7", "h9", "e1", "e2", "e3", "e4", "e5", "e6"]],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_linear_layers_finds_gemm_and_matmul_with_2d_float_weights() -> None:
    layers = linear_layers(build())
    assert [(lay.node.name, lay.weight, lay.transposed) for lay in layers] == [
        ("gemm_t", "w_gemm_t", True),
        ("gemm", "w_gemm", False),
        ("matmul", "w_matmul", False),
        ("matmul_fp16", "w_fp16", False),
    ]


def test_linear_layer_matrix_is_in_by_out() -> None:
    model = build()
    inits = initializers(model)
    by_name = {lay.node.name: lay for lay in linear_layers(model)}
    np.testing.assert_array_equal(by_name["gemm_t"].matrix(inits), W_GEMM_T.T)
    assert by_name["gemm_t"].matrix(inits).shape == (4, 5)
    np.testing.assert_array_equal(by_name["gemm"].matrix(inits), W_GEMM)
    np.testing.assert_array_equal(by_name["matmul"].matrix(inits), W_MATMUL)


def test_gemm_with_explicit_default_alpha_is_linear() -> None:
    model = build()
    gemm = next(n for n in model.graph.node if n.name == "gemm")
    gemm.attribute.extend([helper.make_attribute("alpha", 1.0), helper.make_attribute("transB", 0)])
    assert "gemm" in [lay.node.name for lay in linear_layers(model)]
    alpha = next(n for n in model.graph.node if n.name == "gemm_alpha")
    del alpha.attribute[:]
    assert "gemm_alpha" in [lay.node.name for lay in linear_layers(model)]


def test_embedding_gathers_only_2d_float_tables_on_axis_0() -> None:
    assert [n.name for n in embedding_gathers(build())] == ["gather", "gather_fp16"]


def test_set_initializer_keeps_name_and_dtype() -> None:
    model = build()
    set_initializer(model, "w_fp16", np.zeros((2, 3), np.float64))
    t = initializers(model)["w_fp16"]
    assert t.data_type == TensorProto.FLOAT16
    assert not numpy_helper.to_array(t).any()
    assert len(model.graph.initializer) == 12
    with pytest.raises(KeyError):
        set_initializer(model, "missing", np.zeros(1))
