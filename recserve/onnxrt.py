"""One way to open an onnxruntime session on the CPU (compression, evaluation, the router's edge)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnxruntime as ort

from recserve.errors import ModelError

if TYPE_CHECKING:
    import onnx


def session(model: onnx.ModelProto | bytes, threads: int = 2) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads; ModelError when onnxruntime refuses the model."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise ModelError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from e
