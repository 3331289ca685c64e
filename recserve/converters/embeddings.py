"""Embedding-table compression: row-wise INT8/INT4 quantization and pruning of rare rows.

Every Gather on a 2-D float initializer is an embedding table. Rows seen fewer than ``min_count``
times in the training data are folded into one shared row (their mean) through an int32 remap
table. Rows are then quantized symmetrically with one FP16 scale per row; the graph gathers the
quantized rows and their scales and dequantizes only what the batch touches (``Gather -> Cast ->
Mul``), so the table stays small in memory too. INT4 packs two values per byte (first half of
the row in the low nibbles, second half in the high ones) and unpacks with integer arithmetic that
onnxruntime and TensorRT both run at opset 17.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from pydantic import Field

from recserve.converters.evaluate import session
from recserve.converters.graph import embedding_gathers, export_graph, initializers
from recserve.converters.stage import ModelState, StageContext, StageSpec
from recserve.errors import StageError


def quantize_rows(table: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantization: (int values in [-2^(b-1)+1, 2^(b-1)-1], fp16 scales [V,1])."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(table).max(axis=1, keepdims=True).astype(np.float32) / qmax
    scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
    q = np.clip(np.round(table / scale.astype(np.float32)), -qmax, qmax).astype(np.int8)
    return q, scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """[V, d] int4 values -> [V, ceil(d/2)] uint8: column j low nibble, column j + d/2 high nibble."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    if u.shape[1] % 2:
        u = np.concatenate([u, np.full((u.shape[0], 1), 8, np.uint8)], axis=1)
    half = u.shape[1] // 2
    return (u[:, :half] | (u[:, half:] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of :func:`pack_int4` (reference for the graph's arithmetic)."""
    p = packed.astype(np.int32)
    high = p // 16
    return (np.concatenate([p - high * 16, high], axis=-1) - 8)[..., :dim]


def row_counts(state: ModelState, ctx: StageContext, gathers: list[onnx.NodeProto]) -> list[np.ndarray]:
    """How often each row of each table is read on the training data (graph run with the indices exposed)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(state.graph)
    for g in gathers:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(g.input[1]))
    if state.kind == "ranker":
        feed = ctx.data.ranking_train.inputs()
    else:
        r = ctx.data.retrieval
        feed = {"user_sparse": r.user_table[r.train_pairs[:, 0]], "item_sparse": r.item_table[r.train_pairs[:, 1]]}
    sess = session(probe, ctx.train.threads)
    names = [g.input[1] for g in gathers]
    counts = [None] * len(gathers)
    n = len(next(iter(feed.values())))
    inits = initializers(state.graph)
    for s in range(0, n, 16384):
        outs = sess.run(names, {k: v[s:s + 16384] for k, v in feed.items()})
        for i, (g, idx) in enumerate(zip(gathers, outs)):
            c = np.bincount(idx.ravel().astype(np.int64), minlength=inits[g.input[0]].dims[0])
            counts[i] = c if counts[i] is None else counts[i] + c
    return counts


class EmbeddingStage(StageSpec):
    """Row-wise INT8/INT4 embedding tables and frequency-based pruning of rare rows."""

    type: Literal["embeddings"] = "embeddings"
    bits: Literal[4, 8] | None = Field(8, description="row-wise quantization width; null keeps float rows")
    min_count: int = Field(0, ge=0, description="rows read fewer times than this in training share one row")

    def apply(self, state: ModelState, ctx: StageContext) -> tuple[ModelState, dict[str, Any]]:
        gathers = embedding_gathers(state.graph)
        if not gathers:
            raise StageError("embeddings: the graph has no embedding tables (Gather on a 2-D float initializer); "
                             "drop this stage, or run it before a stage that rewrites the tables")
        counts = row_counts(state, ctx, gathers) if self.min_count else [None] * len(gathers)
        inits = initializers(state.graph)
        graph = gs.import_onnx(state.graph)
        nodes = {n.outputs[0].name: n for n in graph.nodes}
        tables = {}
        for g, count in zip(gathers, counts):
            table = numpy_helper.to_array(inits[g.input[0]])
            tables[g.input[0]] = self._rewrite(graph, nodes[g.output[0]], table, count)
        out = export_graph(graph, state.graph)
        return state.with_graph(out), {"bits": self.bits, "min_count": self.min_count, "tables": tables}

    def _rewrite(self, graph: gs.Graph, node: gs.Node, table: np.ndarray, count: np.ndarray | None) -> dict:
        name, dtype = node.inputs[0].name, table.dtype
        rows, dim = table.shape
        before = table.nbytes
        idx = node.inputs[1]
        result = node.outputs[0]
        node.outputs.clear()
        new_nodes: list[gs.Node] = []

        def op(kind: str, inputs: list, suffix: str, out_dtype=None, **attrs) -> gs.Variable:
            v = gs.Variable(f"{name}_{suffix}", dtype=out_dtype)
            new_nodes.append(gs.Node(kind, name=f"{name}_{suffix}", inputs=inputs, outputs=[v], attrs=attrs))
            return v

        extra = 0
        if count is not None:
            keep = count >= self.min_count
            pruned = int((~keep).sum())
            if pruned:
                shared = table[~keep].mean(axis=0, keepdims=True)
                remap = np.where(keep, np.cumsum(keep) - 1, keep.sum()).astype(np.int32)
                table = np.concatenate([table[keep], shared]).astype(dtype)
                idx = op("Gather", [gs.Constant(f"{name}_remap", remap), idx], "remapped", np.int32, axis=0)
                extra = remap.nbytes
        else:
            pruned = 0
        if self.bits is None:
            vals = op("Gather", [gs.Constant(f"{name}_rows", table), idx], "rows", dtype, axis=0)
            after = table.nbytes + extra
        else:
            q, scale = quantize_rows(table.astype(np.float32), self.bits)
            stored = pack_int4(q) if self.bits == 4 else q
            g = op("Gather", [gs.Constant(f"{name}_q{self.bits}", stored), idx], "qrows", stored.dtype, axis=0)
            if self.bits == 4:
                g32 = op("Cast", [g], "packed_i32", np.int32, to=onnx.TensorProto.INT32)
                high = op("Div", [g32, gs.Constant(f"{name}_sixteen", np.array(16, np.int32))], "high", np.int32)
                low = op("Sub", [g32, op("Mul", [high, gs.Constant(f"{name}_sixteen_m", np.array(16, np.int32))],
                                         "high16", np.int32)], "low", np.int32)
                both = op("Concat", [low, high], "nibbles", np.int32, axis=-1)
                g = op("Sub", [both, gs.Constant(f"{name}_eight", np.array(8, np.int32))], "centered", np.int32)
            f = op("Cast", [g], "float", np.float32, to=onnx.TensorProto.FLOAT)
            if self.bits == 4 and stored.shape[1] * 2 != dim:
                f = op("Slice", [f, gs.Constant(f"{name}_s0", np.array([0], np.int64)),
                                 gs.Constant(f"{name}_s1", np.array([dim], np.int64)),
                                 gs.Constant(f"{name}_s2", np.array([-1], np.int64))], "trim", np.float32)
            s = op("Gather", [gs.Constant(f"{name}_scale", scale), idx], "scales", np.float16, axis=0)
            s32 = op("Cast", [s], "scales_f32", np.float32, to=onnx.TensorProto.FLOAT)
            vals = op("Mul", [f, s32], "dequant", np.float32)
            after = stored.nbytes + scale.nbytes + extra
        last = new_nodes[-1]
        if dtype != np.float32 and self.bits is not None:
            to = onnx.helper.np_dtype_to_tensor_dtype(dtype)
            last = gs.Node("Cast", name=f"{name}_out", inputs=[vals], outputs=[], attrs={"to": to})
            new_nodes.append(last)
        last.outputs = [result]
        graph.nodes.extend(new_nodes)
        return {"rows": rows, "rows_kept": rows - pruned, "dim": dim, "bytes_before": before, "bytes_after": after}
