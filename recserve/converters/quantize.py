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
from dataclasses import replace
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

from recserve.converters.evaluate import quality
from recserve.converters.graph import export_graph, linear_layers
from recserve.converters.stage import ModelState, StageContext, StageSpec
from recserve.data.schema import Dataset
from recserve.errors import StageError

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


class _Calibration(CalibrationDataReader):
    """Feeds batches of training inputs to the calibrator."""

    def __init__(self, kind: str, data: Dataset, rows: int, batch: int = 256):
        if kind == "ranker":
            t = data.ranking_train
            n = min(rows, len(t))
            self.batches = [{"sparse": t.sparse[s:min(s + batch, n)], "dense": t.dense[s:min(s + batch, n)]}
                            for s in range(0, n, batch)]
        else:
            r = data.retrieval
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

    def apply(self, state: ModelState, ctx: StageContext) -> tuple[ModelState, dict[str, Any]]:
        names = {n.name for n in state.graph.graph.node}
        unknown = sorted(set(self.exclude_nodes) - names)
        if unknown:
            raise StageError(f"quantize: exclude_nodes names nodes not in the graph: {unknown}; "
                             f"the graph's linear layers are {[lay.node.name for lay in linear_layers(state.graph)]}")
        if self.mode == "fp16":
            graph = convert_float_to_float16(state.graph, keep_io_types=True, node_block_list=self.exclude_nodes or None)
            graph = export_graph(gs.import_onnx(graph), graph)  # the converter leaves its input casts unsorted
            return state.with_graph(graph), {"mode": "fp16", "excluded": self.exclude_nodes}
        details: dict[str, Any] = {"mode": self.mode}
        exclude = list(self.exclude_nodes)
        if self.sensitivity or self.exclude_most_sensitive:
            ranking = self.sensitivity_analysis(state, ctx)
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
                    src, out, _Calibration(state.kind, ctx.data, self.calibration_rows),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=METHODS[self.calibration_method],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   # float biases: TensorRT takes INT8 QDQ only, not INT32 bias QDQ
                                   "QuantizeBias": False}, **common)
            return onnx.load(out)

    def sensitivity_analysis(self, state: ModelState, ctx: StageContext) -> list[dict[str, Any]]:
        """Each linear layer quantized alone: AUC lost against the float graph, most harmful first.

        Measured on training rows (the held-out rows stay for the report, so the choice does not
        overfit the number it is judged by).
        """
        data = ctx.data
        if state.kind == "ranker":
            train = data.ranking_train
            data = replace(data, ranking_test=train.take(np.arange(max(0, len(train) - 20000), len(train))))
        base = quality(state.graph, state.kind, data)["auc"]
        rows = []
        for layer in linear_layers(state.graph):
            if layer.node.op_type not in self.op_types:
                continue
            q = self._quantize(state, ctx, exclude=[], only=[layer.node.name])
            auc = quality(q, state.kind, data)["auc"]
            rows.append({"node": layer.node.name, "auc": auc, "auc_loss": base - auc})
        return sorted(rows, key=lambda r: -r["auc_loss"])
