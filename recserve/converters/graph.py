"""Small helpers over ONNX graphs: find linear layers and embedding tables, read and write weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


@dataclass
class LinearLayer:
    """A Gemm or MatMul whose second input is a 2-D float weight initializer."""

    node: onnx.NodeProto
    weight: str
    transposed: bool
    """Gemm with ``transB=1``: the stored weight is [out, in]."""

    def matrix(self, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
        """The weight as [in, out] (``y = x @ M``)."""
        w = numpy_helper.to_array(inits[self.weight])
        return w.T if self.transposed else w


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def linear_layers(model: onnx.ModelProto) -> list[LinearLayer]:
    inits = initializers(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
            continue
        t = inits.get(node.input[1])
        if t is None or t.data_type not in FLOAT_TYPES or len(t.dims) != 2:
            continue
        if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1) != 1):
            continue
        out.append(LinearLayer(node, node.input[1], node.op_type == "Gemm" and bool(_attr(node, "transB", 0))))
    return out


def embedding_gathers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Gather nodes reading rows of a 2-D float initializer: the embedding tables."""
    inits = initializers(model)
    return [
        n for n in model.graph.node
        if n.op_type == "Gather" and _attr(n, "axis", 0) == 0 and n.input[0] in inits
        and inits[n.input[0]].data_type in FLOAT_TYPES and len(inits[n.input[0]].dims) == 2
        and inits[n.input[0]].dims[1] > 1  # [rows, 1] is a table of per-row scales, not embeddings
    ]


def export_graph(graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export an onnx-graphsurgeon graph with the opsets and IR version of the model it came from."""
    import onnx_graphsurgeon as gs

    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    out.ir_version = like.ir_version
    out.producer_name = like.producer_name
    return out


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype), name))
            return
    raise KeyError(name)
