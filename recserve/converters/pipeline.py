"""``recserve compress``: run a recipe's stages (or search for them), choose on validation, gate on
the test split once, and write the result without ever losing a model.

The flow: load the model and the data; check the data fits the model; score the baseline on the
validation split; run the stages (``stages:``) or the budgeted search (``search:`` or a budget
alone); score the result and the baseline on the test split (once); gate; write ``model.onnx``
only when the gate passes, ``report.json`` and ``report.png`` always.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from recserve.converters.evaluate import (
    Evaluation,
    HeldOut,
    Scoring,
    evaluate,
    graph_inputs,
    held_out,
    is_logit,
    model_kind,
    paired_loss,
    quality_of,
    relative_loss,
)
from recserve.converters.feed_check import check_feed
from recserve.converters.recipe import Gate, Recipe
from recserve.converters.report import (
    CandidateReport,
    CompressionReport,
    EvaluationReport,
    GateReport,
    SearchReport,
    StageReport,
    StageStatus,
    ValidationReport,
    plot_report,
)
from recserve.converters.search import Budget, Reference, pareto_front, throughput_ratio, z_for
from recserve.converters.search_run import Built, Search, teacher_shape
from recserve.converters.stage import ModelState, StageContext
from recserve.converters.storage import pack_sparse, storage_note
from recserve.data import load_dataset
from recserve.data.schema import Dataset
from recserve.errors import ConfigError, DataError, ModelError, RecserveError
from recserve.models.artifact import is_trained_dir, load_trained
from recserve.models.export import RANKER_OUTPUTS
from recserve.models.train import TrainSettings
from recserve.onnxrt import session
from recserve.outdir import check_out as check_outdir
from recserve.provenance import sha256_hex
from recserve.timing import interleaved, paired_ratio

OUTPUT_FILES = ("model.onnx", "preprocessing.json", "report.json", "report.png", "search.log")
REJECTED = ("rejected-report.json", "rejected-report.png")
"""Where a failing gate's report goes when the directory already holds a model (``--force``)."""


@dataclass
class LoadedModel:
    graph: onnx.ModelProto
    module: nn.Module | None
    source: Path
    """The ONNX file the model came from (never written to)."""
    preprocessing: Path | None
    data_spec: str | None
    trained: bool

    @property
    def recserve_kind(self) -> str | None:
        """``ranker``/``two-tower`` for a graph with recserve's inputs, else None (a model of the user's own)."""
        try:
            return model_kind(self.graph)
        except ModelError:
            return None


def load_model(path: Path) -> LoadedModel:
    """A ``recserve train`` directory (all stages possible) or a plain ONNX file (post-training stages)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist; pass a `recserve train` output directory or an .onnx file")
    if is_trained_dir(path):
        trained = load_trained(path)
        graph = _read_onnx(path / "model.onnx")
        return LoadedModel(graph, trained.module, path / "model.onnx", path / "preprocessing.json",
                           trained.data_spec, True)
    onnx_path = path / "model.onnx" if path.is_dir() else path
    graph = _read_onnx(onnx_path)
    pre, meta = onnx_path.parent / "preprocessing.json", onnx_path.parent / "model.json"
    spec = None
    if meta.exists():
        try:
            spec = json.loads(meta.read_text()).get("data_spec")
        except (ValueError, AttributeError):
            spec = None
    return LoadedModel(graph, None, onnx_path, pre if pre.exists() else None, spec, False)


def _read_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except FileNotFoundError as e:
        raise ModelError(f"{path} not found") from e
    except Exception as e:  # onnx raises DecodeError, ValidationError, ...
        raise ModelError(f"{path} is not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    return model


def check_out(out: Path, model: LoadedModel, force: bool) -> None:
    """Refuse an output directory that would lose or mix up a model, before any work is done."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    if not out.exists():
        return
    if (out / "model.onnx").resolve() == model.source.resolve() or model.source.parent.resolve() == out.resolve():
        raise ConfigError(f"--out {out} holds the input model {model.source}; compress into a new directory")
    if is_trained_dir(out):
        raise ConfigError(f"--out {out} is a `recserve train` output (model.pt, model.json); compress into a new "
                          "directory so the trained model stays whole")
    check_outdir(out, force, OUTPUT_FILES + REJECTED, "recserve compress")


def scoring_for(model: LoadedModel, data: Dataset, score_output: str | None) -> Scoring:
    """How the model is scored on this data; DataError/ModelError when the two do not fit."""
    outputs = [o.name for o in model.graph.graph.output]
    if score_output is not None and score_output not in outputs:
        raise ModelError(f"--score-output {score_output!r} is not an output of the model (it has {outputs})")
    if data.name == "tensors":
        if score_output is None:
            if len(outputs) != 1:
                raise ModelError(f"the model has outputs {outputs}: name the one holding the score with --score-output")
            score_output = outputs[0]
        for rows in (data.ranking_train, data.ranking_test):
            check_feed(model.graph, rows.inputs(), data.spec)
        return Scoring("ranker", score_output)
    kind = model_kind(model.graph)
    if kind == "ranker" and score_output not in (None, RANKER_OUTPUTS[0]):
        raise ModelError("a recserve ranker's score is its 'score' output; --score-output is for models of your own")
    if not model.trained and model.preprocessing is None:
        raise ConfigError(
            f"{model.source} has no preprocessing.json beside it, so recserve cannot know the ids and dense scaling "
            f"it was trained with (it takes {sorted(graph_inputs(model.graph))}). Put the preprocessing.json written "
            "with it beside it, or pass its inputs as they are with --data tensors:PATH (.npz or .parquet)")
    return Scoring(kind)


@dataclass
class Prepared:
    model: LoadedModel
    data: Dataset
    ctx: StageContext
    baseline: Evaluation
    """On the validation split."""


def prepare(model_path: Path, recipe: Recipe, out: Path, *, data_spec: str | None, speed: bool,
            train: TrainSettings | None, score_output: str | None, force: bool,
            on_stage: Callable[[str], None]) -> Prepared:
    model = load_model(model_path)
    out = Path(out)
    check_out(out, model, force)
    gate = recipe.gate
    if gate.min_throughput_ratio is not None and not speed:
        raise ConfigError("the gate's min_throughput_ratio needs speed measurements: drop --no-speed or the limit")
    if recipe.search is not None and recipe.search.objective == "throughput" and not speed:
        raise ConfigError("--objective throughput needs speed measurements: drop --no-speed")
    spec = data_spec or recipe.data or model.data_spec
    if not spec:
        raise ConfigError("no evaluation data: pass --data SPEC (e.g. synthetic:50000, movielens:DIR, or "
                          "tensors:PATH for a model of your own) or set 'data' in the recipe")
    on_stage(f"loading {spec}")
    pre = model.preprocessing if not spec.strip().lower().startswith("tensors:") else None
    data = load_dataset(spec, seed=recipe.seed, preprocessing=pre)
    scoring = scoring_for(model, data, score_output)
    ctx = StageContext(data, scoring, train or TrainSettings(seed=recipe.seed))
    on_stage("evaluating the baseline on the validation split")
    baseline = evaluate(model.graph, scoring, ctx.validation, speed=speed)
    if scoring.kind == "ranker":
        bad = int((~np.isfinite(baseline.units)).sum())
        if bad:
            raise DataError(f"the model scores {bad:,} of {len(baseline.units):,} validation rows as NaN or inf; "
                            "check the inputs (missing values?) before compressing")
        if is_logit(baseline.units):
            ctx.scoring = replace(scoring, logits=True)
            baseline.quality = quality_of(baseline.units, baseline.units, ctx.scoring, ctx.validation)
    return Prepared(model, data, ctx, baseline)


def check_gate(gate: Gate, base: Evaluation, result: Evaluation, thr_ratio: float | None = None) -> list[str]:
    """Every limit the result breaks on the test split, as readable reasons (empty: passed).

    ``thr_ratio``: the paired throughput ratio, when measured; else the ratio of the two evaluations'.
    """
    reasons = []
    if thr_ratio is None and base.throughput_b256 and result.throughput_b256:
        thr_ratio = result.throughput_b256 / base.throughput_b256
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
    if gate.min_throughput_ratio is not None and thr_ratio is not None and thr_ratio < gate.min_throughput_ratio:
        reasons.append(f"throughput ratio {thr_ratio:.2f}x < min_throughput_ratio {gate.min_throughput_ratio}x")
    distinct = result.quality.get("distinct_score_ratio")
    if gate.min_distinct_score_ratio is not None and distinct is not None \
            and not distinct >= gate.min_distinct_score_ratio:
        reasons.append(f"distinct score ratio {distinct:.3f} < min_distinct_score_ratio "
                       f"{gate.min_distinct_score_ratio} (the scores no longer rank)")
    return reasons


def compare_speed(base: onnx.ModelProto, result: onnx.ModelProto, held: HeldOut) -> dict[str, float]:
    """Batch-1 latency and batch-256 rows/s of both models, interleaved in one run; the paired ratio."""
    sb, sr = session(base), session(result)
    one, big = held.feed(1), held.feed(256)
    lat = interleaved({"base": lambda: sb.run(None, one), "result": lambda: sr.run(None, one)}, rounds=5, seconds=0.2)
    thr = interleaved({"base": lambda: sb.run(None, big), "result": lambda: sr.run(None, big)}, rounds=5, seconds=0.2)
    return {"base_latency_ms": float(np.median(lat["base"]) * 1e3), "result_latency_ms": float(np.median(lat["result"]) * 1e3),
            "base_rows_per_s": 256 / float(np.median(thr["base"])), "result_rows_per_s": 256 / float(np.median(thr["result"])),
            "ratio": paired_ratio(thr["base"], thr["result"])}


def _ev(e: Evaluation) -> EvaluationReport:
    return EvaluationReport.model_validate(e.to_json())


def compress(model_path: Path, recipe: Recipe, out: Path, *, data_spec: str | None = None, speed: bool = True,
             train: TrainSettings | None = None, score_output: str | None = None, force: bool = False,
             on_stage: Callable[[str], None] = lambda _: None) -> CompressionReport:
    """Run ``recipe`` (its stages, or its search) on the model at ``model_path``; write ``out/model.onnx``
    (if the gate passes), ``out/report.json`` and ``out/report.png``. Returns the report."""
    out = Path(out)
    p = prepare(model_path, recipe, out, data_spec=data_spec, speed=speed, train=train, score_output=score_output,
                force=force, on_stage=on_stage)
    teacher = ModelState(p.ctx.scoring.kind, p.model.graph, p.model.module)
    search_report, candidates, log_lines, failure = None, [], [], None
    if recipe.search is not None:
        final, stages, search_report, candidates, log_lines = _search(teacher, p, recipe, speed, on_stage)
    else:
        final, stages, failure = _stages(teacher, p, recipe, speed, on_stage)
    on_stage("scoring the result on the test split")
    test = held_out(p.data, p.ctx.scoring.kind, "test")
    served, storage = pack_sparse(final.graph)
    base_test = evaluate(p.model.graph, p.ctx.scoring, test, speed=False)
    result_test = evaluate(served, p.ctx.scoring, test, speed=False)
    thr_ratio = None
    if speed:
        s = compare_speed(p.model.graph, served, test)
        base_test.latency_ms_b1, base_test.throughput_b256 = s["base_latency_ms"], s["base_rows_per_s"]
        result_test.latency_ms_b1, result_test.throughput_b256 = s["result_latency_ms"], s["result_rows_per_s"]
        thr_ratio = s["ratio"]
    val_result = evaluate(served, p.ctx.scoring, p.ctx.validation, speed=False)
    val_loss, val_se = paired_loss(p.baseline, val_result, p.ctx.validation)
    _, se = paired_loss(base_test, result_test, test)
    reasons = check_gate(recipe.gate, base_test, result_test, thr_ratio)
    if failure is not None:
        reasons.insert(0, f"stage {stages.index(next(s for s in stages if s.status == StageStatus.FAIL)) + 1} failed: "
                          f"{failure}")
    pareto = _pareto(candidates, p, test, search_report)
    report = CompressionReport(
        model=str(p.model.source), kind=p.ctx.scoring.kind, mode="search" if recipe.search else "recipe",
        recipe=recipe.name, data=p.data.spec, corrupt_rows=p.data.corrupt_rows,
        score_output=p.ctx.scoring.score_output if p.ctx.scoring.kind == "ranker" else None,
        score_kind="logit" if p.ctx.scoring.logits else "probability",
        held_out_rows=len(test), baseline=_ev(base_test), stages=stages, result=_ev(result_test),
        relative_auc_loss=relative_loss(base_test.auc, result_test.auc), relative_auc_loss_se=se,
        size_ratio=base_test.size_bytes / result_test.size_bytes, throughput_ratio=thr_ratio,
        distinct_score_ratio=result_test.quality.get("distinct_score_ratio", float("nan")),
        gate=GateReport(passed=not reasons, reasons=reasons, limits=recipe.gate.model_dump(exclude_none=True)),
        validation=ValidationReport(rows=len(p.ctx.validation), baseline=_ev(p.baseline), result=_ev(val_result),
                                    relative_auc_loss=val_loss, relative_auc_loss_se=val_se),
        pareto=pareto, search=search_report,
        storage=storage_note(storage, any(s.name == "prune" for s in stages)))
    write_outputs(out, report, served if report.gate.passed else None, p.model.preprocessing, log_lines)
    if failure is not None:
        raise failure
    return report


def _stages(teacher: ModelState, p: Prepared, recipe: Recipe, speed: bool,
            on_stage: Callable[[str], None]) -> tuple[ModelState, list[StageReport], RecserveError | None]:
    """The recipe's stages in order, each scored on validation. A failing stage is recorded (FAIL, the
    rest SKIPPED) and returned, so the report shows it before the error is raised."""
    state, records = teacher, []
    for i, stage in enumerate(recipe.stages):
        on_stage(f"stage {i + 1}/{len(recipe.stages)}: {stage.type}")
        params = stage.model_dump(exclude={"type"})
        t0 = time.perf_counter()
        try:
            state, details = stage.apply(state, p.ctx)
        except RecserveError as e:
            records.append(StageReport(name=stage.type, params=params, status=StageStatus.FAIL, error=str(e),
                                       seconds=round(time.perf_counter() - t0, 2)))
            records += [StageReport(name=s.type, params=s.model_dump(exclude={"type"}), status=StageStatus.SKIPPED)
                        for s in recipe.stages[i + 1:]]
            return state, records, e
        seconds = time.perf_counter() - t0
        served, _ = pack_sparse(state.graph)
        ev = evaluate(served, p.ctx.scoring, p.ctx.validation, speed=speed)
        records.append(StageReport(name=stage.type, params=params, seconds=round(seconds, 2), evaluation=_ev(ev),
                                   details=details))
    return state, records, None


def _search(teacher: ModelState, p: Prepared, recipe: Recipe, speed: bool, on_stage: Callable[[str], None]):
    spec, gate = recipe.search, recipe.gate
    test_rows = len(held_out(p.data, p.ctx.scoring.kind, "test"))  # its size only: the split stays unread
    budget = Budget(gate.max_relative_auc_loss, z_for(spec.confidence), len(p.ctx.validation) / test_rows,
                    gate.min_distinct_score_ratio, gate.min_size_ratio, gate.min_throughput_ratio)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        on_stage(line)

    log(f"search: objective {spec.objective}, budget {budget.max_relative_loss:.3%} relative AUC loss, "
        f"{spec.confidence:.0%} confidence, {len(p.ctx.validation):,} validation rows, time budget "
        f"{spec.time_budget_s:.0f} s")
    search = Search(teacher, p.ctx, spec, budget, p.baseline, speed=speed, shape=teacher_shape(teacher, p.ctx), log=log)
    outcome = search.run()
    chosen = outcome.chosen or search.root
    log(f"chose: {chosen.name} ({outcome.why}); {len(outcome.built)} candidates in {outcome.seconds:.0f} s")
    stages = []
    for b in chosen.chain():
        st = b.stages[-1]
        stages.append(StageReport(name=st.type, params=st.model_dump(exclude={"type"}), seconds=round(b.seconds, 2),
                                  evaluation=_ev(b.evaluation), details=b.details))
    ref = Reference(p.baseline.size_bytes, p.baseline.throughput_b256)
    reports = [_candidate(b, ref, b is chosen) for b in outcome.built]
    report = SearchReport(objective=spec.objective, time_budget_s=spec.time_budget_s, seconds=round(outcome.seconds, 1),
                          stopped=outcome.stopped, confidence=spec.confidence, chosen=chosen.name, candidates=reports,
                          recipe={"name": f"{recipe.name}-found", "stages": [
                              s.model_dump(exclude_defaults=True) | {"type": s.type} for s in chosen.stages]})
    return chosen.state, stages, report, outcome.built, lines


def _candidate(b: Built, ref: Reference, chosen: bool) -> CandidateReport:
    m = b.measure
    return CandidateReport(
        name=b.name, stages=[s.model_dump(exclude_defaults=True) | {"type": s.type} for s in b.stages],
        status=b.status, reasons=b.reasons, seconds=round(b.seconds, 2), chosen=chosen,
        size_bytes=m.size_bytes if m else None, size_ratio=ref.size_bytes / m.size_bytes if m else None,
        throughput_b256=m.throughput if m else None, throughput_ratio=throughput_ratio(m, ref) if m else None,
        validation_auc=m.auc if m else None, validation_relative_loss=m.loss if m else None,
        validation_relative_loss_se=m.se if m else None, distinct_score_ratio=m.distinct if m else None)


def _pareto(built: list[Built], p: Prepared, test: HeldOut, search: SearchReport | None) -> list[CandidateReport]:
    """The search's Pareto front, each scored on the test split after the choice (for the report only)."""
    if search is None:
        return []
    front = pareto_front([b.measure for b in built])
    out = []
    for i in front:
        c = search.candidates[i].model_copy()
        served, _ = pack_sparse(built[i].state.graph)
        c.test_auc = evaluate(served, p.ctx.scoring, test, speed=False).auc
        out.append(c)
    return sorted(out, key=lambda c: c.size_bytes or 0)


def write_outputs(out: Path, report: CompressionReport, model: onnx.ModelProto | None, preprocessing: Path | None,
                  log_lines: list[str]) -> None:
    """Write every file to a staging folder beside ``out``, then move each into place.

    A passing gate replaces the model (``--force``) only after its report is complete; a failing
    gate never touches a model already there: its report goes to ``rejected-report.json``.
    """
    out.mkdir(parents=True, exist_ok=True)
    keep_model = model is None and (out / "model.onnx").exists()
    names = dict(zip(("report.json", "report.png"), REJECTED)) if keep_model else {}
    data = model.SerializeToString() if model is not None else None
    if data is not None:
        report.model_sha256 = sha256_hex(data)  # what `recserve build` and the operator check the file against
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stage = Path(tmp)
        report.write(stage / "report.json")
        plot_report(report, stage / "report.png")
        if log_lines:
            (stage / "search.log").write_text("\n".join(log_lines) + "\n")
        if data is not None:
            (stage / "model.onnx").write_bytes(data)  # the bytes model_sha256 names (what onnx.save writes)
            if preprocessing is not None and preprocessing.exists():
                shutil.copyfile(preprocessing, stage / "preprocessing.json")
        for f in sorted(stage.iterdir(), key=lambda f: f.name == "model.onnx"):  # the model last
            os.replace(f, out / names.get(f.name, f.name))
    if model is not None:
        for stale in REJECTED:
            (out / stale).unlink(missing_ok=True)
