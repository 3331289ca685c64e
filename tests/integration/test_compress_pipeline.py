"""``compress()`` end to end: report, plot, gate, and the inputs users get wrong."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from recserve.converters.evaluate import Scoring, evaluate, held_out, predict
from recserve.converters.pipeline import compress, load_model
from recserve.converters.recipe import load_recipe, parse_recipe
from recserve.converters.report import CompressionReport, StageStatus
from recserve.converters.storage import densify
from recserve.data.schema import Dataset
from recserve.errors import ConfigError, ModelError, StageError
from recserve.models.train import TrainSettings
from recserve.onnxrt import session

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TRAIN = TrainSettings(epochs=1, batch_size=256, learning_rate=5e-3, threads=1)
PNG = b"\x89PNG\r\n\x1a\n"

QUANT_EMB = """
name: tiny-int8
stages:
  - type: quantize
    mode: int8_static
    calibration_rows: 512
  - type: embeddings
    bits: 8
gate:
  max_relative_auc_loss: 0.05
  min_size_ratio: 1.5
"""

FP16 = "name: tiny-fp16\nstages:\n  - type: quantize\n    mode: fp16\n"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_compress_end_to_end_report(ranker_dir: Path, tiny_data: Dataset, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stages_seen: list[str] = []
    report = compress(ranker_dir, parse_recipe(QUANT_EMB), out, speed=True, train=TRAIN, on_stage=stages_seen.append)
    assert stages_seen == ["loading synthetic:8000,users=200,items=300",
                           "evaluating the baseline on the validation split",
                           "stage 1/2: quantize", "stage 2/2: embeddings", "scoring the result on the test split"]
    # what was written: the typed report, as JSON
    on_disk = json.loads((out / "report.json").read_text())
    assert CompressionReport.model_validate(on_disk) == report
    assert (out / "report.png").read_bytes()[:8] == PNG and (out / "report.png").stat().st_size > 1000
    assert (out / "model.onnx").exists()
    assert sha(out / "preprocessing.json") == sha(ranker_dir / "preprocessing.json")
    for key in ("model", "kind", "recipe", "data", "held_out_rows", "baseline", "stages", "result", "validation",
                "pareto", "relative_auc_loss", "size_ratio", "throughput_ratio", "distinct_score_ratio", "gate"):
        assert key in on_disk, key
    assert report.kind == "ranker" and report.recipe == "tiny-int8" and report.mode == "recipe"
    assert report.held_out_rows == len(tiny_data.ranking_test)
    assert [s.name for s in report.stages] == ["quantize", "embeddings"]
    assert all(s.status == StageStatus.OK for s in report.stages)
    assert report.stages[0].params["mode"] == "int8_static" and report.stages[1].params["bits"] == 8
    # choices on validation, the report on test: stages carry validation numbers, the result test numbers
    val = report.validation
    assert val.rows == len(tiny_data.ranking_validation()) > 0
    assert report.stages[-1].evaluation.quality["auc"] == pytest.approx(val.result.auc)
    base, res = report.baseline, report.result
    assert set(base.quality) == {"auc", "logloss", "calibration", "distinct_score_ratio"}
    assert report.relative_auc_loss == pytest.approx((base.auc - res.auc) / base.auc)
    assert report.relative_auc_loss_se > 0 and val.relative_auc_loss_se > 0
    assert report.size_ratio == pytest.approx(base.size_bytes / res.size_bytes) and report.size_ratio > 1.5
    assert report.distinct_score_ratio == res.quality["distinct_score_ratio"] > 0.5
    # speed was measured: per stage on validation, and baseline against result interleaved on test
    for ev in [val.baseline] + [s.evaluation for s in report.stages] + [base, res]:
        assert ev.latency_ms_b1 > 0 and ev.throughput_b256 > 0
    assert report.throughput_ratio > 0
    assert report.gate.model_dump() == {"passed": True, "reasons": [], "limits": {
        "max_relative_auc_loss": 0.05, "min_size_ratio": 1.5, "min_distinct_score_ratio": 0.5}}
    assert report.pareto == [] and report.search is None
    # the numbers describe the exact bytes written
    written = onnx.load(out / "model.onnx")
    onnx.checker.check_model(written)
    assert (out / "model.onnx").stat().st_size == res.size_bytes
    test = held_out(tiny_data, "ranker", "test")
    assert evaluate(written, Scoring("ranker"), test, speed=False).quality == pytest.approx(res.quality)
    assert report.model == str(ranker_dir / "model.onnx")


def test_gate_failure_writes_no_model(ranker_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = parse_recipe(FP16 + "gate:\n  min_size_ratio: 1000\n  max_relative_auc_loss: 0.5\n")
    report = compress(ranker_dir, recipe, out, speed=False, train=TRAIN)
    assert not (out / "model.onnx").exists(), "a model that failed its gate must not be left to be served"
    gate = json.loads((out / "report.json").read_text())["gate"]
    assert gate["passed"] is False and report.gate.passed is False
    (reason,) = gate["reasons"]
    assert "size ratio" in reason and "min_size_ratio 1000" in reason
    assert (out / "report.png").read_bytes()[:8] == PNG
    assert report.throughput_ratio is None and report.baseline.latency_ms_b1 is None


def test_out_must_be_new_or_empty(ranker_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    compress(ranker_dir, parse_recipe(FP16), out, speed=False)  # an empty folder is fine
    digest = sha(out / "model.onnx")
    with pytest.raises(ConfigError, match=r"not empty.*--force"):
        compress(ranker_dir, parse_recipe(FP16), out, speed=False)
    assert sha(out / "model.onnx") == digest
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"did not write \(todo.txt\)"):
        compress(ranker_dir, parse_recipe(FP16), other, speed=False, force=True)
    assert (other / "todo.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_force_replaces_on_pass_and_never_on_failure(ranker_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    compress(ranker_dir, parse_recipe(FP16), out, speed=False)
    digest, report_before = sha(out / "model.onnx"), (out / "report.json").read_text()
    failing = parse_recipe(QUANT_EMB.replace("min_size_ratio: 1.5", "min_size_ratio: 1000"))
    report = compress(ranker_dir, failing, out, speed=False, force=True)
    assert not report.gate.passed
    # the model there, and the report that goes with it, are untouched; the failure has its own report
    assert sha(out / "model.onnx") == digest and (out / "report.json").read_text() == report_before
    assert json.loads(report_before)["model_sha256"] == sha(out / "model.onnx")
    assert report.model_sha256 is None  # it wrote no model
    assert json.loads((out / "rejected-report.json").read_text())["gate"]["passed"] is False
    assert (out / "rejected-report.png").exists()
    passing = parse_recipe(QUANT_EMB)
    report = compress(ranker_dir, passing, out, speed=False, force=True)
    assert report.gate.passed and sha(out / "model.onnx") != digest
    assert report.model_sha256 == sha(out / "model.onnx")
    assert json.loads((out / "report.json").read_text())["recipe"] == "tiny-int8"
    assert not (out / "rejected-report.json").exists(), "a stale rejection must not sit beside the new model"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "no staging folder is left"


def test_out_that_is_a_train_directory_is_refused_even_with_force(ranker_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-run"
    shutil.copytree(ranker_dir, other)
    before = {p.name: sha(p) for p in other.iterdir()}
    for force in (False, True):
        with pytest.raises(ConfigError, match="`recserve train` output"):
            compress(ranker_dir, parse_recipe(FP16), other, speed=False, force=force)
    assert {p.name: sha(p) for p in other.iterdir()} == before


def test_out_equal_to_input_is_refused(ranker_dir: Path) -> None:
    before = {p.name: sha(p) for p in ranker_dir.iterdir()}
    with pytest.raises(ConfigError, match="holds the input model"):
        compress(ranker_dir, parse_recipe(FP16), ranker_dir, speed=False, train=TRAIN, force=True)
    assert {p.name: sha(p) for p in ranker_dir.iterdir()} == before


def test_out_equal_to_plain_onnx_folder_is_refused(ranker_dir: Path, tmp_path: Path) -> None:
    shutil.copyfile(ranker_dir / "model.onnx", tmp_path / "model.onnx")
    shutil.copyfile(ranker_dir / "preprocessing.json", tmp_path / "preprocessing.json")
    digest = sha(tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match="holds the input model"):
        compress(tmp_path / "model.onnx", parse_recipe(FP16), tmp_path, data_spec="synthetic:8000,users=200,items=300",
                 speed=False)
    assert sha(tmp_path / "model.onnx") == digest
    assert not (tmp_path / "report.json").exists()


def test_a_failing_stage_is_recorded_then_raised(ranker_dir: Path, tmp_path: Path) -> None:
    recipe = parse_recipe("stages:\n  - type: quantize\n    mode: fp16\n  - type: quantize\n    exclude_nodes: [nope]\n"
                          "  - type: embeddings\n")
    with pytest.raises(StageError, match="nope"):
        compress(ranker_dir, recipe, tmp_path / "out", speed=False)
    report = CompressionReport.model_validate_json((tmp_path / "out" / "report.json").read_text())
    assert [(s.name, s.status) for s in report.stages] == [
        ("quantize", StageStatus.OK), ("quantize", StageStatus.FAIL), ("embeddings", StageStatus.SKIPPED)]
    assert "nope" in report.stages[1].error and not report.gate.passed
    assert report.gate.reasons[0].startswith("stage 2 failed")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_quantized_output_layer_fails_the_distinct_score_gate(ranker_dir: Path, tiny_data: Dataset,
                                                              tmp_path: Path) -> None:
    # a final layer in INT8 leaves a few hundred distinct scores: AUC barely moves, ranking is gone
    recipe = parse_recipe("stages:\n  - {type: quantize, mode: int8_static, keep_output_float: false}\n"
                          "  - {type: embeddings, bits: 4}\ngate:\n  max_relative_auc_loss: 0.5\n")
    report = compress(ranker_dir, recipe, tmp_path / "coarse", speed=False)
    assert report.distinct_score_ratio < 0.5 and not report.gate.passed
    assert any("distinct score ratio" in r for r in report.gate.reasons)
    fine = parse_recipe("stages:\n  - {type: quantize, mode: int8_static}\n  - {type: embeddings, bits: 8}\n"
                        "gate:\n  max_relative_auc_loss: 0.5\n")
    kept = compress(ranker_dir, fine, tmp_path / "fine", speed=False)
    assert kept.distinct_score_ratio > max(0.5, 2 * report.distinct_score_ratio) and kept.gate.passed


@pytest.fixture
def plain_onnx(ranker_dir: Path, tmp_path: Path) -> Path:
    """model.onnx and the preprocessing.json written with it, in a folder of their own (no model.json or .pt)."""
    folder = tmp_path / "plain"
    folder.mkdir()
    shutil.copyfile(ranker_dir / "model.onnx", folder / "model.onnx")
    shutil.copyfile(ranker_dir / "preprocessing.json", folder / "preprocessing.json")
    return folder / "model.onnx"


def test_plain_onnx_runs_post_training_stages(plain_onnx: Path, tiny_data: Dataset, tmp_path: Path) -> None:
    loaded = load_model(plain_onnx)
    assert loaded.trained is False and loaded.module is None and loaded.data_spec is None
    assert loaded.preprocessing == plain_onnx.parent / "preprocessing.json" and loaded.recserve_kind == "ranker"
    # the folder works as well as the file
    assert load_model(plain_onnx.parent).source == plain_onnx
    recipe = load_recipe(RECIPES / "post-training-int8.yaml")
    recipe = recipe.model_copy(update={"stages": [replace_calibration(s) for s in recipe.stages]})
    report = compress(plain_onnx, recipe, tmp_path / "out", data_spec=tiny_data.spec, speed=False)
    assert [s.name for s in report.stages] == ["quantize", "embeddings"]
    emb = report.stages[1].details["tables"]
    assert list(emb) == ["ranker.embedding.weight"] and emb["ranker.embedding.weight"]["bytes_after"] > 0
    assert report.size_ratio > 1.5
    assert report.data == tiny_data.spec
    assert (tmp_path / "out" / "model.onnx").exists() == report.gate.passed


def test_plain_onnx_without_its_preprocessing_is_refused(plain_onnx: Path, tiny_data: Dataset, tmp_path: Path) -> None:
    # recserve cannot know which ids it was trained with: feeding recserve's own would score the wrong rows
    (plain_onnx.parent / "preprocessing.json").unlink()
    with pytest.raises(ConfigError, match=r"no preprocessing.json.*tensors:PATH"):
        compress(plain_onnx, parse_recipe(FP16), tmp_path / "out", data_spec=tiny_data.spec, speed=False)
    assert not (tmp_path / "out").exists()


def replace_calibration(stage):
    return stage.model_copy(update={"calibration_rows": 512}) if stage.type == "quantize" else stage


def test_plain_onnx_needs_data(plain_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--data"):
        compress(plain_onnx, parse_recipe(FP16), tmp_path / "out", speed=False)
    assert not (tmp_path / "out").exists()


def test_plain_onnx_structured_prune_is_a_stage_error(plain_onnx: Path, tiny_data: Dataset, tmp_path: Path) -> None:
    recipe = parse_recipe("stages:\n  - type: prune\n    method: structured\n")
    with pytest.raises(StageError) as e:
        compress(plain_onnx, recipe, tmp_path / "out", data_spec=tiny_data.spec, speed=False)
    msg = str(e.value)
    assert "structured" in msg and "PyTorch" in msg and "magnitude" in msg


def test_plain_onnx_magnitude_prune_runs(plain_onnx: Path, tiny_data: Dataset, tmp_path: Path) -> None:
    recipe = parse_recipe("stages:\n  - type: prune\n    sparsity: 0.3\n")
    report = compress(plain_onnx, recipe, tmp_path / "out", data_spec=tiny_data.spec, speed=False)
    details = report.stages[0].details
    assert details["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert details["fine_tune"].startswith("skipped")
    # 30% zeros: stored sparse the file would grow, so it stays dense and the report says so
    assert report.storage["sparse_initializers"] == {} and "did not shrink" in report.storage["note"]


def test_pruned_weights_are_stored_sparse_when_that_shrinks_the_file(plain_onnx: Path, tiny_data: Dataset,
                                                                      tmp_path: Path) -> None:
    recipe = parse_recipe("stages:\n  - type: prune\n    sparsity: 0.9\n")
    report = compress(plain_onnx, recipe, tmp_path / "out", data_spec=tiny_data.spec, speed=False)
    packed = report.storage["sparse_initializers"]
    assert packed and report.storage["bytes_saved"] > 0
    written = onnx.load(tmp_path / "out" / "model.onnx")
    assert {t.values.name for t in written.graph.sparse_initializer} == set(packed)
    assert (tmp_path / "out" / "model.onnx").stat().st_size == report.result.size_bytes
    assert report.result.size_bytes < 0.8 * report.baseline.size_bytes
    # onnxruntime serves the sparse file with the same scores as the dense pruned graph
    test = held_out(tiny_data, "ranker", "test")
    dense = densify(written)
    assert not len(dense.graph.sparse_initializer)
    np.testing.assert_allclose(predict(session(written), test.feed())[0], predict(session(dense), test.feed())[0],
                               rtol=1e-6, atol=1e-7)


def test_not_onnx_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a protobuf, it is a note\n" * 20)
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        compress(bad, parse_recipe(FP16), tmp_path / "out", data_spec="synthetic:100")
    with pytest.raises(ModelError, match="does not exist"):
        compress(tmp_path / "missing.onnx", parse_recipe(FP16), tmp_path / "out", data_spec="synthetic:100")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="not found"):
        load_model(empty)


def test_foreign_onnx_inputs_with_raw_data_point_to_tensors(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["pixels"], ["y"])], "g",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])])
    path = tmp_path / "vision.onnx"
    onnx.save(helper.make_model(graph), path)
    assert load_model(path).recserve_kind is None
    with pytest.raises(ModelError, match=r"\['pixels'\].*'sparse'.*'user_sparse'.*tensors:PATH"):
        compress(path, parse_recipe(FP16), tmp_path / "out", data_spec="synthetic:500", speed=False)


def test_corrupt_train_dir_is_a_model_error(ranker_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(ranker_dir, broken)
    (broken / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not a complete `recserve train` output"):
        compress(broken, parse_recipe(FP16), tmp_path / "out", speed=False)
    (broken / "model.json").write_text('{"kind": "ranker", "config": {"embedding_dim": 8}}')
    with pytest.raises(ModelError, match="not a complete `recserve train` output"):
        compress(broken, parse_recipe(FP16), tmp_path / "out", speed=False)
    assert not (tmp_path / "out").exists()


def test_corrupt_weights_are_a_model_error(ranker_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(ranker_dir, broken)
    (broken / "model.pt").write_bytes(b"garbage, not a state dict")
    with pytest.raises(ModelError, match="not a complete `recserve train` output"):
        compress(broken, parse_recipe(FP16), tmp_path / "out", speed=False)


def test_train_dir_without_weights_is_graph_only(ranker_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-pt"
    shutil.copytree(ranker_dir, folder)
    (folder / "model.pt").unlink()
    loaded = load_model(folder)
    assert loaded.trained is False and loaded.module is None
    # what model.json and preprocessing.json say is still used: no --data needed
    assert loaded.data_spec == "synthetic:8000,users=200,items=300"
    assert loaded.preprocessing == folder / "preprocessing.json"
    with pytest.raises(StageError, match="structured"):
        compress(folder, parse_recipe("stages: [{type: prune, method: structured}]"), tmp_path / "out", speed=False)


def test_out_is_an_existing_file(ranker_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    with pytest.raises(ConfigError, match="out"):
        compress(ranker_dir, parse_recipe(FP16), target, speed=False, train=TRAIN)
    assert target.read_text() == "keep me"


def test_out_is_the_folder_of_a_differently_named_onnx(ranker_dir: Path, tiny_data: Dataset, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copyfile(ranker_dir / "model.onnx", folder / "ranker.onnx")
    shutil.copyfile(ranker_dir / "preprocessing.json", folder / "preprocessing.json")
    digest = sha(folder / "ranker.onnx")
    with pytest.raises(ConfigError, match="holds the input model"):
        compress(folder / "ranker.onnx", parse_recipe(FP16), folder, data_spec=tiny_data.spec, speed=False, force=True)
    assert sorted(p.name for p in folder.iterdir()) == ["preprocessing.json", "ranker.onnx"]
    assert sha(folder / "ranker.onnx") == digest


def test_two_tower_retriever_int8(two_tower_dir: Path, tiny_data: Dataset, tmp_path: Path) -> None:
    recipe = load_recipe(RECIPES / "retriever-int8.yaml")
    report = compress(two_tower_dir, recipe, tmp_path / "out", speed=False, train=TRAIN)
    assert report.kind == "two-tower"
    assert report.held_out_rows == len(tiny_data.retrieval.test_pairs)
    assert report.validation.rows == len(tiny_data.retrieval.validation_pairs) > 0
    for ev in [report.baseline, report.result, report.validation.baseline]:
        assert set(ev.quality) == {"auc", "recall@10", "ndcg@10", "distinct_score_ratio"}
        assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in ev.quality.values())
    assert [s.name for s in report.stages] == ["quantize", "embeddings"]
    tables = report.stages[1].details["tables"]
    assert len(tables) == 2, "both towers' tables"
    assert report.size_ratio > 1.2
    assert report.gate.limits["max_relative_recall_loss"] == 0.05
    assert (tmp_path / "out" / "model.onnx").exists() == report.gate.passed
    # the recall limit is applied: a reason names recall@10 exactly when the loss breaks it
    assert any("recall@10" in r for r in report.gate.reasons) == (not _recall_loss(report) <= 0.05)


def _recall_loss(report: CompressionReport) -> float:
    b, r = report.baseline.quality["recall@10"], report.result.quality["recall@10"]
    return (b - r) / b if b else float("nan")


def test_data_spec_override_is_used(ranker_dir: Path, tmp_path: Path) -> None:
    # the model's vocabularies are reused (preprocessing.json), so another synthetic draw of the same shape works
    spec = "synthetic:3000,users=200,items=300"
    report = compress(ranker_dir, parse_recipe(FP16), tmp_path / "out", data_spec=spec, speed=False)
    assert report.data == spec
    assert report.held_out_rows == 600
    # the recipe's data comes before the model's, and --data before the recipe's
    with_data = parse_recipe(FP16 + "data: synthetic:2000,users=200,items=300\n")
    assert compress(ranker_dir, with_data, tmp_path / "o2", speed=False).held_out_rows == 400
    assert compress(ranker_dir, with_data, tmp_path / "o3", data_spec=spec, speed=False).data == spec


def test_distill_in_a_recipe_needs_no_module_afterwards(ranker_dir: Path, tmp_path: Path) -> None:
    # distill -> quantize: the graph-only stage after a training stage
    recipe = parse_recipe("""
stages:
  - type: distill
    student: {embedding_dim: 4, cross_layers: 1, bottom_mlp: [8], top_mlp: [16]}
    epochs: 1
  - type: quantize
    mode: fp16
""")
    report = compress(ranker_dir, recipe, tmp_path / "out", speed=False, train=replace(TRAIN, epochs=1))
    assert report.stages[0].details["teacher"] == "pytorch"
    assert report.size_ratio > 3
