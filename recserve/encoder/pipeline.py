"""``recserve compress ENCODER_DIR --recipe FILE``: a text encoder through a recipe's stages, judged on the
held-out queries.

Each stage reads the encoder directory the last one wrote and writes a new one (model.onnx, tokenizer.json,
encoder.json) in a scratch directory; the stages learn only from the tuning half of the queries and the
catalog's titles (distillation also chooses its kept layers and epoch on a fifth of the tuning queries). The
held-out half is used once, for the report: NDCG@10 and recall@10 against the graded labels, top-10 overlap
and cosine with the encoder the recipe started from, bytes, and CPU latency (batch 1) and throughput (batch
64) at 16 tokens, the two encoders measured interleaved in one run. The output is written only when the
gate passes; a stage that fails is recorded (FAIL, the rest SKIPPED) in a report that is written all the
same, and its error raised after.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from recserve.converters.report import GateReport, StageReport, StageStatus
from recserve.data.search import SearchData, load_search
from recserve.encoder.artifact import FILES, INFO_FILE, INPUTS, MODEL_FILE, TOKENIZER_FILE, Parity, load_info
from recserve.encoder.evaluate import Encoder, judge, speeds
from recserve.encoder.export import CHECK_TEXTS, ExportResult, _write
from recserve.encoder.quantize import Mode, Quantized, needs_calibration, quantize_graph
from recserve.encoder.recipe import DistillStage, EncoderGate, EncoderRecipe, PruneVocabStage, QuantizeStage
from recserve.encoder.report import EncoderMeasure, EncoderReport
from recserve.encoder.text import TextTokenizer
from recserve.encoder.vocab import prune_vocab
from recserve.errors import ConfigError, RecserveError, StageError
from recserve.onnxrt import session
from recserve.outdir import check_out
from recserve.provenance import sha256_hex

REPORT_FILE = "report.json"
REJECTED = "rejected-report.json"
OUTPUT_FILES = (*FILES, REPORT_FILE, REJECTED)
COMMAND = "recserve compress"
SEQ_LEN = 16
"""Tokens per text for the speed figures (a typical query)."""


def tuning_texts(data: SearchData, seed: int, limit: int | None = None) -> list[str]:
    """The tuning half's queries and every title, deduplicated and shuffled with ``seed`` (the first ``limit``)."""
    tuning, _ = data.split(held_out=False)
    texts = sorted(set(tuning) | set(data.titles))
    random.Random(seed).shuffle(texts)
    return texts[:limit] if limit else texts


def derive(src: Path, out: Path, files: dict[str, bytes], step: str, check: list[str] | None = None,
           parameters: int | None = None) -> ExportResult:
    """A new encoder directory ``out`` from ``src`` with ``files`` replaced and ``step`` added to its
    ``compression`` (and ``parameters`` when they changed); its parity is measured against ``src`` on ``check``
    texts (the export's by default)."""
    info = load_info(src)
    merged = {name: files.get(name) or (Path(src) / name).read_bytes() for name in (MODEL_FILE, TOKENIZER_FILE)}
    texts = list(check or CHECK_TEXTS)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in merged.items():
            (Path(tmp) / name).write_bytes(data)
        want = _embed(Path(src) / MODEL_FILE, TextTokenizer.of(src, info), texts)
        got = _embed(Path(tmp) / MODEL_FILE, TextTokenizer(Path(tmp) / TOKENIZER_FILE, info.max_seq_length), texts)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)).clip(1e-12)
    new = info.model_copy(update={
        "source": str(Path(src).resolve()), "compression": [*info.compression, step],
        "parameters": info.parameters if parameters is None else parameters,
        "parity": Parity(texts=len(texts), max_abs_diff=float(np.abs(got - want).max()), min_cosine=float(cos.min()))})
    _write(out, {**merged, INFO_FILE: (new.model_dump_json(indent=2) + "\n").encode()})
    return ExportResult(out, new, len(merged[MODEL_FILE]))


def _embed(model: Path, tokenizer: TextTokenizer, texts: list[str]) -> np.ndarray:
    sess = session(model.read_bytes())
    return np.concatenate([sess.run(None, dict(zip(INPUTS, tokenizer.encode(texts[i:i + 64]))))[0]
                           for i in range(0, len(texts), 64)])


def quantize_encoder(src: Path, out: Path, mode: Mode, calibration: list[str] | None = None,
                     outlier_ratio: float | None = None) -> tuple[ExportResult, Quantized]:
    """The encoder at ``src`` in ``mode`` (recserve.encoder.quantize), written to the new directory ``out``."""
    q = quantize_graph(src, mode, TextTokenizer.of(src), calibration, outlier_ratio)
    step = mode.replace("_", "-") + (f" ({q.float_channels} outlier channels float)" if outlier_ratio else "")
    return derive(src, out, {MODEL_FILE: q.model}, step), q


def _run_stage(stage, src: Path, out: Path, data: SearchData, seed: int, progress: Callable[[str], None]) -> dict:
    """One stage from the encoder at ``src`` into ``out``; returns what it reports."""
    if isinstance(stage, DistillStage):
        from recserve.encoder.distill import DistillSettings, distill_encoder
        from recserve.encoder.export import PACKAGED

        info = load_info(src)
        if info.compression:
            raise StageError(f"distill starts from an exported teacher; {src} is already compressed "
                             f"({', '.join(info.compression)})")
        teacher = None if info.source == PACKAGED else Path(info.source)
        settings = DistillSettings(**stage.model_dump(exclude={"type"}), seed=seed)  # the stage's fields are settings
        _, r = distill_encoder(out, data, teacher, settings, progress=progress)
        per_epoch = "validation_top10_agreement" if stage.ranking_weight > 0 else "validation_cosine"
        return {"kept_layers": r.kept_layers, "candidates": r.candidates, per_epoch: r.epochs,
                "best_epoch": r.best_epoch, "train_texts": r.train_texts, "validation_texts": r.validation_texts}
    if isinstance(stage, PruneVocabStage):
        texts = tuning_texts(data, seed)
        info = load_info(src)
        files, r = prune_vocab(src, texts, info)
        result = derive(src, out, files, f"prune-vocab: {r.after:,} of {r.before:,} tokens", check=texts[:256],
                        parameters=info.parameters - (r.before - r.after) * info.dim)
        return {"vocabulary_before": r.before, "vocabulary_after": r.after, "tokens_used": r.used,
                "texts": r.texts, "parity_min_cosine": result.info.parity.min_cosine}
    if isinstance(stage, QuantizeStage):
        calibration = (tuning_texts(data, seed, stage.calibration_texts)
                       if needs_calibration(stage.mode, stage.outlier_ratio) else None)
        result, q = quantize_encoder(src, out, stage.mode, calibration, stage.outlier_ratio)
        return {"mode": stage.mode, "parity_min_cosine": result.info.parity.min_cosine,
                **({"float_channels": q.float_channels} if stage.outlier_ratio is not None else {})}
    raise StageError(f"unknown stage {stage!r}")


def _run_stages(model: Path, stages: list, seed: int, data: SearchData, work: Path, progress: Callable[[str], None]
                ) -> tuple[Path, list[StageReport], RecserveError | None]:
    current, records, failure = model, [], None
    for i, stage in enumerate(stages):
        params = stage.model_dump(exclude={"type"})
        if failure is not None:
            records.append(StageReport(name=stage.type, params=params, status=StageStatus.SKIPPED))
            continue
        progress(f"stage {i + 1}/{len(stages)}: {stage.type}")
        t0 = time.perf_counter()
        target = work / f"{i + 1}-{stage.type}"
        try:
            details = _run_stage(stage, current, target, data, seed, progress)
        except RecserveError as e:
            failure = e
            records.append(StageReport(name=stage.type, params=params, status=StageStatus.FAIL, error=str(e),
                                       seconds=time.perf_counter() - t0))
            continue
        records.append(StageReport(name=stage.type, params=params, details=details, seconds=time.perf_counter() - t0))
        current = target
    return current, records, failure


def check_gate(gate: EncoderGate, report: EncoderReport) -> list[str]:
    """Why the compressed encoder fails ``gate`` (empty: it passes)."""
    reasons = []
    if gate.max_relative_ndcg_loss is not None and report.relative_ndcg_loss > gate.max_relative_ndcg_loss:
        reasons.append(f"relative NDCG@10 loss {report.relative_ndcg_loss:.2%} > {gate.max_relative_ndcg_loss:.2%}")
    if gate.min_teacher_overlap_at_10 is not None and report.teacher_overlap_at_10 < gate.min_teacher_overlap_at_10:
        reasons.append(f"top-10 overlap with the teacher {report.teacher_overlap_at_10:.3f} < "
                       f"{gate.min_teacher_overlap_at_10}")
    if gate.min_size_ratio is not None and report.size_ratio < gate.min_size_ratio:
        reasons.append(f"size ratio {report.size_ratio:.2f}x < {gate.min_size_ratio}x")
    if gate.min_throughput_ratio is not None and report.throughput_ratio < gate.min_throughput_ratio:
        reasons.append(f"throughput ratio {report.throughput_ratio:.2f}x < {gate.min_throughput_ratio}x")
    return reasons


def measure(teacher: Path, result: Path, data: SearchData, rounds: int = 5, catalog: str = "self"
            ) -> tuple[EncoderMeasure, EncoderMeasure, int]:
    """Both encoders on the held-out queries and both speeds (interleaved); and how many queries were judged.
    ``catalog``: who embeds the titles (:func:`recserve.encoder.evaluate.judge`)."""
    encoders = {"teacher": Encoder(teacher), "result": Encoder(result)}
    quality = judge(encoders, data, teacher="teacher", catalog=catalog)
    queries, _ = data.split(held_out=True)
    speed = speeds(encoders, queries[:64] or ["query"], seq_len=SEQ_LEN, rounds=rounds)
    out = []
    for name, enc in encoders.items():
        q = quality[name]
        vocab = _vocabulary(enc.directory)
        out.append(EncoderMeasure(
            bytes=q["bytes"], parameters=q["parameters"], layers=enc.info.layers, vocabulary=vocab,
            ndcg_at_10=q["ndcg_at_10"], recall_at_10=q["recall_at_10"], teacher_overlap_at_10=q["teacher_overlap_at_10"],
            mean_cosine=q["mean_cosine"], ms_b1=speed[name][1].ms_per_batch, texts_per_s_b64=speed[name][64].texts_per_s))
    return out[0], out[1], int(quality["teacher"]["queries"])


def _vocabulary(directory: Path) -> int | None:
    import json

    vocab = (json.loads((Path(directory) / TOKENIZER_FILE).read_text()).get("model") or {}).get("vocab")
    return len(vocab) if isinstance(vocab, dict) else None


def compress_encoder(model: Path, recipe: EncoderRecipe, out: Path, *, data_spec: str | None = None,
                     force: bool = False, progress: Callable[[str], None] = lambda _: None) -> EncoderReport:
    """Run ``recipe`` on the encoder at ``model`` (see the module's docstring); write ``out`` and return the report."""
    model, out = Path(model), Path(out)
    load_info(model)
    check_out(out, force, OUTPUT_FILES, COMMAND)
    spec = data_spec or recipe.data
    if spec is None:
        raise ConfigError("say which search data the encoder is judged on: --data search:PATH[,query=COL,...] "
                          "(or synthetic), or `data:` in the recipe")
    progress(f"loading {spec}")
    data = load_search(spec, recipe.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work.") as tmp:
        search = None
        if recipe.search is not None:
            from recserve.encoder.search import run_search

            def build(stages: list, fit: SearchData, target: Path) -> tuple[Path, list[StageReport]]:
                final, records, failure = _run_stages(model, stages, recipe.seed, fit, target, progress)
                if failure is not None:
                    raise failure
                return final, records

            final, stages, search = run_search(model, recipe, data, Path(tmp), build, progress)
            failure = None
        else:
            final, stages, failure = _run_stages(model, recipe.stages, recipe.seed, data, Path(tmp), progress)
        progress("evaluating on the held-out queries")
        teacher, result, queries = measure(model, final, data, catalog=recipe.catalog)
        info = load_info(final)
        report = EncoderReport(
            model=str(model), recipe=recipe.name, data=spec, products=len(data.titles), held_out_queries=queries,
            catalog=recipe.catalog,
            teacher=teacher, result=result, stages=stages, size_ratio=teacher.bytes / result.bytes,
            throughput_ratio=result.texts_per_s_b64 / teacher.texts_per_s_b64,
            relative_ndcg_loss=1 - result.ndcg_at_10 / teacher.ndcg_at_10 if teacher.ndcg_at_10 else 0.0,
            teacher_overlap_at_10=result.teacher_overlap_at_10, compression=info.compression, search=search,
            gate=GateReport(passed=False, limits=recipe.gate.model_dump(exclude_none=True)))
        reasons = check_gate(recipe.gate, report)
        if failure is not None:
            n = next(i for i, s in enumerate(stages) if s.status == StageStatus.FAIL) + 1
            reasons.insert(0, f"stage {n} failed: {failure}")
        report.gate = report.gate.model_copy(update={"passed": not reasons, "reasons": reasons})
        _write_outputs(out, report, final if report.gate.passed else None)
    if failure is not None:
        raise failure
    return report


def _write_outputs(out: Path, report: EncoderReport, encoder: Path | None) -> None:
    """A passing encoder replaces ``out`` whole (its files, then the report); a failing one never touches an
    encoder already there: its report goes beside it as ``rejected-report.json``."""
    if encoder is not None:
        files = {name: (encoder / name).read_bytes() for name in FILES}
        report.model_sha256 = sha256_hex(files[MODEL_FILE])
        _write(out, {**files, REPORT_FILE: report.model_dump_json(indent=2).encode()})
        return
    out.mkdir(parents=True, exist_ok=True)
    name = REJECTED if (out / MODEL_FILE).exists() else REPORT_FILE
    staging = out / f".{name}.tmp"
    report.write(staging)
    os.replace(staging, out / name)
    if name == REPORT_FILE:
        (out / REJECTED).unlink(missing_ok=True)
