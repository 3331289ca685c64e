"""Pruning: unstructured magnitude pruning and structured (whole-neuron) pruning.

Magnitude pruning zeroes the smallest weights of every linear layer, over all layers at once
(``scope: global``) or layer by layer. It keeps shapes, so it saves bytes only with sparse
kernels or compression on top; its use here is to make room for quantization and to measure how
much of the model is redundant. Structured pruning removes whole hidden neurons of MLPs by the L2
norm of their weights, so layers physically shrink. With a PyTorch model both are followed by a
short fine-tune (``torch.nn.utils.prune`` keeps the masks during it); a plain ONNX graph is
pruned in place without fine-tune.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import prune as torch_prune

from recserve.converters.graph import initializers, linear_layers, set_initializer
from recserve.converters.stage import ModelState, StageContext, StageSpec
from recserve.errors import StageError


def magnitude_masks(weights: list[np.ndarray], sparsity: float, scope: str) -> list[np.ndarray]:
    """Keep-masks removing the ``sparsity`` share of smallest-magnitude weights, globally or per layer."""
    if scope == "global":
        flat = np.concatenate([np.abs(w).ravel() for w in weights])
        k = int(len(flat) * sparsity)
        threshold = np.partition(flat, k - 1)[k - 1] if k > 0 else -np.inf
        return [np.abs(w) > threshold for w in weights]
    masks = []
    for w in weights:
        k = int(w.size * sparsity)
        t = np.partition(np.abs(w).ravel(), k - 1)[k - 1] if k > 0 else -np.inf
        masks.append(np.abs(w) > t)
    return masks


def neurons_to_keep(weight_out_in: np.ndarray, bias: np.ndarray | None, sparsity: float) -> np.ndarray:
    """Indices (sorted) of the hidden neurons with the largest L2 norm of incoming weights and bias."""
    norms = np.linalg.norm(weight_out_in, axis=1) ** 2
    if bias is not None:
        norms = norms + bias ** 2
    keep = max(1, int(round(len(norms) * (1.0 - sparsity))))
    return np.sort(np.argsort(-norms, kind="stable")[:keep])


def _shrink_mlp(seq: nn.Sequential, sparsity: float) -> list[int]:
    """Remove neurons between consecutive Linear layers of a Linear/ReLU chain; returns new hidden sizes."""
    linears = [i for i, m in enumerate(seq) if isinstance(m, nn.Linear)]
    for a, b in zip(linears, linears[1:]):
        first, second = seq[a], seq[b]
        keep = torch.from_numpy(neurons_to_keep(first.weight.detach().numpy(), first.bias.detach().numpy(), sparsity))
        new_first = nn.Linear(first.in_features, len(keep))
        new_second = nn.Linear(len(keep), second.out_features, bias=second.bias is not None)
        with torch.no_grad():
            new_first.weight.copy_(first.weight[keep])
            new_first.bias.copy_(first.bias[keep])
            new_second.weight.copy_(second.weight[:, keep])
            if second.bias is not None:
                new_second.bias.copy_(second.bias)
        seq[a], seq[b] = new_first, new_second
    return [seq[i].out_features for i in linears[:-1]]


def _mlps(module: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """The prunable Linear/ReLU chains of a recserve model (ranker bottom/top, tower MLPs)."""
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, nn.Sequential) and sum(isinstance(x, nn.Linear) for x in m) >= 2
            and all(isinstance(x, (nn.Linear, nn.ReLU)) for x in m) and any(isinstance(x, nn.ReLU) for x in m)
            and all(x.bias is not None for x in m if isinstance(x, nn.Linear))]


class PruneStage(StageSpec):
    """Remove the ``sparsity`` share of weights (magnitude) or of hidden neurons (structured)."""

    type: Literal["prune"] = "prune"
    method: Literal["magnitude", "structured"] = "magnitude"
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="share of weights / neurons removed")
    scope: Literal["global", "layer"] = "global"
    fine_tune_epochs: int = Field(1, ge=0, description="epochs of fine-tuning after pruning (PyTorch models only)")
    workers: int | None = Field(None, ge=1, description="fine-tune on Ray Train with this many workers (a local Ray, "
                                "or the cluster RAY_ADDRESS names); default: in this process")

    def apply(self, state: ModelState, ctx: StageContext) -> tuple[ModelState, dict[str, Any]]:
        if self.method == "structured":
            return self._structured(state, ctx)
        if state.module is None:
            return self._magnitude_graph(state)
        linears = [m for m in state.module.modules() if isinstance(m, nn.Linear)]
        params = [(m, "weight") for m in linears]
        if self.scope == "global":
            torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=self.sparsity)
        else:
            for m in linears:
                torch_prune.l1_unstructured(m, "weight", amount=self.sparsity)
        history = ctx.fine_tune(state, self.fine_tune_epochs, "prune fine-tune", self.workers)
        for m in linears:
            torch_prune.remove(m, "weight")
        zeros = sum(int((m.weight == 0).sum()) for m in linears)
        total = sum(m.weight.numel() for m in linears)
        new = state.with_module(state.module, ctx.data)
        return new, {"sparsity": zeros / total, "fine_tune": history}

    def _magnitude_graph(self, state: ModelState) -> tuple[ModelState, dict[str, Any]]:
        graph = state.graph.__class__()
        graph.CopyFrom(state.graph)
        inits = initializers(graph)
        layers = linear_layers(graph)
        if not layers:
            raise StageError("prune: the graph has no linear layers (Gemm/MatMul with weight initializers) to prune")
        weights = [np.asarray(layer.matrix(inits)) for layer in layers]
        masks = magnitude_masks(weights, self.sparsity, self.scope)
        zeros = 0
        for layer, w, m in zip(layers, weights, masks):
            pruned = w * m
            set_initializer(graph, layer.weight, pruned.T if layer.transposed else pruned)
            zeros += int((~m).sum())
        details = {"sparsity": zeros / sum(w.size for w in weights),
                   "fine_tune": "skipped: no PyTorch model behind this graph"}
        return state.with_graph(graph), details

    def _structured(self, state: ModelState, ctx: StageContext) -> tuple[ModelState, dict[str, Any]]:
        if state.module is None:
            raise StageError("prune: method 'structured' needs the PyTorch model (a `recserve train` output, before any "
                             "graph-only stage such as quantize); use method 'magnitude' on a plain ONNX graph")
        mlps = _mlps(state.module)
        before = sum(p.numel() for p in state.module.parameters())
        sizes = {name or "mlp": _shrink_mlp(seq, self.sparsity) for name, seq in mlps}
        config = getattr(state.module, "config", None)
        if config is not None and hasattr(config, "top_mlp"):
            config.top_mlp = sizes.get("top", config.top_mlp)
            config.bottom_mlp = sizes.get("bottom", config.bottom_mlp)
        history = ctx.fine_tune(state, self.fine_tune_epochs, "prune fine-tune", self.workers)
        after = sum(p.numel() for p in state.module.parameters())
        return state.with_module(state.module, ctx.data), {
            "hidden_sizes": sizes, "parameters_removed": before - after, "fine_tune": history}
