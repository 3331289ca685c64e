"""Every compression stage on a trained tiny ranker, through ``apply(state, ctx)``, checked on real ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from recserve.converters.distill import DistillStage, StudentSpec
from recserve.converters.embeddings import EmbeddingStage, quantize_rows
from recserve.converters.evaluate import Scoring, count_parameters, evaluate, held_out, session
from recserve.converters.graph import embedding_gathers, initializers, linear_layers, set_initializer
from recserve.converters.lowrank import LowRankStage, svd_factor
from recserve.converters.metrics import auc_score
from recserve.converters.prune import PruneStage
from recserve.converters.quantize import QuantizeStage
from recserve.converters.stage import ModelState, StageContext
from recserve.data.schema import Dataset
from recserve.errors import StageError
from recserve.models.artifact import sample_feed
from recserve.models.export import export_onnx
from recserve.models.ranker import Ranker


def quality(graph: onnx.ModelProto, kind: str, data: Dataset) -> dict[str, float]:
    """Test-split quality (these tests check stages, not choices)."""
    return evaluate(graph, Scoring(kind), held_out(data, kind, "test"), speed=False).quality


def run(graph: onnx.ModelProto, data: Dataset, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
    t = data.ranking_test
    (out,) = session(graph).run(None, {"sparse": t.sparse[rows], "dense": t.dense[rows]})
    return out


def arrays(graph: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}


def weight_shapes(graph: onnx.ModelProto) -> list[tuple[int, ...]]:
    inits = arrays(graph)
    return [inits[layer.weight].shape for layer in linear_layers(graph)]


def table_of(graph: onnx.ModelProto) -> tuple[str, np.ndarray]:
    (gather,) = embedding_gathers(graph)
    return gather.input[0], arrays(graph)[gather.input[0]]


def ops(graph: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in graph.graph.node if n.op_type == op_type]


# ---------------------------------------------------------------------------------------------- prune


def test_structured_prune_shrinks_hidden_layers_and_fine_tunes(ranker_state: ModelState, ctx: StageContext) -> None:
    # bottom [3 -> 16 -> 8], cross 56x56, top [56 -> 32 -> 16 -> 1]; Gemm weights are stored [out, in]
    assert weight_shapes(ranker_state.graph) == [(16, 3), (8, 16), (56, 56), (32, 56), (16, 32), (1, 16)]
    before = sum(p.numel() for p in ranker_state.module.parameters())
    new, details = PruneStage(method="structured", sparsity=0.5, fine_tune_epochs=1).apply(ranker_state, ctx)
    assert details["hidden_sizes"] == {"bottom": [8], "top": [16, 8]}
    # the cross layer is not an MLP: untouched; every hidden size halves, the in/out widths stay
    assert weight_shapes(new.graph) == [(8, 3), (8, 8), (56, 56), (16, 56), (8, 16), (1, 8)]
    after = sum(p.numel() for p in new.module.parameters())
    assert details["parameters_removed"] == before - after > 0
    assert count_parameters(new.graph) < count_parameters(ranker_state.graph)
    assert new.module.config.top_mlp == [16, 8] and new.module.config.bottom_mlp == [8]
    # one epoch of fine-tuning ran, and the result still ranks
    assert [e["epoch"] for e in details["fine_tune"]["epochs"]] == [1]
    assert quality(new.graph, "ranker", ctx.data)["auc"] > 0.6
    # the graph is the module's export
    t = ctx.data.ranking_test
    with torch.no_grad():
        want = torch.sigmoid(new.module(torch.from_numpy(t.sparse[:50]), torch.from_numpy(t.dense[:50]))).numpy()
    np.testing.assert_allclose(run(new.graph, ctx.data, slice(0, 50)), want, rtol=1e-4, atol=1e-6)


def test_structured_prune_removes_the_weakest_neurons_exactly(ranker_state: ModelState, ctx: StageContext) -> None:
    """Half of every hidden layer is made dead (zero weights, negative bias: ReLU gives 0 for any input);
    structured pruning must remove exactly those, so the output does not change at all without fine-tuning."""
    module = ranker_state.module
    with torch.no_grad():
        for seq in (module.bottom, module.top):
            for lin in [m for m in seq if isinstance(m, nn.Linear)][:-1]:
                dead = torch.arange(lin.out_features) % 2 == 1
                lin.weight[dead] = 0.0
                lin.bias[dead] = -1e-3
                lin.bias[~dead] = lin.bias[~dead].abs() + 0.05  # live neurons have the larger norm
    state = ranker_state.with_module(module, ctx.data)
    before = run(state.graph, ctx.data)
    new, details = PruneStage(method="structured", sparsity=0.5, fine_tune_epochs=0).apply(state, ctx)
    assert details["fine_tune"] == {}
    assert details["hidden_sizes"] == {"bottom": [8], "top": [16, 8]}
    np.testing.assert_allclose(run(new.graph, ctx.data), before, rtol=1e-5, atol=1e-6)


def test_structured_prune_on_ranker_with_low_rank_cross(tiny_data: Dataset, ctx: StageContext,
                                                        ranker_config) -> None:
    module = Ranker(ranker_config(tiny_data, cross_rank=4))
    state = ModelState("ranker", export_onnx(module, "ranker", sample_feed("ranker", tiny_data)), module)
    new, details = PruneStage(method="structured", sparsity=0.5, fine_tune_epochs=0).apply(state, ctx)
    assert details["hidden_sizes"]["top"] == [16, 8]
    assert quality(new.graph, "ranker", tiny_data)["auc"] > 0


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_prune_graph_only(ranker_graph_state: ModelState, ctx: StageContext, scope: str) -> None:
    state = ranker_graph_state
    table_name, table = table_of(state.graph)
    new, details = PruneStage(method="magnitude", sparsity=0.6, scope=scope).apply(state, ctx)
    assert new.module is None
    assert details["fine_tune"].startswith("skipped")
    assert weight_shapes(new.graph) == weight_shapes(state.graph)
    inits = arrays(new.graph)
    weights = [inits[layer.weight] for layer in linear_layers(new.graph)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.size for w in weights)
    assert zeros == int(total * 0.6) if scope == "global" else zeros == sum(int(w.size * 0.6) for w in weights)
    assert details["sparsity"] == pytest.approx(zeros / total)
    if scope == "layer":
        for w in weights:
            assert int((w == 0).sum()) == int(w.size * 0.6)
    # the survivors are the original values; biases and the embedding table are not pruned
    orig = arrays(state.graph)
    for layer in linear_layers(new.graph):
        w, o = inits[layer.weight], orig[layer.weight]
        np.testing.assert_array_equal(w[w != 0], o[w != 0])
    np.testing.assert_array_equal(inits[table_name], table)
    assert (inits["ranker.top.0.bias"] == orig["ranker.top.0.bias"]).all()
    # the input state is left alone
    assert not any((arrays(state.graph)[lay.weight] == 0).any() for lay in linear_layers(state.graph))
    assert quality(new.graph, "ranker", ctx.data)["auc"] > 0.5


def test_magnitude_prune_with_pytorch_fine_tunes_and_keeps_zeros(ranker_state: ModelState, ctx: StageContext) -> None:
    new, details = PruneStage(method="magnitude", sparsity=0.5, fine_tune_epochs=1).apply(ranker_state, ctx)
    assert new.module is not None
    assert [e["epoch"] for e in details["fine_tune"]["epochs"]] == [1]
    inits = arrays(new.graph)
    weights = [inits[layer.weight] for layer in linear_layers(new.graph)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    # the masks stayed applied through fine-tuning and are baked into the exported weights
    assert zeros >= 0.5 and details["sparsity"] == pytest.approx(zeros)
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in new.module.named_parameters())
    assert quality(new.graph, "ranker", ctx.data)["auc"] > 0.55


def test_structured_prune_needs_pytorch(ranker_graph_state: ModelState, ctx: StageContext) -> None:
    with pytest.raises(StageError, match="structured.*PyTorch"):
        PruneStage(method="structured").apply(ranker_graph_state, ctx)


# ------------------------------------------------------------------------------------------- low rank


def test_low_rank_graph_path(ranker_graph_state: ModelState, ctx: StageContext) -> None:
    state = ranker_graph_state
    inits = initializers(state.graph)
    layers = linear_layers(state.graph)
    plan = {lay.node.name: (lay, svd_factor(lay.matrix(inits), rank=4, energy=None, min_saving=0.2)) for lay in layers}
    expected = {name for name, (_, pq) in plan.items() if pq is not None}
    # 4 * (in + out) <= 0.8 * in * out: not the thin first bottom layer (3 -> 16) nor the last (16 -> 1)
    assert expected == {"/ranker/bottom/bottom.2/Gemm", "/ranker/cross.0/proj/Gemm", "/ranker/top/top.0/Gemm",
                        "/ranker/top/top.2/Gemm"}
    new, details = LowRankStage(rank=4, min_saving=0.2).apply(state, ctx)
    assert new.module is None and details["fine_tune"].startswith("skipped")
    assert details["ranks"] == {name: 4 for name in expected}
    assert len(ops(state.graph, "MatMul")) == 0
    assert len(ops(new.graph, "MatMul")) == len(expected)
    assert len(ops(new.graph, "Gemm")) == len(ops(state.graph, "Gemm"))
    onnx.checker.check_model(new.graph)
    after = arrays(new.graph)
    for name in expected:
        lay = plan[name][0]
        n_in, n_out = lay.matrix(inits).shape
        assert after[f"{name}_P"].shape == (n_in, 4) and after[f"{name}_Q"].shape == (4, n_out)
        assert lay.weight not in after
    assert count_parameters(new.graph) < count_parameters(state.graph)
    # reference: the float graph with each factorized weight replaced by P @ Q
    ref = onnx.ModelProto()
    ref.CopyFrom(state.graph)
    for name in expected:
        lay, (p, q) = plan[name]
        set_initializer(ref, lay.weight, (p @ q).T if lay.transposed else p @ q)
    np.testing.assert_allclose(run(new.graph, ctx.data), run(ref, ctx.data), rtol=1e-4, atol=1e-5)


def test_low_rank_graph_nothing_qualifies(ranker_graph_state: ModelState, ctx: StageContext) -> None:
    new, details = LowRankStage(rank=64, min_saving=0.2).apply(ranker_graph_state, ctx)
    assert details["ranks"] == {}
    assert new.graph is ranker_graph_state.graph


def test_low_rank_torch_path_replaces_linears_with_pairs(ranker_state: ModelState, ctx: StageContext) -> None:
    new, details = LowRankStage(rank=4, min_saving=0.2, fine_tune_epochs=0).apply(ranker_state, ctx)
    module = new.module
    assert details["ranks"] == {"bottom.2": 4, "cross.0.proj": 4, "top.0": 4, "top.2": 4}
    proj = module.cross[0].proj
    assert isinstance(proj, nn.Sequential) and len(proj) == 2
    first, second = proj
    assert (first.in_features, first.out_features, first.bias) == (56, 4, None)
    assert (second.in_features, second.out_features) == (4, 56) and second.bias is not None
    assert isinstance(module.top[0], nn.Sequential) and isinstance(module.top[4], nn.Linear)
    assert isinstance(module.bottom[0], nn.Linear)
    assert details["fine_tune"] == {}
    assert len(ops(new.graph, "Gemm")) + len(ops(new.graph, "MatMul")) == 6 + 4


def test_low_rank_energy_near_one_keeps_outputs(ranker_state: ModelState, ctx: StageContext) -> None:
    # make two layers genuinely low rank (3), so that a near-1 energy finds that rank and pays
    module = ranker_state.module
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for lin in (module.cross[0].proj, module.top[0]):
            w = lin.weight.numpy()
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            lin.weight.copy_(torch.from_numpy((u[:, :3] * s[:3]) @ vt[:3] + rng.normal(0, 1e-6, w.shape)).float())
    state = ranker_state.with_module(module, ctx.data)
    before = run(state.graph, ctx.data)
    new, details = LowRankStage(energy=0.9999, min_saving=0.3, fine_tune_epochs=0).apply(state, ctx)
    assert details["ranks"] == {"cross.0.proj": 3, "top.0": 3}
    assert count_parameters(new.graph) < count_parameters(state.graph)
    np.testing.assert_allclose(run(new.graph, ctx.data), before, atol=2e-4)


# -------------------------------------------------------------------------------------------- distill


@pytest.mark.parametrize("with_module", [True, False], ids=["pytorch-teacher", "onnx-teacher"])
def test_distill_gives_smaller_student_close_to_teacher(ranker_state: ModelState, ctx: StageContext,
                                                         with_module: bool) -> None:
    state = ranker_state if with_module else ModelState("ranker", ranker_state.graph)
    stage = DistillStage(student=StudentSpec(embedding_dim=4, cross_layers=1, bottom_mlp=[8], top_mlp=[16]),
                         epochs=2, learning_rate=5e-3, alpha=0.2)
    new, details = stage.apply(state, ctx)
    assert details["teacher"] == ("pytorch" if with_module else "onnxruntime")
    assert details["student"]["embedding_dim"] == 4 and details["student"]["top_mlp"] == [16]
    assert isinstance(new.module, Ranker) and new.module is not ranker_state.module
    assert count_parameters(new.graph) < count_parameters(state.graph) / 1.8
    teacher, student = quality(state.graph, "ranker", ctx.data), quality(new.graph, "ranker", ctx.data)
    assert student["auc"] > teacher["auc"] - 0.05, (student, teacher)
    # mostly taught by the teacher's scores (alpha 0.2): its probabilities follow the teacher's
    assert abs(student["calibration"] - teacher["calibration"]) < 0.15, (student, teacher)
    assert student["logloss"] < teacher["logloss"] + 0.03, (student, teacher)


def test_distill_refuses_two_tower(two_tower_dir: Path, ctx: StageContext) -> None:
    state = ModelState("two-tower", onnx.load(two_tower_dir / "model.onnx"))
    with pytest.raises(StageError, match="only rankers"):
        DistillStage().apply(state, ctx)


# ------------------------------------------------------------------------------------------- quantize


def _initializer_feeding(graph: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in graph.graph.node if name in n.output), None)


@pytest.fixture(scope="module")
def int8_static(ranker_dir: Path, tiny_data: Dataset) -> tuple[ModelState, ModelState, dict]:
    """(float state, int8 static state, details), quantized once for the tests below."""
    state = ModelState("ranker", onnx.load(ranker_dir / "model.onnx"))
    ctx = StageContext(tiny_data, Scoring("ranker"))
    new, details = QuantizeStage(mode="int8_static", calibration_rows=1024).apply(state, ctx)
    return state, new, details


def _dequantized_weight(q: onnx.ModelProto, node: onnx.NodeProto) -> onnx.NodeProto | None:
    dq = _initializer_feeding(q, node.input[1])
    return dq if dq is not None and dq.op_type == "DequantizeLinear" else None


def test_int8_static_is_symmetric_per_channel_qdq(int8_static, tiny_data: Dataset) -> None:
    state, new, details = int8_static
    last = "/ranker/top/top.4/Gemm"  # the layer that makes the score stays float (scores stay distinct)
    assert new.module is None and details["mode"] == "int8_static" and details["excluded"] == [last]
    q = new.graph
    onnx.checker.check_model(q)
    qs, dqs = ops(q, "QuantizeLinear"), ops(q, "DequantizeLinear")
    assert qs and dqs
    inits = arrays(q)
    # symmetric: activations and weights carry an explicit int8 zero point of 0
    float_shapes = {lay.node.name: arrays(state.graph)[lay.weight].shape for lay in linear_layers(state.graph)}
    gemms = {n.name: n for n in ops(q, "Gemm") + ops(q, "MatMul")}
    assert set(gemms) == set(float_shapes)
    assert inits[gemms.pop(last).input[1]].dtype == np.float32
    float_shapes.pop(last)
    weight_dqs = [_dequantized_weight(q, gemms[name]) for name in float_shapes]
    activation_dqs = [_initializer_feeding(q, gemms[name].input[0]) for name in float_shapes]
    for node in qs + weight_dqs + activation_dqs:
        assert node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear")
        assert len(node.input) == 3 and node.input[2] in inits, node.name
        zp = inits[node.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), node.name
    # every zero point in the graph is 0, whatever its type
    for node in qs + dqs:
        assert not inits[node.input[2]].any(), node.name
    # every dense layer reads its weight through a per-channel DequantizeLinear of an int8 initializer
    for name, shape in float_shapes.items():
        dq = _dequantized_weight(q, gemms[name])
        w = inits[dq.input[0]]
        assert w.dtype == np.int8 and w.shape == shape
        scale = inits[dq.input[1]]
        out_channels = shape[0]  # Gemm transB=1: [out, in]
        assert scale.ndim == 1 and scale.shape == (out_channels,), (name, scale.shape)
        assert next((a.i for a in dq.attribute if a.name == "axis"), 1) == 0
        if out_channels > 1:
            assert len(np.unique(scale)) > 1, "per-channel scales differ between channels"
    # no float copy of a quantized dense weight is left
    assert not any(lay.weight in inits for lay in linear_layers(state.graph) if lay.node.name != last)
    # outputs stay close to float
    f, got = run(state.graph, tiny_data), run(q, tiny_data)
    err = np.abs(got - f)  # probabilities: the worst rows of the tiny ranker moved 0.045-0.066 across initializations
    print(f"int8 static: |diff| mean {err.mean():.4f}, p99 {np.quantile(err, 0.99):.4f}, max {err.max():.4f}")
    assert err.mean() < 0.01 and np.quantile(err, 0.99) < 0.05 and err.max() < 0.1, err.max()
    labels = tiny_data.ranking_test.label
    assert abs(auc_score(labels, got.ravel()) - auc_score(labels, f.ravel())) < 0.01


def test_int8_static_qdq_is_tensorrt_compatible(int8_static) -> None:
    """TensorRT parses only int8 Q/DQ ("only activation types allowed" for an int32 bias DequantizeLinear)."""
    _, new, _ = int8_static
    inits = arrays(new.graph)
    for node in ops(new.graph, "QuantizeLinear") + ops(new.graph, "DequantizeLinear"):
        assert inits[node.input[2]].dtype == np.int8, f"{node.name}: zero point {inits[node.input[2]].dtype}"
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            assert inits[node.input[0]].dtype == np.int8, f"{node.name}: {inits[node.input[0]].dtype} input"


@pytest.mark.parametrize("mode", ["int8_dynamic", "fp16"])
def test_int8_dynamic_and_fp16_run_and_shrink(ranker_graph_state: ModelState, ctx: StageContext, mode: str) -> None:
    state = ranker_graph_state
    new, details = QuantizeStage(mode=mode).apply(state, ctx)
    assert details["mode"] == mode
    assert new.graph.ByteSize() < state.graph.ByteSize() * (0.6 if mode == "fp16" else 0.9)
    f, got = run(state.graph, ctx.data), run(new.graph, ctx.data)
    assert got.dtype == np.float32 and got.shape == f.shape  # fp16 keeps float32 inputs and outputs
    assert np.abs(got - f).max() < 0.05
    labels = ctx.data.ranking_test.label
    assert abs(auc_score(labels, got.ravel()) - auc_score(labels, f.ravel())) < 0.01
    if mode == "fp16":
        (_, table) = table_of(new.graph)
        assert table.dtype == np.float16
    else:
        assert ops(new.graph, "DynamicQuantizeLinear")


def test_sensitivity_ranks_layers_and_keeps_most_sensitive_float(ranker_graph_state: ModelState,
                                                                   ctx: StageContext) -> None:
    state = ranker_graph_state
    stage = QuantizeStage(mode="int8_static", calibration_rows=256, sensitivity=True, exclude_most_sensitive=1)
    new, details = stage.apply(state, ctx)
    rows = details["sensitivity"]
    last = "/ranker/top/top.4/Gemm"  # float anyway (keep_output_float): not ranked
    names = [lay.node.name for lay in linear_layers(state.graph) if lay.node.name != last]
    assert sorted(r["node"] for r in rows) == sorted(names)
    losses = [r["auc_loss"] for r in rows]
    assert losses == sorted(losses, reverse=True)
    for r in rows:
        assert set(r) == {"node", "auc", "auc_loss", "relative_loss", "relative_loss_se"} and 0.0 < r["auc"] <= 1.0
        assert r["relative_loss_se"] >= 0
    kept = rows[0]["node"]
    assert details["excluded"] == [last, kept]
    float_weights = {lay.node.name: lay.weight for lay in linear_layers(state.graph)}
    inits = arrays(new.graph)
    node = next(n for n in new.graph.graph.node if n.name == kept)
    # the most sensitive layer still reads its float weight; the others read dequantized int8
    assert node.input[1] == float_weights[kept] and inits[node.input[1]].dtype == np.float32
    for n in new.graph.graph.node:
        if n.name in float_weights and n.name not in (kept, last):
            assert _initializer_feeding(new.graph, n.input[1]).op_type == "DequantizeLinear", n.name


def test_quantize_unknown_exclude_node(ranker_graph_state: ModelState, ctx: StageContext) -> None:
    with pytest.raises(StageError, match=r"exclude_nodes.*'nope'.*/ranker/top/top.0/Gemm"):
        QuantizeStage(exclude_nodes=["nope"]).apply(ranker_graph_state, ctx)


def test_fp16_exclude_nodes_stay_float(ranker_graph_state: ModelState, ctx: StageContext) -> None:
    new, details = QuantizeStage(mode="fp16", exclude_nodes=["/ranker/top/top.2/Gemm"]).apply(ranker_graph_state, ctx)
    # the excluded layer, then the output layer and what follows it (the sigmoid): scores stay float
    assert details["excluded"][:2] == ["/ranker/top/top.2/Gemm", "/ranker/top/top.4/Gemm"]
    assert inits_dtype(new.graph, "ranker.top.2.weight") == np.float32
    inits = arrays(new.graph)
    assert inits["ranker.top.4.weight"].dtype == np.float32
    assert inits["ranker.top.0.weight"].dtype == np.float16


# ----------------------------------------------------------------------------------------- embeddings


def inits_dtype(graph: onnx.ModelProto, name: str) -> np.dtype:
    return arrays(graph)[name].dtype


def _with_table(graph: onnx.ModelProto, name: str, table: np.ndarray) -> onnx.ModelProto:
    ref = onnx.ModelProto()
    ref.CopyFrom(graph)
    set_initializer(ref, name, table)
    return ref


def _odd_dim_state(data: Dataset, ranker_config) -> ModelState:
    module = Ranker(ranker_config(data, embedding_dim=5))
    with torch.no_grad():
        module.embedding.weight.mul_(20.0)  # make the table matter to the output
    return ModelState("ranker", export_onnx(module, "ranker", sample_feed("ranker", data)))


@pytest.mark.parametrize(("bits", "odd"), [(8, False), (4, False), (4, True)], ids=["int8", "int4", "int4-odd-dim"])
def test_embedding_quantization_matches_numpy_reference(ranker_graph_state: ModelState, ctx: StageContext,
                                                        ranker_config, bits: int, odd: bool) -> None:
    state = _odd_dim_state(ctx.data, ranker_config) if odd else ranker_graph_state
    name, table = table_of(state.graph)
    new, details = EmbeddingStage(bits=bits).apply(state, ctx)
    info = details["tables"][name]
    assert (info["rows"], info["rows_kept"], info["dim"]) == (table.shape[0], *table.shape)
    rows, dim = table.shape
    assert info["bytes_before"] == table.nbytes
    assert info["bytes_after"] == rows * (dim if bits == 8 else (dim + 1) // 2) + rows * 2  # values + fp16 scales
    # no float table remains: the old table is gone, Gathers read floats only from the [rows, 1] fp16 scales,
    # which are not embedding tables (a second embeddings stage must not quantize them again)
    inits = arrays(new.graph)
    assert embedding_gathers(new.graph) == []
    assert inits[f"{name}_scale"].dtype == np.float16
    assert name not in inits
    assert not any(a.dtype in (np.float32, np.float16) and a.shape == table.shape for a in inits.values())
    stored = inits[f"{name}_q{bits}"]
    assert stored.dtype == (np.int8 if bits == 8 else np.uint8)
    assert stored.shape == (table.shape[0], table.shape[1] if bits == 8 else (table.shape[1] + 1) // 2)
    assert new.graph.ByteSize() < state.graph.ByteSize()
    onnx.checker.check_model(new.graph)
    # reference: the float graph reading the rows dequantized in numpy
    q, scale = quantize_rows(table, bits)
    deq = q.astype(np.float32) * scale.astype(np.float32)
    ref = _with_table(state.graph, name, deq)
    got, want = run(new.graph, ctx.data), run(ref, ctx.data)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if bits == 8:
        assert np.abs(got - run(state.graph, ctx.data)).max() < 0.01


def _row_counts(state: ModelState, data: Dataset) -> np.ndarray:
    """Reads of each row on the fit rows (the training rows without the validation rows)."""
    name, table = table_of(state.graph)
    fit = data.ranking_fit()
    card = [f.cardinality for f in fit.sparse_features]
    offsets = np.concatenate([[0], np.cumsum(card)[:-1]])
    return np.bincount((fit.sparse + offsets).ravel(), minlength=table.shape[0])


@pytest.mark.parametrize("bits", [None, 8])
def test_embedding_min_count_folds_rare_rows(ranker_graph_state: ModelState, ctx: StageContext, bits) -> None:
    state = ranker_graph_state
    name, table = table_of(state.graph)
    counts = _row_counts(state, ctx.data)
    keep = counts >= 5
    assert 0 < (~keep).sum() < len(keep)
    new, details = EmbeddingStage(bits=bits, min_count=5).apply(state, ctx)
    info = details["tables"][name]
    assert info["rows"] == len(table) and info["rows_kept"] == int(keep.sum()) < info["rows"]
    # reference: rare rows replaced by their mean, then (for bits) the compact table quantized row-wise
    compact = np.concatenate([table[keep], table[~keep].mean(axis=0, keepdims=True)]).astype(np.float32)
    if bits is not None:
        q, scale = quantize_rows(compact, bits)
        compact = q.astype(np.float32) * scale.astype(np.float32)
    remap = np.where(keep, np.cumsum(keep) - 1, keep.sum())
    got = run(new.graph, ctx.data)
    np.testing.assert_allclose(got, run(_with_table(state.graph, name, compact[remap]), ctx.data),
                               rtol=1e-5, atol=1e-6)
    if bits is None:
        # rows of frequent ids come through exactly: on rows reading only those, the output is unchanged
        t = ctx.data.ranking_test
        card = [f.cardinality for f in t.sparse_features]
        idx = t.sparse + np.concatenate([[0], np.cumsum(card)[:-1]])
        frequent = keep[idx].all(axis=1)
        assert 0 < frequent.sum() < len(frequent)
        np.testing.assert_array_equal(got[frequent], run(state.graph, ctx.data)[frequent])
        assert not np.allclose(got[~frequent], run(state.graph, ctx.data)[~frequent])


def test_embedding_stage_needs_a_table(ctx: StageContext) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["dense"], ["score"])], "g",
                              [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["B", 3]),
                               helper.make_tensor_value_info("sparse", TensorProto.INT64, ["B", 6])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B", 3])])
    with pytest.raises(StageError, match="no embedding tables"):
        EmbeddingStage(bits=8).apply(ModelState("ranker", helper.make_model(graph)), ctx)


def test_second_embedding_stage_is_refused(ranker_graph_state: ModelState, ctx: StageContext) -> None:
    once, _ = EmbeddingStage(bits=8).apply(ranker_graph_state, ctx)
    with pytest.raises(StageError, match="no embedding tables"):
        EmbeddingStage(bits=4).apply(once, ctx)


def test_embeddings_after_fp16_keep_output_dtype(ranker_graph_state: ModelState, ctx: StageContext) -> None:
    half, _ = QuantizeStage(mode="fp16").apply(ranker_graph_state, ctx)
    name, table = table_of(half.graph)
    assert table.dtype == np.float16
    new, details = EmbeddingStage(bits=8).apply(half, ctx)
    assert details["tables"][name]["bytes_after"] < table.nbytes / 1.5
    assert name not in arrays(new.graph)
    got = run(new.graph, ctx.data)
    assert got.dtype == np.float32
    assert np.abs(got - run(ranker_graph_state.graph, ctx.data)).max() < 0.05


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_mixed_dimension_rare_rows_match_the_plan(ranker_graph_state: ModelState, ctx: StageContext, bits) -> None:
    from recserve.converters.embeddings import plan_table

    state = ranker_graph_state
    name, table = table_of(state.graph)
    counts = _row_counts(state, ctx.data)
    stage = EmbeddingStage(bits=bits, min_count=2, rare_threshold=10, rare_dim=3)
    new, details = stage.apply(state, ctx)
    info = details["tables"][name]
    plan = plan_table(table, counts, min_count=2, rare_threshold=10, rare_dim=3)
    assert info["rows_low_dim"] == len(plan.low) > 0 and info["low_dim"] == 3 and info["shared_rows"] == plan.shared
    onnx.checker.check_model(new.graph)
    reference = _with_table(state.graph, name, plan.lookup(np.arange(len(table))).astype(np.float32))
    got, want = run(new.graph, ctx.data), run(reference, ctx.data)
    if bits is None:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert info["bytes_after"] < table.nbytes
    else:
        assert np.abs(got - want).max() < (0.02 if bits == 8 else 0.1)
    # the remap table is int16 here (few rows): 2 bytes a row
    assert arrays(new.graph)[f"{name}_remap"].dtype == np.int16
