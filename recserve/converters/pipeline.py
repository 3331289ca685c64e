"""``recserve compress``: run a recipe's stages, evaluate each on held-out data, gate, and write the result."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from recserve.converters.evaluate import Evaluation, evaluate, model_kind
from recserve.converters.recipe import Gate, Recipe
from recserve.converters.stage import ModelState, StageContext
from recserve.data import load_dataset
from recserve.data.schema import Dataset
from recserve.errors import ConfigError, ModelError
from recserve.models.artifact import is_trained_dir, load_trained
from recserve.models.train import TrainSettings


@dataclass
class LoadedModel:
    state: ModelState
    source: Path
    """The ONNX file the model came from (never written to)."""
    preprocessing: Path | None
    data_spec: str | None
    trained: bool


def load_model(path: Path) -> LoadedModel:
    """A ``recserve train`` directory (all stages possible) or a plain ONNX file (post-training stages)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist; pass a `recserve train` output directory or an .onnx file")
    if is_trained_dir(path):
        trained = load_trained(path)
        graph = _read_onnx(path / "model.onnx")
        state = ModelState(trained.kind, graph, trained.module)
        return LoadedModel(state, path / "model.onnx", path / "preprocessing.json", trained.data_spec, True)
    onnx_path = path / "model.onnx" if path.is_dir() else path
    graph = _read_onnx(onnx_path)
    pre, meta = onnx_path.parent / "preprocessing.json", onnx_path.parent / "model.json"
    spec = json.loads(meta.read_text()).get("data_spec") if meta.exists() else None
    return LoadedModel(ModelState(model_kind(graph), graph), onnx_path, pre if pre.exists() else None, spec, False)


def _read_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except FileNotFoundError as e:
        raise ModelError(f"{path} not found") from e
    except Exception as e:  # onnx raises DecodeError, ValidationError, ...
        raise ModelError(f"{path} is not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    return model


def relative_loss(base: float, new: float) -> float:
    return (base - new) / base if base and not math.isnan(base) else float("nan")


def check_gate(gate: Gate, base: Evaluation, result: Evaluation) -> list[str]:
    """Every limit the result breaks, as readable reasons (empty: passed)."""
    reasons = []
    auc_loss = relative_loss(base.auc, result.auc)
    if gate.max_relative_auc_loss is not None and not auc_loss <= gate.max_relative_auc_loss:
        reasons.append(f"relative AUC loss {auc_loss:.5f} > max_relative_auc_loss {gate.max_relative_auc_loss}")
    recall = next((k for k in base.quality if k.startswith("recall@")), None)
    if gate.max_relative_recall_loss is not None and recall:
        loss = relative_loss(base.quality[recall], result.quality[recall])
        if not loss <= gate.max_relative_recall_loss:
            reasons.append(f"relative {recall} loss {loss:.5f} > max_relative_recall_loss {gate.max_relative_recall_loss}")
    if gate.max_logloss_increase is not None and "logloss" in base.quality:
        inc = result.quality["logloss"] - base.quality["logloss"]
        if not inc <= gate.max_logloss_increase:
            reasons.append(f"logloss increase {inc:.5f} > max_logloss_increase {gate.max_logloss_increase}")
    ratio = base.size_bytes / result.size_bytes
    if gate.min_size_ratio is not None and ratio < gate.min_size_ratio:
        reasons.append(f"size ratio {ratio:.2f}x < min_size_ratio {gate.min_size_ratio}x")
    if gate.min_throughput_ratio is not None and base.throughput_b256 and result.throughput_b256:
        t = result.throughput_b256 / base.throughput_b256
        if t < gate.min_throughput_ratio:
            reasons.append(f"throughput ratio {t:.2f}x < min_throughput_ratio {gate.min_throughput_ratio}x")
    return reasons


@dataclass
class StageRecord:
    name: str
    params: dict[str, Any]
    evaluation: Evaluation
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def build_report(model: LoadedModel, recipe: Recipe, data: Dataset, baseline: Evaluation,
                 stages: list[StageRecord], reasons: list[str]) -> dict[str, Any]:
    result = stages[-1].evaluation
    return {
        "model": str(model.source),
        "kind": model.state.kind,
        "recipe": recipe.name,
        "data": data.spec,
        "held_out_rows": len(data.ranking_test) if model.state.kind == "ranker" else len(data.retrieval.test_pairs),
        "baseline": baseline.to_json(),
        "stages": [{"name": s.name, "params": s.params, "seconds": round(s.seconds, 2),
                    "evaluation": s.evaluation.to_json(), "details": s.details} for s in stages],
        "result": result.to_json(),
        "relative_auc_loss": relative_loss(baseline.auc, result.auc),
        "size_ratio": baseline.size_bytes / result.size_bytes,
        "throughput_ratio": (result.throughput_b256 / baseline.throughput_b256
                             if baseline.throughput_b256 and result.throughput_b256 else None),
        "gate": {"passed": not reasons, "reasons": reasons, "limits": recipe.gate.model_dump(exclude_none=True)},
    }


def compress(model_path: Path, recipe: Recipe, out: Path, *, data_spec: str | None = None, speed: bool = True,
             train: TrainSettings | None = None, on_stage: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run ``recipe`` on the model at ``model_path`` and write ``out/model.onnx`` (if the gate passes),
    ``out/report.json`` and ``out/report.png``. Returns the report."""
    model = load_model(model_path)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    if recipe.gate.min_throughput_ratio is not None and not speed:
        raise ConfigError("the gate's min_throughput_ratio needs speed measurements: drop --no-speed or the limit")
    if (out / "model.onnx").resolve() == model.source.resolve():
        raise ConfigError(f"--out {out} would overwrite the input model {model.source}; choose another directory")
    spec = data_spec or recipe.data or model.data_spec
    if not spec:
        raise ConfigError("no evaluation data: pass --data SPEC (e.g. synthetic:50000 or movielens:DIR) "
                          "or set 'data' in the recipe")
    on_stage(f"loading {spec}")
    data = load_dataset(spec, seed=recipe.seed, preprocessing=model.preprocessing)
    ctx = StageContext(data, train or TrainSettings(seed=recipe.seed))
    on_stage("evaluating baseline")
    baseline = evaluate(model.state.graph, model.state.kind, data, speed=speed)
    state, records = model.state, []
    for i, stage in enumerate(recipe.stages):
        on_stage(f"stage {i + 1}/{len(recipe.stages)}: {stage.type}")
        t0 = time.perf_counter()
        state, details = stage.apply(state, ctx)
        seconds = time.perf_counter() - t0
        ev = evaluate(state.graph, state.kind, data, speed=speed)
        records.append(StageRecord(stage.type, stage.model_dump(exclude={"type"}), ev, seconds, details))
    reasons = check_gate(recipe.gate, baseline, records[-1].evaluation)
    report = build_report(model, recipe, data, baseline, records, reasons)
    out.mkdir(parents=True, exist_ok=True)
    if not reasons:
        onnx.save(state.graph, out / "model.onnx")
        target = out / "preprocessing.json"
        if model.preprocessing and model.preprocessing.exists() and model.preprocessing.resolve() != target.resolve():
            shutil.copyfile(model.preprocessing, target)
    else:
        (out / "model.onnx").unlink(missing_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    from recserve.converters.report import plot_report

    plot_report(report, out / "report.png")
    return report


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
