"""ONNX export of the reference models, checked against PyTorch on the same inputs."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from recserve.errors import ModelError

OPSET = 17

RANKER_INPUTS = ("sparse", "dense")
RANKER_OUTPUTS = ("score",)
TWO_TOWER_INPUTS = ("user_sparse", "item_sparse")
TWO_TOWER_OUTPUTS = ("user_embedding", "item_embedding")


class _RankerScore(nn.Module):
    """Serving view of a ranker: probabilities, not logits."""

    def __init__(self, ranker: nn.Module):
        super().__init__()
        self.ranker = ranker

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.ranker(sparse, dense))


def io_names(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (RANKER_INPUTS, RANKER_OUTPUTS) if kind == "ranker" else (TWO_TOWER_INPUTS, TWO_TOWER_OUTPUTS)


def export_onnx(module: nn.Module, kind: str, sample: dict[str, np.ndarray], *, check: bool = True) -> onnx.ModelProto:
    """Export ``module`` with a dynamic batch axis on every input and output.

    ``sample`` feeds the trace and, with ``check``, the comparison of onnxruntime against PyTorch.
    """
    inputs, outputs = io_names(kind)
    wrapped = _RankerScore(module) if kind == "ranker" else module
    wrapped.eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[name])) for name in inputs)
    axes = {name: {0: f"{name}_batch" if kind != "ranker" else "batch"} for name in inputs}
    if kind == "ranker":
        axes.update({name: {0: "batch"} for name in outputs})
    else:
        axes.update({"user_embedding": {0: "user_sparse_batch"}, "item_embedding": {0: "item_sparse_batch"}})
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: fast and deterministic for these plain MLP graphs.
        torch.onnx.export(
            wrapped, args, buf, input_names=list(inputs), output_names=list(outputs),
            dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )
    model = onnx.load_from_string(buf.getvalue())
    model.producer_name = "recserve"
    if check:
        check_against_torch(model, wrapped, sample, inputs)
    return model


def check_against_torch(model: onnx.ModelProto, module: nn.Module, sample: dict[str, np.ndarray], inputs) -> None:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: sample[k] for k in inputs})
    with torch.no_grad():
        want = module(*(torch.from_numpy(sample[k]) for k in inputs))
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        if not np.allclose(g, w.numpy(), rtol=1e-4, atol=1e-5):
            diff = float(np.abs(g - w.numpy()).max())
            raise ModelError(f"ONNX export does not match PyTorch (max abs diff {diff:.2e}); report this as a bug")
