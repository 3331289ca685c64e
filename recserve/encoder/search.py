"""The budgeted search for a text encoder: the cheapest compressed encoder that keeps the gate's NDCG budget,
chosen on validation queries and measured once, after, on the held-out half.

- **Validation.** ``validation_share`` of the tuning half's queries (by a hash of their text) are set aside:
  no candidate trains on them (distillation learns from the other tuning queries and the titles), and every
  candidate is judged on them against the whole catalog, as the report judges the held-out half.
- **Candidates**, cheapest first: for each student in ``students`` (fewer layers first: smaller and faster),
  distillation -> vocabulary pruning (if asked) -> quantization; then the teacher's own layers pruned and
  quantized. Later candidates are larger and slower by construction, so the search stops at the first that is
  accepted and meets the size and throughput limits, or when its time budget is spent.
- **Acceptance** follows the ranker search (``recserve.converters.search``): the relative NDCG@10 loss on
  validation plus ``z`` standard errors (paired over queries; the test half's error counted too) within the
  budget, and the top-10 overlap with the teacher at least the gate's.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from recserve.converters.search import Budget, Measure, Reference, choose, limit_reasons, quality_reasons, z_for
from recserve.data.search import SearchData
from recserve.encoder.artifact import load_info
from recserve.encoder.evaluate import Encoder, per_query, speeds, teacher_agreement, top_k
from recserve.encoder.recipe import DistillStage, EncoderRecipe, PruneVocabStage, QuantizeStage
from recserve.encoder.report import EncoderCandidate, EncoderSearchReport
from recserve.errors import RecserveError


def validation_split(data: SearchData, share: float, seed: int) -> tuple[SearchData, SearchData]:
    """(what candidates learn from, what they are judged on): the same data with the tuning half's validation
    queries marked held out in the first (never trained on) and only those marked held out in the second."""
    def picked(q: str) -> bool:
        h = int.from_bytes(hashlib.sha1(f"validation\0{seed}\0{q}".encode()).digest()[:8], "big")
        return h / 2**64 < share

    val = np.array([not h and picked(q) for q, h in zip(data.queries, data.held_out)], dtype=bool)
    return replace(data, held_out=data.held_out | val), replace(data, held_out=val)


def candidates(recipe: EncoderRecipe, teacher_layers: int) -> list[tuple[str, list]]:
    """(name, stages) of every candidate, cheapest first (see the module's docstring)."""
    s = recipe.search
    tail = ([PruneVocabStage()] if s.prune_vocab else []) + [QuantizeStage(mode=s.quantize)]
    out = []
    for layers in sorted(n for n in set(s.students) if n < teacher_layers):
        distill = DistillStage(layers=layers, **s.distill.model_dump(exclude={"type", "layers"}))
        out.append((f"{layers} layer{'s' if layers > 1 else ''}", [distill, *tail]))
    out.append((f"{teacher_layers} layers (no distillation)", tail))
    return out


class Judge:
    """Candidates against the teacher on the validation queries: quality with its standard error, and speed."""

    def __init__(self, teacher: Path, val: SearchData, catalog: str = "self"):
        self.teacher = Encoder(teacher)
        self.catalog = catalog
        """``teacher``: every candidate's queries against the teacher's embeddings of the titles (see
        :func:`recserve.encoder.evaluate.judge`)."""
        self.queries, self.judgments = val.split(held_out=True)
        self.corpus = self.teacher.embed(val.titles)
        self.embedded = self.teacher.embed(self.queries)
        self.top = top_k(self.embedded, self.corpus)
        self.ndcg, _ = per_query(self.top, self.judgments)
        self.titles = val.titles
        self.reference = Reference(self.teacher.bytes(), None)
        """The teacher's bytes and speed (measured again beside each candidate, interleaved with it)."""

    def measure(self, directory: Path) -> tuple[Measure, float]:
        """(the candidate's Measure, its top-10 overlap with the teacher)."""
        enc = Encoder(directory)
        embedded = enc.embed(self.queries)
        top = top_k(embedded, self.corpus if self.catalog == "teacher" else enc.embed(self.titles))
        ndcg, _ = per_query(top, self.judgments)
        base = float(self.ndcg.mean()) if len(self.ndcg) else 0.0
        diff = self.ndcg - ndcg
        loss = float(diff.mean()) / base if base else 0.0
        se = float(diff.std(ddof=1) / math.sqrt(len(diff))) / base if base and len(diff) > 1 else float("nan")
        overlap = teacher_agreement(top, self.top, embedded, self.embedded)["teacher_overlap_at_10"]
        speed = speeds({"teacher": self.teacher, "candidate": enc}, self.queries[:64] or ["query"], batches=(64,),
                       rounds=3)
        m = Measure(size_bytes=enc.bytes(), throughput=speed["candidate"][64].texts_per_s, loss=loss, se=se,
                    distinct=1.0, auc=float(ndcg.mean()) if len(ndcg) else 0.0)
        self.reference = Reference(self.teacher.bytes(), speed["teacher"][64].texts_per_s)
        return m, overlap


def run_search(model: Path, recipe: EncoderRecipe, data: SearchData, work: Path,
               run_stages: Callable, progress: Callable[[str], None]) -> tuple[Path, list, EncoderSearchReport]:
    """Build and judge the candidates (``run_stages(stages, fit_data, directory)`` builds one, or raises); returns
    the chosen one's directory, its stage reports, and the search's report."""
    s, gate = recipe.search, recipe.gate
    fit, val = validation_split(data, s.validation_share, recipe.seed)
    progress("the teacher on the validation queries")
    judge = Judge(model, val, recipe.catalog)
    budget = Budget(max_relative_loss=gate.max_relative_ndcg_loss if gate.max_relative_ndcg_loss is not None
                    else math.inf, z=z_for(s.confidence),
                    test_to_validation=len(judge.ndcg) / max(1, int(data.held_out.sum())),
                    min_distinct_score_ratio=None, min_size_ratio=gate.min_size_ratio,
                    min_throughput_ratio=gate.min_throughput_ratio)
    start = time.perf_counter()
    built: list[tuple[Path, list]] = []
    measures: list[Measure | None] = []
    accepted: list[bool] = []
    report: list[EncoderCandidate] = []
    for i, (name, stages) in enumerate(candidates(recipe, load_info(model).layers)):
        if time.perf_counter() - start > s.time_budget_s:
            break
        progress(f"candidate {i + 1}: {name}")
        t0 = time.perf_counter()
        target = work / f"candidate-{i + 1}"
        target.mkdir()
        try:
            final, records = run_stages(stages, fit, target)
        except RecserveError as e:
            report.append(EncoderCandidate(name=name, status="failed", reasons=[str(e)],
                                           seconds=time.perf_counter() - t0))
            built.append((target, []))
            measures.append(None)
            accepted.append(False)
            continue
        m, overlap = judge.measure(final)
        reasons = quality_reasons(m, budget)
        if gate.min_teacher_overlap_at_10 is not None and overlap < gate.min_teacher_overlap_at_10:
            reasons.append(f"validation top-10 overlap {overlap:.3f} < {gate.min_teacher_overlap_at_10}")
        built.append((final, records))
        measures.append(m)
        accepted.append(not reasons)
        limits = limit_reasons(m, judge.reference, budget)
        report.append(EncoderCandidate(
            name=name, status="accepted" if not reasons else "rejected", reasons=reasons + limits,
            bytes=m.size_bytes, size_ratio=judge.reference.size_bytes / m.size_bytes,
            throughput_ratio=m.throughput / judge.reference.throughput, validation_ndcg_at_10=m.auc,
            validation_relative_ndcg_loss=m.loss, validation_loss_se=m.se, validation_overlap_at_10=overlap,
            seconds=time.perf_counter() - t0))
        if not reasons and not limits:
            break  # every later candidate is larger and slower
    choice = choose(measures, accepted, judge.reference, budget, s.objective,
                    depth=[len(r) for _, r in built])
    if choice.index is None:
        raise RecserveError("the encoder search built no candidate: " + "; ".join(
            r for c in report for r in c.reasons[:1]))
    report[choice.index].chosen = True
    final, records = built[choice.index]
    return final, records, EncoderSearchReport(objective=s.objective, validation_queries=len(judge.ndcg),
                                               seconds=time.perf_counter() - start, why=choice.why, candidates=report)
