"""Outlier input channels kept float under INT8 dynamic (``recserve.encoder.outliers``) on small graphs: the
split computes the same in float, leaves alone what it must, and makes INT8 closer to float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from recserve.encoder.outliers import channel_ranges, outlier_channels, split_outliers
from recserve.onnxrt import session

WIDTH = 256


def _graph(shared: bool = False) -> onnx.ModelProto:
    """x [b, t, 256] -> two MatMuls reading x (as the query and key projections do) -> relu -> a third MatMul;
    ``shared``: the third reuses the first one's weight (256 x 256)."""
    rng = np.random.default_rng(0)
    w = {n: rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) for n in ("wq", "wk", "wo")}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("Add", ["q", "k"], ["s"], name="s"),
             helper.make_node("Relu", ["s"], ["h"], name="h"),
             helper.make_node("MatMul", ["h", "wq" if shared else "wo"], ["y"], name="o")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, WIDTH])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _inputs(seed: int, outlier: float = 40.0) -> np.ndarray:
    """Activations of scale 1 with channel 3 at ``outlier`` (the shape of a transformer's hidden state)."""
    x = np.random.default_rng(seed).normal(size=(4, 5, WIDTH)).astype(np.float32)
    x[..., 3] *= outlier
    return x


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model.SerializeToString()).run(None, {"x": x})[0]


def test_only_channels_far_above_the_rest_are_outliers() -> None:
    ranges = np.ones(400)
    ranges[[7, 100]] = [9.0, 2.5]
    assert outlier_channels(ranges, 2.0).tolist() == [7, 100]
    assert outlier_channels(ranges, 3.0).tolist() == [7]
    assert outlier_channels(np.ones(400), 1.01).tolist() == []


def test_the_split_computes_the_same_in_float_and_names_what_must_stay_float() -> None:
    model = _graph()
    x = _inputs(1)
    want = _run(model, x)
    ranges = channel_ranges(model, [{"x": _inputs(2)}])
    assert set(ranges) == {"x", "h"} and int(np.argmax(ranges["x"])) == 3
    split = split_outliers(model, ranges, 2.0)
    onnx.checker.check_model(model)  # nodes still in topological order, every name defined
    assert split.channels == 1, "channel 3 of x, nothing in h"
    assert len(split.keep_float) == 3, "the column gather and the two narrow products"
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-4, atol=1e-3)
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == 5


def test_a_weight_another_matmul_shares_is_left_alone() -> None:
    model = _graph(shared=True)
    before = model.SerializeToString()
    split = split_outliers(model, channel_ranges(model, [{"x": _inputs(2)}]), 2.0)
    assert split.channels == 0 and model.SerializeToString() == before


@pytest.mark.parametrize("seed", [3, 4])
def test_int8_with_the_outliers_float_is_closer_to_the_float_graph(tmp_path, seed: int) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    x = _inputs(seed)
    float_model = _graph()
    want = _run(float_model, x)
    errors = {}
    for name, ratio in (("plain", None), ("split", 2.0)):
        model = _graph()
        keep: list[str] = []
        if ratio:
            keep = split_outliers(model, channel_ranges(model, [{"x": _inputs(9)}]), ratio).keep_float
        onnx.save(model, tmp_path / f"{name}.onnx")
        quantize_dynamic(tmp_path / f"{name}.onnx", tmp_path / f"{name}-int8.onnx", weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul"], nodes_to_exclude=keep)
        got = _run(onnx.load(tmp_path / f"{name}-int8.onnx"), x)
        errors[name] = float(np.abs(got - want).mean() / np.abs(want).mean())
    assert errors["split"] < errors["plain"] / 3, errors
