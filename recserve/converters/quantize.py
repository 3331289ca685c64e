"""Quantization with onnxruntime's tools: FP16, INT8 dynamic, and INT8 static QDQ.

Static INT8 writes the QDQ format with symmetric scales (zero point 0) for activations and
weights, per-channel weights, calibrated on training rows: the same file runs on onnxruntime (CPU)
and TensorRT (GPU). Embedding tables (Gather) are left to the ``embeddings`` stage. A sensitivity
analysis quantizes one layer at a time and ranks layers by the AUC lost; the most sensitive can be
kept in float.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16
from pydantic import Field

from recserve.converters.evaluate import evaluate, paired_loss
from recserve.converters.graph import export_graph, linear_layers
from recserve.converters.stage import ModelState, StageContext, StageSpec
from recserve.errors import StageError

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


class _Calibration(CalibrationDataReader):
    """Feeds batches of training (fit) inputs to the calibrator."""

    def __init__(self, ctx: StageContext, rows: int, batch: int = 256):
        if ctx.scoring.kind == "ranker":
            feed = ctx.fit.inputs()
            n = min(rows, len(ctx.fit))
            self.batches = [{k: v[s:min(s + batch, n)] for k, v in feed.items()} for s in range(0, n, batch)]
        else:
            r = ctx.data.retrieval
            self.batches = [{"user_sparse": r.user_table[:rows], "item_sparse": r.item_table[:rows]}]
        self._it = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


class QuantizeStage(StageSpec):
    """FP16, dynamic INT8 or static INT8 (QDQ) quantization of the dense layers."""

    type: Literal["quantize"] = "quantize"
    mode: Literal["fp16", "int8_dynamic", "int8_static"] = "int8_static"
    per_channel: bool = True
    calibration_rows: int = Field(2048, ge=1)
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm"])
    exclude_nodes: list[str] = Field(default_factory=list, description="node names kept in float")
    sensitivity: bool = Field(False, description="rank layers by the AUC lost when only that layer is quantized")
    exclude_most_sensitive: int = Field(0, ge=0, description="keep the N most sensitive layers in float")
    keep_output_float: bool = Field(True, description="keep the layers that produce the model's outputs in float "
                                    "(a quantized final layer leaves a few hundred distinct scores: ties, not a ranking)")

    def apply(self, state: ModelState, ctx: StageContext) -> tuple[ModelState, dict[str, Any]]:
        graph = named_nodes(state.graph)
        state = state.with_graph(graph) if graph is not state.graph else state
        names = {n.name for n in graph.graph.node}
        unknown = sorted(set(self.exclude_nodes) - names)
        if unknown:
            raise StageError(f"quantize: exclude_nodes names nodes not in the graph: {unknown}; "
                             f"the graph's linear layers are {[lay.node.name for lay in linear_layers(graph)]}")
        exclude = list(self.exclude_nodes)
        layers, tail = output_tail(graph) if self.keep_output_float else ([], [])
        exclude += [n for n in layers if n not in exclude]
        if self.mode == "fp16":
            block = exclude + [n for n in tail if n not in exclude]
            out = convert_float_to_float16(graph, keep_io_types=True, node_block_list=block or None)
            out = export_graph(gs.import_onnx(out), out)  # the converter leaves its input casts unsorted
            return state.with_graph(out), {"mode": "fp16", "excluded": block}
        details: dict[str, Any] = {"mode": self.mode}
        if self.sensitivity or self.exclude_most_sensitive:
            ranking = self.sensitivity_analysis(state, ctx, skip=exclude)
            details["sensitivity"] = ranking
            exclude += [r["node"] for r in ranking[: self.exclude_most_sensitive] if r["node"] not in exclude]
        details["excluded"] = exclude
        return state.with_graph(self._quantize(state, ctx, exclude=exclude)), details

    def _quantize(self, state: ModelState, ctx: StageContext, *, exclude: list[str],
                  only: list[str] | None = None) -> onnx.ModelProto:
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs every node at INFO
        with tempfile.TemporaryDirectory() as tmp:
            out, src = Path(tmp) / "q.onnx", Path(tmp) / "float.onnx"
            # a path, not the proto: the quantizer rewrites a proto it is given to external data in place
            onnx.save(state.graph, src)
            common = dict(op_types_to_quantize=self.op_types, per_channel=self.per_channel,
                          nodes_to_quantize=only, nodes_to_exclude=exclude or None)
            if self.mode == "int8_dynamic":
                quantize_dynamic(src, out, weight_type=QuantType.QInt8, **common)
            else:
                quantize_static(
                    src, out, _Calibration(ctx, self.calibration_rows),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=METHODS[self.calibration_method],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   # float biases: TensorRT takes INT8 QDQ only, not INT32 bias QDQ
                                   "QuantizeBias": False}, **common)
            return onnx.load(out)

    def sensitivity_analysis(self, state: ModelState, ctx: StageContext, skip: list[str] = ()) -> list[dict[str, Any]]:
        """Each linear layer quantized alone: AUC lost against the float graph on validation, most harmful first.

        Measured on the validation split (the test split stays for the report, so the choice does
        not overfit the number it is judged by). Layers in ``skip`` stay float and are not ranked.
        """
        base = evaluate(state.graph, ctx.scoring, ctx.validation, speed=False)
        rows = []
        for layer in linear_layers(state.graph):
            if layer.node.op_type not in self.op_types or layer.node.name in skip:
                continue
            q = self._quantize(state, ctx, exclude=[], only=[layer.node.name])
            ev = evaluate(q, ctx.scoring, ctx.validation, speed=False)
            loss, se = paired_loss(base, ev, ctx.validation)
            rows.append({"node": layer.node.name, "auc": ev.auc, "auc_loss": base.auc - ev.auc,
                         "relative_loss": loss, "relative_loss_se": se})
        return sorted(rows, key=lambda r: -r["auc_loss"])


def named_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when every node has a unique name, else a copy with names given (quantizers key on names)."""
    names = [n.name for n in model.graph.node]
    if all(names) and len(set(names)) == len(names):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return out


def output_tail(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(the linear layers whose results reach a graph output without passing another linear layer,
    the other nodes on those paths): the part of the graph that must stay float for scores to stay
    distinct."""
    linear = {lay.node.name for lay in linear_layers(model)}
    producer = {out: node for node in model.graph.node for out in node.output}
    layers, tail, seen, stack = [], [], set(), [o.name for o in model.graph.output]
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor not in producer:
            continue
        seen.add(tensor)
        node = producer[tensor]
        if node.name in linear:
            layers.append(node.name)
            continue
        tail.append(node.name)
        stack.extend(node.input)
    return list(dict.fromkeys(layers)), list(dict.fromkeys(tail))
