"""Low-rank factorization: replace a linear layer ``x @ M`` by ``(x @ P) @ Q`` from a truncated SVD.

The rank is fixed (``rank``) or the smallest keeping ``energy`` of the squared singular values; a
layer is factorized only when that saves at least ``min_saving`` of its weights.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs
import torch
from pydantic import Field, model_validator
from torch import nn

from recserve.converters.graph import export_graph, initializers, linear_layers
from recserve.converters.stage import ModelState, StageContext, StageSpec
from recserve.errors import StageError


def svd_factor(m: np.ndarray, *, rank: int | None, energy: float | None,
               min_saving: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Factor ``m`` [in, out] into ``P`` [in, r] and ``Q`` [r, out], or None when it would not pay."""
    u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    if rank is None:
        cumulative = np.cumsum(s ** 2) / max(float(np.sum(s ** 2)), 1e-30)
        rank = int(np.searchsorted(cumulative, energy) + 1)
    r = min(rank, len(s))
    n_in, n_out = m.shape
    if r * (n_in + n_out) > (1.0 - min_saving) * n_in * n_out:
        return None
    root = np.sqrt(s[:r])
    return (u[:, :r] * root).astype(np.float32), (root[:, None] * vt[:r]).astype(np.float32)


class LowRankStage(StageSpec):
    """Factorize linear layers by truncated SVD."""

    type: Literal["low_rank"] = "low_rank"
    rank: int | None = Field(None, ge=1, description="inner size of every factorized layer")
    energy: float | None = Field(None, gt=0.0, le=1.0, description="share of squared singular values to keep")
    min_saving: float = Field(0.2, ge=0.0, lt=1.0, description="factorize only layers where this share of weights is saved")
    fine_tune_epochs: int = Field(1, ge=0, description="epochs of fine-tuning after factorizing (PyTorch models only)")
    workers: int | None = Field(None, ge=1, description="fine-tune on Ray Train with this many workers (a local Ray, "
                                "or the cluster RAY_ADDRESS names); default: in this process")

    @model_validator(mode="after")
    def _one_of(self) -> LowRankStage:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("low_rank needs exactly one of 'rank' (e.g. 32) or 'energy' (e.g. 0.95)")
        return self

    def _factor(self, m: np.ndarray):
        return svd_factor(m, rank=self.rank, energy=self.energy, min_saving=self.min_saving)

    def apply(self, state: ModelState, ctx: StageContext) -> tuple[ModelState, dict[str, Any]]:
        if state.module is None:
            return self._graph(state)
        factored = {}
        for name, parent in list(state.module.named_modules()):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                pq = self._factor(child.weight.detach().numpy().T)
                if pq is None:
                    continue
                p, q = pq
                first = nn.Linear(child.in_features, p.shape[1], bias=False)
                second = nn.Linear(p.shape[1], child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    first.weight.copy_(torch.from_numpy(p.T))
                    second.weight.copy_(torch.from_numpy(q.T))
                    if child.bias is not None:
                        second.bias.copy_(child.bias)
                setattr(parent, child_name, nn.Sequential(first, second))
                factored[f"{name}.{child_name}".lstrip(".")] = p.shape[1]
        history = ctx.fine_tune(state, self.fine_tune_epochs, "low-rank fine-tune", self.workers)
        return state.with_module(state.module, ctx.data), {"ranks": factored, "fine_tune": history}

    def _graph(self, state: ModelState) -> tuple[ModelState, dict[str, Any]]:
        inits = initializers(state.graph)
        plans = []
        for layer in linear_layers(state.graph):
            pq = self._factor(layer.matrix(inits))
            if pq is not None:
                plans.append((layer.node.name or layer.node.output[0], layer.node.output[0], pq))
        if not plans:
            return state, {"ranks": {}, "note": "no layer qualified for factorization"}
        graph = gs.import_onnx(state.graph)
        by_output = {n.outputs[0].name: n for n in graph.nodes}
        ranks = {}
        for name, output, (p, q) in plans:
            node = by_output[output]
            x = node.inputs[0]
            mid = gs.Variable(f"{output}_lowrank", dtype=np.float32)
            first = gs.Node("MatMul", name=f"{name}_lowrank_p", inputs=[x, gs.Constant(f"{name}_P", p)], outputs=[mid])
            node.inputs[0] = mid
            node.inputs[1] = gs.Constant(f"{name}_Q", q)
            if node.op == "Gemm":
                node.attrs["transB"] = 0
            graph.nodes.append(first)
            ranks[name] = p.shape[1]
        out = export_graph(graph, state.graph)
        if not ranks:
            raise StageError("low_rank: no layer could be rewritten")
        return state.with_graph(out), {"ranks": ranks, "fine_tune": "skipped: no PyTorch model behind this graph"}
