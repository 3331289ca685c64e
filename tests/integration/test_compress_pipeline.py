"""``compress()`` end to end: report, plot, gate, and the inputs users get wrong."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import onnx
import pytest

from recserve.converters.evaluate import evaluate
from recserve.converters.pipeline import compress, load_model
from recserve.converters.recipe import load_recipe, parse_recipe
from recserve.data.schema import Dataset
from recserve.errors import ConfigError, ModelError, StageError
from recserve.models.train import TrainSettings

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
    assert stages_seen == ["loading synthetic:8000,users=200,items=300", "evaluating baseline",
                           "stage 1/2: quantize", "stage 2/2: embeddings"]
    # what was written
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert (out / "report.png").read_bytes()[:8] == PNG and (out / "report.png").stat().st_size > 1000
    assert (out / "model.onnx").exists()
    assert sha(out / "preprocessing.json") == sha(ranker_dir / "preprocessing.json")
    # the report's fields
    for key in ("model", "kind", "recipe", "data", "held_out_rows", "baseline", "stages", "result",
                "relative_auc_loss", "size_ratio", "throughput_ratio", "gate"):
        assert key in on_disk, key
    assert on_disk["kind"] == "ranker" and on_disk["recipe"] == "tiny-int8"
    assert on_disk["held_out_rows"] == len(tiny_data.ranking_test)
    assert [s["name"] for s in on_disk["stages"]] == ["quantize", "embeddings"]
    assert on_disk["stages"][0]["params"]["mode"] == "int8_static"
    assert on_disk["stages"][1]["params"]["bits"] == 8
    assert on_disk["result"] == on_disk["stages"][-1]["evaluation"]
    base, res = on_disk["baseline"], on_disk["result"]
    assert set(base["quality"]) == {"auc", "logloss", "calibration"}
    assert on_disk["relative_auc_loss"] == pytest.approx((base["quality"]["auc"] - res["quality"]["auc"])
                                                         / base["quality"]["auc"])
    assert on_disk["size_ratio"] == pytest.approx(base["size_bytes"] / res["size_bytes"])
    assert on_disk["size_ratio"] > 1.5
    # speed was measured, for every row
    for ev in [base] + [s["evaluation"] for s in on_disk["stages"]]:
        assert ev["latency_ms_b1"] > 0 and ev["throughput_b256"] > 0
    assert on_disk["throughput_ratio"] == pytest.approx(res["throughput_b256"] / base["throughput_b256"])
    assert on_disk["gate"] == {"passed": True, "reasons": [],
                               "limits": {"max_relative_auc_loss": 0.05, "min_size_ratio": 1.5}}
    # the numbers describe the exact bytes written
    written = onnx.load(out / "model.onnx")
    onnx.checker.check_model(written)
    assert (out / "model.onnx").stat().st_size == res["size_bytes"]
    assert evaluate(written, "ranker", tiny_data, speed=False).quality == pytest.approx(res["quality"])
    # the input is untouched
    assert on_disk["model"] == str(ranker_dir / "model.onnx")


def test_gate_failure_writes_no_model(ranker_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"stale model from an earlier run")
    recipe = parse_recipe(FP16 + "gate:\n  min_size_ratio: 1000\n  max_relative_auc_loss: 0.5\n")
    report = compress(ranker_dir, recipe, out, speed=False, train=TRAIN)
    assert not (out / "model.onnx").exists(), "a model that failed its gate must not be left to be served"
    gate = json.loads((out / "report.json").read_text())["gate"]
    assert gate["passed"] is False and report["gate"]["passed"] is False
    (reason,) = gate["reasons"]
    assert "size ratio" in reason and "min_size_ratio 1000" in reason
    assert (out / "report.png").read_bytes()[:8] == PNG
    assert report["throughput_ratio"] is None and report["baseline"]["latency_ms_b1"] is None


def test_out_equal_to_input_is_refused(ranker_dir: Path) -> None:
    before = {p.name: sha(p) for p in ranker_dir.iterdir()}
    with pytest.raises(ConfigError, match="overwrite the input model"):
        compress(ranker_dir, parse_recipe(FP16), ranker_dir, speed=False, train=TRAIN)
    assert {p.name: sha(p) for p in ranker_dir.iterdir()} == before


def test_out_equal_to_plain_onnx_folder_is_refused(ranker_dir: Path, tmp_path: Path) -> None:
    shutil.copyfile(ranker_dir / "model.onnx", tmp_path / "model.onnx")
    digest = sha(tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match="overwrite"):
        compress(tmp_path / "model.onnx", parse_recipe(FP16), tmp_path, data_spec="synthetic:8000,users=200,items=300",
                 speed=False)
    assert sha(tmp_path / "model.onnx") == digest
    assert not (tmp_path / "report.json").exists()


@pytest.fixture
def plain_onnx(ranker_dir: Path, tmp_path: Path) -> Path:
    """Only model.onnx, in a folder of its own: no model.json, model.pt or preprocessing.json."""
    folder = tmp_path / "plain"
    folder.mkdir()
    shutil.copyfile(ranker_dir / "model.onnx", folder / "model.onnx")
    return folder / "model.onnx"


def test_plain_onnx_runs_post_training_stages(plain_onnx: Path, tiny_data: Dataset, tmp_path: Path) -> None:
    loaded = load_model(plain_onnx)
    assert loaded.trained is False and loaded.state.module is None and loaded.data_spec is None
    assert loaded.preprocessing is None and loaded.state.kind == "ranker"
    # the folder works as well as the file
    assert load_model(plain_onnx.parent).source == plain_onnx
    recipe = load_recipe(RECIPES / "post-training-int8.yaml")
    recipe = recipe.model_copy(update={"stages": [replace_calibration(s) for s in recipe.stages]})
    report = compress(plain_onnx, recipe, tmp_path / "out", data_spec=tiny_data.spec, speed=False)
    assert [s["name"] for s in report["stages"]] == ["quantize", "embeddings"]
    emb = report["stages"][1]["details"]["tables"]
    assert list(emb) == ["ranker.embedding.weight"] and emb["ranker.embedding.weight"]["bytes_after"] > 0
    assert report["size_ratio"] > 1.5
    assert report["data"] == tiny_data.spec
    assert (tmp_path / "out" / "model.onnx").exists() == report["gate"]["passed"]
    assert not (tmp_path / "out" / "preprocessing.json").exists()


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
    details = report["stages"][0]["details"]
    assert details["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert details["fine_tune"].startswith("skipped")


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


def test_foreign_onnx_inputs_are_a_model_error(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["pixels"], ["y"])], "g",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])])
    path = tmp_path / "vision.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(ModelError, match=r"\['pixels'\].*'sparse'.*'user_sparse'"):
        load_model(path)


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
    assert loaded.trained is False and loaded.state.module is None
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
    report = compress(folder / "ranker.onnx", parse_recipe(FP16), folder, data_spec=tiny_data.spec, speed=False)
    assert report["gate"]["passed"] and (folder / "model.onnx").exists()
    assert sha(folder / "ranker.onnx") == digest


def test_two_tower_retriever_int8(two_tower_dir: Path, tiny_data: Dataset, tmp_path: Path) -> None:
    recipe = load_recipe(RECIPES / "retriever-int8.yaml")
    report = compress(two_tower_dir, recipe, tmp_path / "out", speed=False, train=TRAIN)
    assert report["kind"] == "two-tower"
    assert report["held_out_rows"] == len(tiny_data.retrieval.test_pairs)
    for ev in [report["baseline"], report["result"]]:
        assert set(ev["quality"]) == {"auc", "recall@10", "ndcg@10"}
        assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in ev["quality"].values())
    assert [s["name"] for s in report["stages"]] == ["quantize", "embeddings"]
    tables = report["stages"][1]["details"]["tables"]
    assert len(tables) == 2, "both towers' tables"
    assert report["size_ratio"] > 1.2
    assert report["gate"]["limits"]["max_relative_recall_loss"] == 0.05
    assert (tmp_path / "out" / "model.onnx").exists() == report["gate"]["passed"]
    # the recall limit is applied: a reason names recall@10 exactly when the loss breaks it
    assert any("recall@10" in r for r in report["gate"]["reasons"]) == (not _recall_loss(report) <= 0.05)


def _recall_loss(report: dict) -> float:
    b, r = report["baseline"]["quality"]["recall@10"], report["result"]["quality"]["recall@10"]
    return (b - r) / b if b else float("nan")


def test_data_spec_override_is_used(ranker_dir: Path, tmp_path: Path) -> None:
    # the model's vocabularies are reused (preprocessing.json), so another synthetic draw of the same shape works
    spec = "synthetic:3000,users=200,items=300"
    report = compress(ranker_dir, parse_recipe(FP16), tmp_path / "out", data_spec=spec, speed=False)
    assert report["data"] == spec
    assert report["held_out_rows"] == 600
    # the recipe's data comes before the model's, and --data before the recipe's
    with_data = parse_recipe(FP16 + "data: synthetic:2000,users=200,items=300\n")
    assert compress(ranker_dir, with_data, tmp_path / "o2", speed=False)["held_out_rows"] == 400
    assert compress(ranker_dir, with_data, tmp_path / "o3", data_spec=spec, speed=False)["data"] == spec


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
    assert report["stages"][0]["details"]["teacher"] == "pytorch"
    assert report["size_ratio"] > 3
