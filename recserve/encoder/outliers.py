"""Outlier input channels kept float under INT8 dynamic quantization (the mixed-precision split of LLM.int8(),
Dettmers et al. 2022, with the channels fixed beforehand on calibration texts).

A transformer's hidden states have a few channels far larger than the rest: in all-MiniLM-L6-v2 the input of
each feed-forward block peaks near 28 in one channel where the next largest is near 8, and the GELU output near
24 against 5. INT8 dynamic quantization gives each MatMul input one scale per batch, set by its largest value,
so that one channel leaves every other a quarter of the levels. On Home Depot the INT8 teacher kept 0.910 of
the float teacher's top 10 (query cosine 0.992); with the channels above twice the 99th percentile of their
input's channel ranges split off (11 of the 16,128 input channels of its MatMuls) 0.941 (0.997).

For a MatMul ``y = x @ W`` whose input ``x`` has outlier channels ``c`` (the same for every MatMul that reads
``x``: the query, key and value projections share one):

    y = (x * mask) @ W'  +  x[..., c] @ W[c]

``mask`` zeroes the channels ``c`` (so the INT8 scale no longer covers them), ``W'`` is ``W`` with rows ``c``
zeroed, and the second product, ``k`` columns wide, stays float: the same result in float, a few hundredths of
the multiply-adds. Pure graph rewriting on an ``onnx.ModelProto``; :func:`channel_ranges` measures the ranges.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

PERCENTILE = 99
"""Channel ranges are compared with this percentile of their input's channel ranges."""


def outlier_channels(ranges: np.ndarray, ratio: float) -> np.ndarray:
    """The channels whose range is above ``ratio`` times the ``PERCENTILE``th percentile of ``ranges``, ascending."""
    return np.flatnonzero(ranges > ratio * np.percentile(ranges, PERCENTILE))


def weighted_inputs(graph) -> dict[str, list]:
    """Each tensor that feeds MatMuls with a constant weight (what INT8 quantizes), with those MatMuls."""
    constants = {i.name for i in graph.initializer}
    out: dict[str, list] = defaultdict(list)
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in constants:
            out[node.input[0]].append(node)
    return dict(out)


def channel_ranges(model, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """max |x| per channel (last axis) of every MatMul input :func:`weighted_inputs` finds, over the batches
    ``feeds`` (float, onnxruntime)."""
    import onnx

    from recserve.onnxrt import session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = list(weighted_inputs(probe.graph))
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names])
    sess = session(probe.SerializeToString())
    ranges: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, sess.run(names, feed)):
            r = np.abs(value).reshape(-1, value.shape[-1]).max(0)
            ranges[name] = np.maximum(ranges[name], r) if name in ranges else r
    return ranges


@dataclass
class Split:
    channels: int
    """Outlier channels split off, over all inputs."""
    keep_float: list[str]
    """Nodes the quantizer must leave float: the narrow products and the column gathers."""


def split_outliers(model, ranges: dict[str, np.ndarray], ratio: float) -> Split:
    """Rewrite ``model`` in place (see the module's docstring) for the inputs in ``ranges`` with outlier channels.
    The graph computes the same in float; its nodes stay in topological order."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for i in node.input:
            uses[i] += 1
    plan = {}
    for k, (name, matmuls) in enumerate(weighted_inputs(graph).items()):
        shared = any(uses[n.input[1]] > 1 for n in matmuls)  # rewriting a shared weight would change its other uses
        if name in ranges and not shared and len(c := outlier_channels(ranges[name], ratio)):
            plan[name] = (f"outliers_{k}", c, {n.output[0] for n in matmuls})  # an output names its node
    nodes, started, keep = [], set(), []
    for node in graph.node:
        name = node.input[0] if node.op_type == "MatMul" else None
        if name not in plan or node.output[0] not in plan[name][2]:
            nodes.append(node)
            continue
        p, c, _ = plan[name]
        if name not in started:  # before the first MatMul that reads the input: it exists by then
            started.add(name)
            width = ranges[name].shape[0]
            graph.initializer.extend([numpy_helper.from_array(np.isin(np.arange(width), c, invert=True)
                                                              .astype(np.float32), f"{p}_mask"),
                                      numpy_helper.from_array(c.astype(np.int64), f"{p}_channels")])
            nodes += [helper.make_node("Mul", [name, f"{p}_mask"], [f"{p}_rest"], name=f"{p}_mask"),
                      helper.make_node("Gather", [name, f"{p}_channels"], [f"{p}_cols"], name=f"{p}_cols", axis=-1)]
            keep.append(f"{p}_cols")
        w = numpy_helper.to_array(weights[node.input[1]])
        q = f"{p}_{node.input[1]}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[c]), f"{q}_rows"))
        rest = w.copy()
        rest[c] = 0
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(rest, node.input[1]))
        y = node.output[0]
        node.input[0], node.output[0] = f"{p}_rest", f"{q}_int8"
        nodes += [node, helper.make_node("MatMul", [f"{p}_cols", f"{q}_rows"], [f"{q}_float"], name=f"{q}_float"),
                  helper.make_node("Add", [f"{q}_int8", f"{q}_float"], [y], name=f"{q}_add")]
        keep.append(f"{q}_float")
    del graph.node[:]
    graph.node.extend(nodes)
    return Split(sum(len(c) for _, c, _ in plan.values()), keep)
