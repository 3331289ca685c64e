"""Does the data fit the model? Names, dtypes, shapes and embedding ids, checked before any stage runs.

A model from elsewhere fed the wrong arrays fails deep inside onnxruntime (a Gather index out of
range, a dtype mismatch) or, worse, scores wrong ids without a word. Every problem found here is
one line naming the input, what the model wants and what the data holds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from recserve.converters.evaluate import predict
from recserve.converters.graph import embedding_gathers, initializers
from recserve.errors import DataError
from recserve.onnxrt import session


def _dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def check_feed(model: onnx.ModelProto, feed: dict[str, np.ndarray], what: str) -> None:
    """DataError when ``feed`` (the arrays of ``what``) cannot be given to ``model`` as they are."""
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in feed]
    if missing:
        raise DataError(f"{what}: no array for model input(s) {missing}; the model takes {names} and the data "
                        f"holds {sorted(feed)}: name each array after the input it feeds")
    extra = sorted(set(feed) - set(names))
    if extra:
        raise DataError(f"{what}: arrays {extra} feed no model input (the model takes {names}); remove or rename them")
    for i in inputs:
        a = feed[i.name]
        t = i.type.tensor_type
        want = _dtype(t.elem_type)
        if a.dtype != want:
            raise DataError(f"{what}: input '{i.name}' is {want} in the model but {a.dtype} in the data; "
                            f"write it as {want}")
        dims = list(t.shape.dim)
        if t.HasField("shape") and len(dims) != a.ndim:
            raise DataError(f"{what}: input '{i.name}' has {len(dims)} dimension(s) in the model but the data's "
                            f"array has {a.ndim} (shape {['N', *a.shape[1:]]})")
        for axis, d in enumerate(dims):
            if axis and d.HasField("dim_value") and d.dim_value != a.shape[axis]:
                raise DataError(f"{what}: input '{i.name}' needs size {d.dim_value} on axis {axis}; the data has "
                                f"{a.shape[axis]} (shape {['N', *a.shape[1:]]})")
    _check_ids(model, feed, what)


def _check_ids(model: onnx.ModelProto, feed: dict[str, np.ndarray], what: str) -> None:
    """Run the graph with every embedding lookup's ids exposed (and clamped so the run succeeds)."""
    gathers = embedding_gathers(model)
    if not gathers:
        return
    inits = initializers(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    lookups = {g.output[0] for g in gathers}
    rows: dict[str, tuple[str, int]] = {}
    nodes = []
    for node in probe.graph.node:
        if node.op_type == "Gather" and node.output[0] in lookups:
            raw = node.input[1]
            n = inits[node.input[0]].dims[0]
            lo, hi, clamped = f"{raw}__lo_{len(nodes)}", f"{raw}__hi_{len(nodes)}", f"{raw}__clamped_{len(nodes)}"
            dtype = onnx.TensorProto.INT32 if _is_int32(model, raw) else onnx.TensorProto.INT64
            probe.graph.initializer.extend([helper.make_tensor(lo, dtype, [], [-n]),
                                            helper.make_tensor(hi, dtype, [], [n - 1])])
            nodes.append(helper.make_node("Clip", [raw, lo, hi], [clamped]))
            node.input[1] = clamped
            rows.setdefault(raw, (node.input[0], n))
        nodes.append(node)
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    for raw in rows:
        probe.graph.output.append(helper.make_empty_tensor_value_info(raw))
    if not rows:
        return
    # the ids themselves: everything up to the lookups, nothing after them
    names = list(rows)
    sess = session(probe)
    outs = predict(sess, feed, names)
    for name, ids in zip(names, outs):
        table, n = rows[name]
        ids = np.asarray(ids)
        bad = (ids < -n) | (ids >= n)
        if bad.any():
            source = _source_input(model, name)
            raise DataError(
                f"{what}: {int(bad.sum()):,} id(s) of input '{source}' fall outside embedding table '{table}' "
                f"({n:,} rows; ids seen {int(ids.min()):,} to {int(ids.max()):,}); the ids must be the ones the "
                "model was trained with")


def _is_int32(model: onnx.ModelProto, tensor: str) -> bool:
    """Whether ``tensor`` is int32 (ids are int64 unless a graph input or value_info says otherwise)."""
    for v in list(model.graph.input) + list(model.graph.value_info):
        if v.name == tensor:
            return v.type.tensor_type.elem_type == onnx.TensorProto.INT32
    inferred = onnx.shape_inference.infer_shapes(model)
    for v in inferred.graph.value_info:
        if v.name == tensor:
            return v.type.tensor_type.elem_type == onnx.TensorProto.INT32
    return False


def _source_input(model: onnx.ModelProto, tensor: str) -> str:
    """The graph input a tensor is computed from (the first found), for messages."""
    inputs = {i.name for i in model.graph.input}
    producer = {o: n for n in model.graph.node for o in n.output}
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t in inputs:
            return t
        if t in seen or t not in producer:
            continue
        seen.add(t)
        stack.extend(producer[t].input)
    return tensor
