"""Lower-precision encoders: INT8 dynamic, INT8 static (QDQ) and FP16, with onnxruntime's tools.

- ``int8_dynamic``: the weights of every MatMul (attention projections and feed-forward layers: ~80% of the
  transformer's compute) and the token embedding table (the Gather: most of the bytes) stored as INT8 with
  one scale per output channel; each MatMul's input quantized at run time from its batch's own range, so no
  calibration data is needed. With ``outlier_ratio`` the few input channels whose calibration range is far
  above the rest stay float (:mod:`recserve.encoder.outliers`): they would otherwise set that range.
- ``int8_static``: the same weights, and each MatMul input quantized with a scale fixed beforehand from the
  ranges seen on calibration texts (the tuning queries and titles), as QuantizeLinear/DequantizeLinear pairs
  (QDQ, symmetric INT8 with zero point 0 as everywhere in recserve: the one file onnxruntime and TensorRT both
  take), which onnxruntime fuses into integer kernels. Only MatMuls with a constant weight: the two attention
  products (query x key, probabilities x value) multiply two activations whose ranges change with every text.
  The feed-forward down projections stay float too (:func:`after_gelu`): with them INT8 the embeddings of the
  packaged model kept a mean cosine of 0.86 with the float graph's, without them 0.98 (synthetic text).
- ``fp16``: every weight and activation in half precision, inputs and output kept int64/float32. For GPUs
  (TensorRT, Triton's onnxruntime-gpu): onnxruntime on a CPU runs most FP16 operators by casting back.

In the INT8 modes LayerNorm, Softmax, GELU and the pooling stay float32: they normalize over a
row whose range changes with every text, where one INT8 scale would cut off either the peaks or the
resolution, and they cost little. Each result records its agreement with the float graph it came from.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from recserve.encoder.artifact import INPUTS, MODEL_FILE
from recserve.encoder.outliers import Split, channel_ranges, split_outliers
from recserve.encoder.text import TextTokenizer

Mode = Literal["int8_dynamic", "int8_static", "fp16"]
MODES: tuple[Mode, ...] = ("int8_dynamic", "int8_static", "fp16")
OPS = ["MatMul", "Gather"]
"""What INT8 stores (see the module's docstring); everything else stays float32."""
CALIBRATION_BATCH = 32


@contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer logs advice (pre-processing, symbolic shapes) meant for other graphs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _Calibration:
    """onnxruntime's CalibrationDataReader over tokenized texts, a batch at a time."""

    def __init__(self, tokenizer: TextTokenizer, texts: list[str]):
        self.batches = iter([dict(zip(INPUTS, tokenizer.encode(texts[i:i + CALIBRATION_BATCH])))
                             for i in range(0, len(texts), CALIBRATION_BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)

    def rewind(self) -> None:  # part of the reader's protocol; one pass is all calibration takes
        pass


GELU_OPS = {"Erf", "Gelu", "FastGelu", "BiasGelu", "Tanh"}


def after_gelu(graph) -> list[str]:
    """The MatMuls whose input comes from a GELU (within four element-wise nodes, an exported GELU being
    ``x * 0.5 * (1 + erf(x / sqrt 2))``; never through another MatMul): each feed-forward block's down projection.
    Static INT8 keeps them float: GELU's outputs have rare large values (outlier features), and one symmetric
    scale fixed in advance that covers them leaves the common small values a handful of levels."""
    made_by = {out: node for node in graph.node for out in node.output}

    def from_gelu(name: str, depth: int = 4) -> bool:
        node = made_by.get(name)
        if node is None or depth == 0 or node.op_type in ("MatMul", "Gemm"):
            return False
        return node.op_type in GELU_OPS or any(from_gelu(i, depth - 1) for i in node.input)

    return [n.name for n in graph.node if n.op_type == "MatMul" and n.name and from_gelu(n.input[0])]


def outlier_ratio_problem(mode: Mode, outlier_ratio: float | None) -> str | None:
    """What is wrong with asking ``mode`` for ``outlier_ratio`` (None: nothing)."""
    if outlier_ratio is None:
        return None
    if mode != "int8_dynamic":
        return f"outlier_ratio is for mode int8_dynamic, not {mode}"
    if outlier_ratio <= 1:
        return f"outlier_ratio must be above 1 (a channel above the 99th percentile); got {outlier_ratio}"
    return None


def needs_calibration(mode: Mode, outlier_ratio: float | None = None) -> bool:
    """Whether quantizing in ``mode`` measures activation ranges on calibration texts."""
    return mode == "int8_static" or outlier_ratio is not None


@dataclass
class Quantized:
    model: bytes
    float_channels: int = 0
    """int8_dynamic with ``outlier_ratio``: the outlier input channels kept float."""


def quantize_graph(src: Path, mode: Mode, tokenizer: TextTokenizer, calibration: list[str] | None = None,
                   outlier_ratio: float | None = None) -> Quantized:
    """The graph ``src/model.onnx`` in ``mode`` (see the module's docstring); ``calibration`` texts for int8_static
    and for int8_dynamic's ``outlier_ratio``."""
    source = Path(src) / MODEL_FILE
    if problem := outlier_ratio_problem(mode, outlier_ratio):
        raise ValueError(problem)
    if needs_calibration(mode, outlier_ratio) and not calibration:
        raise ValueError(f"{mode}{' with outlier_ratio' if outlier_ratio else ''} needs calibration texts")
    import onnx

    if mode == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with _quiet():
            model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        return Quantized(model.SerializeToString())
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        target = Path(tmp) / MODEL_FILE
        if mode == "int8_dynamic":
            split = Split(0, [])
            if outlier_ratio is not None:
                model = onnx.load(str(source))
                feeds = list(_Calibration(tokenizer, calibration).batches)
                split = split_outliers(model, channel_ranges(model, feeds), outlier_ratio)
                source = Path(tmp) / "split.onnx"
                onnx.save(model, str(source))
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=OPS,
                             nodes_to_exclude=split.keep_float)
            return Quantized(target.read_bytes(), split.channels)
        keep_float = after_gelu(onnx.load(str(source), load_external_data=False).graph)
        quantize_static(source, target, _Calibration(tokenizer, calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=OPS, per_channel=True, activation_type=QuantType.QInt8,
                        nodes_to_exclude=keep_float,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": True,
                                       "WeightSymmetric": True})
        return Quantized(target.read_bytes())
