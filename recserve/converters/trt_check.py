"""TensorRT readiness, checked on CPU: what would fail before anyone reaches a GPU.

Checks operators against the ONNX operators TensorRT 10 parses, INT64 initializers that do not
fit INT32 (TensorRT computes indices in INT32), non-symmetric or unsigned QDQ (TensorRT takes
symmetric signed INT8 only), integer tensors TensorRT does not compute with, and shapes an
optimization profile over the batch axis cannot cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

# ONNX operators the TensorRT 10 ONNX parser supports (onnx-tensorrt docs/operators.md), the subset
# recommenders use plus the common rest. An operator missing here is reported as an error.
TRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat ConstantOfShape Constant Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid HardSwish Identity If InstanceNormalization
IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM MatMul Max MaxPool Mean Min
Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign
Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())

# Element types TensorRT tensors can have outside of QDQ (UINT8 only at the network's inputs/outputs).
TRT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT32,
             onnx.TensorProto.INT64, onnx.TensorProto.BOOL, onnx.TensorProto.INT8}


@dataclass(frozen=True)
class Finding:
    severity: str
    """``error`` (the build will fail) or ``warning`` (it builds, maybe not as intended)."""
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.node}: {self.message}"


def check(model: onnx.ModelProto, max_batch_size: int = 256) -> list[Finding]:
    found: list[Finding] = []
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        where = node.name or node.op_type
        if node.domain not in ("", "ai.onnx"):
            found.append(Finding("error", where, f"custom-domain operator {node.domain}::{node.op_type} needs a plugin"))
        elif node.op_type not in TRT_OPS:
            found.append(Finding("error", where, f"operator {node.op_type} is not supported by the TensorRT ONNX parser"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found += _check_qdq(node, inits)
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.INT64:
            a = numpy_helper.to_array(t)
            if a.size and (a.max() > np.iinfo(np.int32).max or a.min() < np.iinfo(np.int32).min):
                found.append(Finding("error", t.name, "INT64 initializer with values outside INT32 (TensorRT casts to INT32)"))
            elif a.size > 1:
                found.append(Finding("warning", t.name, "INT64 initializer: TensorRT casts it to INT32"))
        elif t.data_type not in TRT_TYPES:
            name = onnx.TensorProto.DataType.Name(t.data_type)
            found.append(Finding("error", t.name, f"{name} weights are not a TensorRT tensor type (e.g. INT4 tables packed "
                                 "in UINT8: use embeddings bits 8 for TensorRT targets)"))
    for v in model.graph.input:
        if v.name in inits:
            continue
        dims = v.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims[1:]):
            found.append(Finding("error", v.name, "dynamic non-batch axis: the optimization profile covers only the batch axis"))
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value < max_batch_size:
            found.append(Finding("error", v.name, f"fixed batch axis {dims[0].dim_value} < max_batch_size {max_batch_size}"))
    return found


def _check_qdq(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[Finding]:
    out = []
    if len(node.input) > 2 and node.input[2] in inits:
        zp = inits[node.input[2]]
        if zp.data_type != onnx.TensorProto.INT8:
            name = onnx.TensorProto.DataType.Name(zp.data_type)
            out.append(Finding("error", node.name, f"{name} zero point: TensorRT takes signed INT8 QDQ only"))
        if np.any(numpy_helper.to_array(zp) != 0):
            out.append(Finding("error", node.name, "non-zero zero point: TensorRT needs symmetric quantization"))
    return out
