"""Embedding-table compression: row-wise INT8/INT4 quantization and pruning of rare rows.

Every Gather on a 2-D float initializer is an embedding table. Rows seen fewer than ``min_count``
times in the training data are folded into one shared row (their mean), and rows seen fewer than
``rare_threshold`` times keep only ``rare_dim`` coordinates in a basis fitted to them, projected back
to the full width by one small matrix (mixed-dimension embeddings, Ginart et al. 2021: rare ids
carry less information, so they get fewer dimensions); an int16/int32 remap table sends each id to
its stored row. Rows are then quantized symmetrically with one FP16 scale per row; the graph gathers the
quantized rows and their scales and dequantizes only what the batch touches (``Gather -> Cast ->
Mul``), so the table stays small in memory too. INT4 packs two values per byte (first half of
the row in the low nibbles, second half in the high ones) and unpacks with integer arithmetic that
onnxruntime and TensorRT both run at opset 17.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from recserve.rowwise import quantize_rows


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
    """How often each row of each table is read on the fit rows (graph run with the indices exposed)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(state.graph)
    for g in gathers:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(g.input[1]))
    if state.kind == "ranker":
        feed = ctx.fit.inputs()
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
            rows = inits[g.input[0]].dims[0]
            idx = idx.ravel().astype(np.int64)
            c = np.bincount(np.where(idx < 0, idx + rows, idx), minlength=rows)
            counts[i] = c if counts[i] is None else counts[i] + c
    return counts


@dataclass
class TablePlan:
    """How one table is stored: tiers of rows by how often training reads them.

    ``remap`` (None: rows stay where they are) sends an original row to its stored row: rows
    ``[0, len(full))`` of ``full`` (every dimension; the shared row of the rarest ids last), then
    rows ``[len(full), len(full) + len(low))`` of ``low``, which holds ``rare_dim`` coordinates per
    row, mapped back to the full width by ``projection`` (mixed-dimension embeddings).
    """

    full: np.ndarray
    low: np.ndarray | None = None
    projection: np.ndarray | None = None
    remap: np.ndarray | None = None
    shared: int = 0
    """Original rows folded into one shared row."""

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Float reference of what the graph computes for original row ids (before quantization)."""
        r = self.remap[rows] if self.remap is not None else rows
        n = len(self.full)
        out = self.full[np.minimum(r, n - 1)]
        if self.low is not None:
            low = self.low[np.clip(r - n, 0, len(self.low) - 1)] @ self.projection
            out = np.where((r >= n)[..., None], low, out)
        return out


def plan_table(table: np.ndarray, counts: np.ndarray | None, *, min_count: int = 0, rare_threshold: int = 0,
               rare_dim: int | None = None) -> TablePlan:
    """Rows read fewer than ``min_count`` times share one row (their mean); rows read fewer than
    ``rare_threshold`` times (and not shared) keep ``rare_dim`` coordinates of a basis fitted to them
    (truncated SVD); the rest keep every dimension."""
    rows, dim = table.shape
    if counts is None or (min_count <= 0 and (rare_threshold <= 0 or not rare_dim)):
        return TablePlan(table)
    shared = counts < min_count
    low = (counts < rare_threshold) & ~shared if rare_dim and rare_dim < dim else np.zeros(rows, bool)
    full = ~shared & ~low
    if not shared.any() and not low.any():
        return TablePlan(table)
    n_full = int(full.sum()) + int(shared.any())
    if n_full == 0:  # everything is low-dimensional: keep one full row so the graph's Gather has a table
        full[np.argmax(counts)] = True
        low[np.argmax(counts)] = False
        n_full = 1 + int(shared.any())
    remap = np.zeros(rows, np.int64)
    remap[full] = np.arange(int(full.sum()))
    parts = [table[full]]
    if shared.any():
        remap[shared] = int(full.sum())
        parts.append(table[shared].mean(axis=0, keepdims=True))
    plan = TablePlan(np.concatenate(parts).astype(table.dtype), remap=remap, shared=int(shared.sum()))
    if low.any():
        u, s, vt = np.linalg.svd(table[low].astype(np.float64), full_matrices=False)
        k = min(rare_dim, len(s))
        plan.low = (u[:, :k] * s[:k]).astype(np.float32)
        plan.projection = vt[:k].astype(np.float32)
        remap[low] = n_full + np.arange(int(low.sum()))
    return plan


Bits = Literal[4, 8] | None


class EmbeddingStage(StageSpec):
    """Row-wise INT8/INT4 embedding tables, pruning of rare rows and mixed-dimension rare rows."""

    type: Literal["embeddings"] = "embeddings"
    bits: Bits = Field(8, description="row-wise quantization width; null keeps float rows")
    table_bits: dict[str, Bits] = Field(default_factory=dict, description="per-table width, by initializer name")
    min_count: int = Field(0, ge=0, description="rows read fewer times than this in training share one row")
    rare_threshold: int = Field(0, ge=0, description="rows read fewer times than this keep only rare_dim dimensions")
    rare_dim: int | None = Field(None, ge=1, description="dimensions kept for rare rows (mixed-dimension embeddings)")

    def apply(self, state: ModelState, ctx: StageContext) -> tuple[ModelState, dict[str, Any]]:
        gathers = embedding_gathers(state.graph)
        if not gathers:
            raise StageError("embeddings: the graph has no embedding tables (Gather on a 2-D float initializer); "
                             "drop this stage, or run it before a stage that rewrites the tables")
        unknown = sorted(set(self.table_bits) - {g.input[0] for g in gathers})
        if unknown:
            raise StageError(f"embeddings: table_bits names tables not in the graph: {unknown}; "
                             f"its tables are {[g.input[0] for g in gathers]}")
        by_frequency = self.min_count or (self.rare_threshold and self.rare_dim)
        counts = row_counts(state, ctx, gathers) if by_frequency else [None] * len(gathers)
        inits = initializers(state.graph)
        graph = gs.import_onnx(state.graph)
        nodes = {n.outputs[0].name: n for n in graph.nodes}
        tables = {}
        for g, count in zip(gathers, counts):
            table = numpy_helper.to_array(inits[g.input[0]])
            plan = plan_table(table, count, min_count=self.min_count, rare_threshold=self.rare_threshold,
                              rare_dim=self.rare_dim)
            bits = self.table_bits.get(g.input[0], self.bits)
            tables[g.input[0]] = _rewrite(graph, nodes[g.output[0]], plan, bits, table)
        out = export_graph(graph, state.graph)
        return state.with_graph(out), {"bits": self.bits, "table_bits": self.table_bits, "min_count": self.min_count,
                                       "rare_threshold": self.rare_threshold, "rare_dim": self.rare_dim,
                                       "tables": tables}


class _Builder:
    """Appends nodes named after one table."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[gs.Node] = []

    def op(self, kind: str, inputs: list, suffix: str, out_dtype=None, **attrs) -> gs.Variable:
        v = gs.Variable(f"{self.name}_{suffix}", dtype=out_dtype)
        self.nodes.append(gs.Node(kind, name=f"{self.name}_{suffix}", inputs=inputs, outputs=[v], attrs=attrs))
        return v

    def const(self, suffix: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{self.name}_{suffix}", value)

    def rows(self, table: np.ndarray, idx, bits: Bits, tag: str) -> tuple[gs.Variable, int]:
        """Gather rows of ``table`` (quantized row-wise to ``bits``) as float32; returns (tensor, stored bytes)."""
        if bits is None:
            return self.op("Gather", [self.const(f"{tag}table", table.astype(np.float32)), idx], f"{tag}rows",
                           np.float32, axis=0), table.astype(np.float32).nbytes
        dim = table.shape[1]
        q, scale = quantize_rows(table.astype(np.float32), bits)
        stored = pack_int4(q) if bits == 4 else q
        g = self.op("Gather", [self.const(f"{tag}q{bits}", stored), idx], f"{tag}qrows", stored.dtype, axis=0)
        if bits == 4:
            g32 = self.op("Cast", [g], f"{tag}packed_i32", np.int32, to=onnx.TensorProto.INT32)
            high = self.op("Div", [g32, self.const(f"{tag}sixteen", np.array(16, np.int32))], f"{tag}high", np.int32)
            high16 = self.op("Mul", [high, self.const(f"{tag}sixteen_m", np.array(16, np.int32))], f"{tag}high16",
                             np.int32)
            low = self.op("Sub", [g32, high16], f"{tag}low", np.int32)
            both = self.op("Concat", [low, high], f"{tag}nibbles", np.int32, axis=-1)
            g = self.op("Sub", [both, self.const(f"{tag}eight", np.array(8, np.int32))], f"{tag}centered", np.int32)
        f = self.op("Cast", [g], f"{tag}float", np.float32, to=onnx.TensorProto.FLOAT)
        if bits == 4 and stored.shape[1] * 2 != dim:
            f = self.op("Slice", [f, self.const(f"{tag}s0", np.array([0], np.int64)),
                                  self.const(f"{tag}s1", np.array([dim], np.int64)),
                                  self.const(f"{tag}s2", np.array([-1], np.int64))], f"{tag}trim", np.float32)
        s = self.op("Gather", [self.const(f"{tag}scale", scale), idx], f"{tag}scales", np.float16, axis=0)
        s32 = self.op("Cast", [s], f"{tag}scales_f32", np.float32, to=onnx.TensorProto.FLOAT)
        return self.op("Mul", [f, s32], f"{tag}dequant", np.float32), stored.nbytes + scale.nbytes


def _rewrite(graph: gs.Graph, node: gs.Node, plan: TablePlan, bits: Bits, original: np.ndarray) -> dict:
    """Replace one embedding Gather by the stored form of ``plan``; returns the table's sizes."""
    dtype = original.dtype
    b = _Builder(node.inputs[0].name)
    idx = node.inputs[1]
    result = node.outputs[0]
    node.outputs.clear()
    extra = 0
    if plan.remap is not None:
        small = len(plan.full) + (len(plan.low) if plan.low is not None else 0) <= np.iinfo(np.int16).max
        remap = plan.remap.astype(np.int16 if small else np.int32)
        idx = b.op("Gather", [b.const("remap", remap), idx], "remapped", remap.dtype, axis=0)
        if small:
            idx = b.op("Cast", [idx], "remapped_i32", np.int32, to=onnx.TensorProto.INT32)
        extra = remap.nbytes
    n_full = len(plan.full)
    if plan.low is None:
        vals, stored = b.rows(plan.full, idx, bits, "")
    else:
        first = b.op("Min", [idx, b.const("full_last", np.array(n_full - 1, np.int32))], "full_idx", np.int32)
        shifted = b.op("Sub", [idx, b.const("n_full", np.array(n_full, np.int32))], "shifted", np.int32)
        second = b.op("Max", [shifted, b.const("zero", np.array(0, np.int32))], "low_idx", np.int32)
        full_vals, full_bytes = b.rows(plan.full, first, bits, "")
        low_vals, low_bytes = b.rows(plan.low, second, bits, "low_")
        projected = b.op("MatMul", [low_vals, b.const("projection", plan.projection)], "projected", np.float32)
        is_full = b.op("Less", [idx, b.const("n_full_b", np.array(n_full, np.int32))], "is_full", np.bool_)
        cond = b.op("Unsqueeze", [is_full, b.const("last_axis", np.array([-1], np.int64))], "is_full_col", np.bool_)
        vals = b.op("Where", [cond, full_vals, projected], "mixed", np.float32)
        stored = full_bytes + low_bytes + plan.projection.nbytes
    last = b.nodes[-1]
    if dtype != np.float32:
        to = onnx.helper.np_dtype_to_tensor_dtype(dtype)
        last = gs.Node("Cast", name=f"{b.name}_out", inputs=[vals], outputs=[], attrs={"to": to})
        b.nodes.append(last)
    last.outputs = [result]
    graph.nodes.extend(b.nodes)
    rows, dim = original.shape
    return {"rows": rows, "rows_kept": rows - plan.shared, "dim": dim,
            "rows_low_dim": 0 if plan.low is None else len(plan.low),
            "low_dim": None if plan.low is None else plan.low.shape[1], "shared_rows": plan.shared,
            "bits": bits, "bytes_before": original.nbytes, "bytes_after": stored + extra}
