"""The budgeted compression search: builds candidates with the compression stages and judges each on
the validation split. The decisions (acceptance, order, choice, the student ladder) are the pure
functions of :mod:`recserve.converters.search`; this module runs the stages and keeps the record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from recserve.converters.distill import DistillStage, StudentSpec
from recserve.converters.embeddings import EmbeddingStage
from recserve.converters.evaluate import Evaluation, evaluate, paired_loss
from recserve.converters.graph import embedding_gathers, initializers, linear_layers
from recserve.converters.lowrank import LowRankStage
from recserve.converters.quantize import QuantizeStage, output_tail
from recserve.converters.recipe import SearchSpec
from recserve.converters.report import CandidateStatus
from recserve.converters.search import (
    WORTH,
    Budget,
    Measure,
    Reference,
    Student,
    TeacherShape,
    choose,
    limit_reasons,
    quality_reasons,
    rare_row_variants,
    steps_worth_running,
    student_ladder,
)
from recserve.converters.stage import ModelState, StageContext, StageSpec
from recserve.errors import RecserveError

SPEED_SECONDS = 0.25
"""Timing per candidate and batch size (the final choice is timed again, interleaved with the baseline)."""
MAX_FLOAT_LAYERS = 3
"""INT8 with more of the most sensitive layers kept float than this is not tried (FP16 is next)."""


class OutOfTime(Exception):
    """The search's time budget is spent."""


@dataclass
class Built:
    """One candidate: the stages that built it from the teacher, and what it measured on validation."""

    name: str
    stages: list[StageSpec]
    status: CandidateStatus
    state: ModelState | None = None
    evaluation: Evaluation | None = None
    measure: Measure | None = None
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    parent: Built | None = None

    @property
    def accepted(self) -> bool:
        return self.status == CandidateStatus.ACCEPTED

    def chain(self) -> list[Built]:
        """The candidates this one was built through, the teacher's child first."""
        out, b = [], self
        while b is not None and b.parent is not None:
            out.append(b)
            b = b.parent
        return out[::-1]


@dataclass
class Outcome:
    built: list[Built]
    chosen: Built | None
    why: str
    stopped: str
    seconds: float


def teacher_shape(state: ModelState, ctx: StageContext) -> TeacherShape | None:
    """What the student ladder is sized from; None when students cannot be trained for this model."""
    if state.kind != "ranker" or ctx.scoring.score_output != "score":
        return None
    try:
        fit, _ = ctx.recserve_rows("distill")
    except RecserveError:
        return None
    config = getattr(state.module, "config", None)
    gathers = embedding_gathers(state.graph)
    inits = initializers(state.graph)
    dim = config.embedding_dim if config is not None else (inits[gathers[0].input[0]].dims[1] if gathers else 16)
    rows = sum(f.cardinality for f in fit.sparse_features)
    common = dict(embedding_dim=dim, rows=rows, fields=len(fit.sparse_features) + 1, num_dense=len(fit.dense_names))
    if config is None:
        return TeacherShape(**common)
    return TeacherShape(**common, cross_layers=config.cross_layers, top_mlp=tuple(config.top_mlp),
                        bottom_mlp=tuple(config.bottom_mlp))


def label(stage: StageSpec) -> str:
    """A short name for one stage in a candidate's name."""
    if isinstance(stage, DistillStage):
        s = stage.student
        return f"student d{s.embedding_dim} c{s.cross_layers} top {'x'.join(map(str, s.top_mlp))}"
    if isinstance(stage, QuantizeStage):
        if stage.mode == "fp16":
            return "fp16"
        return "int8" + (f" ({len(stage.exclude_nodes)} float)" if stage.exclude_nodes else "")
    if isinstance(stage, EmbeddingStage):
        bits = sorted({stage.bits, *stage.table_bits.values()}, key=str)
        out = "emb " + "/".join("f32" if b is None else f"int{b}" for b in bits)
        if stage.rare_threshold and stage.rare_dim:
            out += f" rare<{stage.rare_threshold}:{stage.rare_dim}d"
        if stage.min_count:
            out += f" shared<{stage.min_count}"
        return out
    if isinstance(stage, LowRankStage):
        return f"low-rank {stage.energy:.0%}" if stage.energy else f"low-rank r{stage.rank}"
    return stage.type


class Search:
    """One search over one teacher (see :mod:`recserve.converters.search` for how it decides)."""

    def __init__(self, teacher: ModelState, ctx: StageContext, spec: SearchSpec, budget: Budget, baseline: Evaluation,
                 *, speed: bool = True, shape: TeacherShape | None = None, log: Callable[[str], None] = lambda _: None,
                 clock: Callable[[], float] = time.monotonic):
        self.ctx, self.spec, self.budget, self.baseline, self.speed = ctx, spec, budget, baseline, speed
        self.shape, self.log, self.clock = shape, log, clock
        self.start = clock()
        self.deadline = self.start + spec.time_budget_s
        # training stops at the epoch that passes the deadline; the search's own line per candidate is the log
        ctx.train = replace(ctx.train, deadline=self.deadline, epoch_lines=False)
        self.ref = Reference(baseline.size_bytes, baseline.throughput_b256)
        self.root = Built("baseline", [], CandidateStatus.ACCEPTED, teacher, baseline,
                          Measure(baseline.size_bytes, baseline.throughput_b256, 0.0, 0.0,
                                  baseline.quality.get("distinct_score_ratio", 1.0), baseline.auc))
        self.built: list[Built] = [self.root]

    # ---- the search ----------------------------------------------------------------------------

    def run(self) -> Outcome:
        stopped = "explored"
        try:
            self.post_training(self.root)
            for student in student_ladder(self.shape) if self.shape and self.spec.students == "auto" else []:
                if self.student(student):
                    break
            for spec in [] if self.spec.students == "auto" else self.spec.students:
                if self.student(Student(spec.embedding_dim, spec.cross_layers, spec.cross_rank or spec.embedding_dim,
                                        spec.bottom_mlp, spec.top_mlp)):
                    break
        except OutOfTime:
            stopped = "time budget"
            self.log(f"time budget of {self.spec.time_budget_s:.0f} s spent: choosing from what was built")
        measures = [b.measure for b in self.built]
        choice = choose(measures, [b.accepted for b in self.built], self.ref, self.budget, self.spec.objective,
                        [len(b.stages) for b in self.built])
        chosen = self.built[choice.index] if choice.index is not None else None
        return Outcome(self.built, chosen, choice.why, stopped, self.clock() - self.start)

    def student(self, s: Student) -> bool:
        """Distil one student and compress it; True when a result passes everything (larger students cannot win)."""
        if self.ctx.scoring.kind != "ranker":
            return False
        d = self.spec.distill
        stage = DistillStage(student=StudentSpec(embedding_dim=s.embedding_dim, cross_layers=s.cross_layers,
                                                 cross_rank=s.cross_rank, bottom_mlp=s.bottom_mlp, top_mlp=s.top_mlp),
                             temperature=d.temperature, alpha=d.alpha, loss=d.loss, select=d.select, epochs=d.epochs,
                             patience=d.patience, decay_on_plateau=True, init_embeddings=d.init_embeddings,
                             learning_rate=d.learning_rate, workers=d.workers)
        trained = self.build(self.root, stage)
        if not trained.accepted:
            return False
        results = self.post_training(trained)
        return any(b.accepted and not limit_reasons(b.measure, self.ref, self.budget) for b in [trained, *results])

    def post_training(self, start: Built) -> list[Built]:
        """The cheap steps, greedy, on one model, the part holding more bytes first; returns what it built."""
        if not start.accepted:
            return []
        first = len(self.built)
        dense, tables = part_bytes(start.state)
        order = steps_worth_running(dense, tables, start.evaluation.size_bytes)
        q_stage = e_stage = None
        cur = start
        for part in order:
            if part == "dense":
                q_stage, cur = self.dense_layers(cur)
            else:
                e_stage, after_e = self.embedding_widths(cur)
                if e_stage is not None:
                    r_stage, after_r = self.rare_rows(cur, e_stage)
                    e_stage, cur = (r_stage, after_r) if r_stage is not None else (e_stage, after_e)
        if "dense" in order and dense >= 2.5 * WORTH * start.evaluation.size_bytes:
            self.low_rank(start, q_stage, e_stage if order[0] == "dense" else None)
        return self.built[first:]

    def dense_layers(self, cur: Built) -> tuple[QuantizeStage | None, Built]:
        rows = self.spec.calibration_rows
        for mode in self.spec.quantize:
            if mode == "fp16":
                stage = QuantizeStage(mode="fp16")
                c = self.build(cur, stage)
                if c.accepted:
                    return stage, c
                continue
            stage = QuantizeStage(mode="int8_static", calibration_rows=rows)
            c = self.build(cur, stage)
            if c.accepted:
                return stage, c
            if c.status == CandidateStatus.FAILED:
                continue
            self.check_time()
            ranking = stage.sensitivity_analysis(cur.state, self.ctx, skip=output_tail(cur.state.graph)[0])
            for k in range(1, min(MAX_FLOAT_LAYERS, len(ranking) - 1) + 1):
                stage = QuantizeStage(mode="int8_static", calibration_rows=rows,
                                      exclude_nodes=[r["node"] for r in ranking[:k]])
                c = self.build(cur, stage)
                if c.accepted:
                    return stage, c
        return None, cur

    def embedding_widths(self, cur: Built) -> tuple[EmbeddingStage | None, Built]:
        gathers = embedding_gathers(cur.state.graph)
        if not gathers:
            return None, cur
        chosen: tuple[EmbeddingStage | None, Built] = (None, cur)
        for bits in sorted(self.spec.embedding_bits):
            stage = EmbeddingStage(bits=bits)
            c = self.build(cur, stage)
            if c.accepted:
                chosen = (stage, c)
                break
        stage = chosen[0]
        narrow = min(self.spec.embedding_bits)
        if stage is not None and stage.bits != narrow and len(gathers) > 1:
            # some tables may take the narrow width when all of them cannot: largest first, one at a time
            inits = initializers(cur.state.graph)
            tables = sorted({g.input[0] for g in gathers}, key=lambda t: -_elements(inits[t]))
            per_table: dict[str, int] = {}
            for t in tables:
                trial = EmbeddingStage(bits=stage.bits, table_bits={**per_table, t: narrow})
                c = self.build(cur, trial)
                if c.accepted:
                    per_table[t] = narrow
                    chosen = (trial, c)
        return chosen

    def rare_rows(self, cur: Built, emb: EmbeddingStage) -> tuple[EmbeddingStage | None, Built | None]:
        if not self.spec.mixed_dimension:
            return None, None
        inits = initializers(cur.state.graph)
        dims = [inits[g.input[0]].dims[1] for g in embedding_gathers(cur.state.graph)]
        for v in rare_row_variants(max(dims)):
            stage = emb.model_copy(update={"min_count": v.min_count, "rare_threshold": v.threshold,
                                           "rare_dim": v.dim})
            c = self.build(cur, stage)
            if c.accepted:
                return stage, c
        return None, None

    def low_rank(self, start: Built, q: QuantizeStage | None, emb: EmbeddingStage | None) -> None:
        """Factorize the dense layers with the budget the other steps left, most aggressive first."""
        for energy in sorted(self.spec.low_rank_energies):
            lr = self.build(start, LowRankStage(energy=energy, min_saving=0.2, fine_tune_epochs=0))
            if not lr.accepted:
                continue
            if not lr.details.get("ranks"):
                return  # nothing qualifies at this energy, and less at higher ones
            last = lr
            for stage in (_renamed(q, lr.state.graph) if q is not None else None, emb):
                if stage is not None and last.accepted:
                    last = self.build(last, stage)
            if last.accepted:
                return

    # ---- one candidate ---------------------------------------------------------------------------

    def check_time(self) -> None:
        if self.clock() >= self.deadline:
            raise OutOfTime

    def build(self, parent: Built, stage: StageSpec) -> Built:
        self.check_time()
        name = label(stage) if parent is self.root else f"{parent.name} + {label(stage)}"
        t0 = self.clock()
        try:
            state, details = stage.apply(parent.state, self.ctx)
            ev = evaluate(state.graph, self.ctx.scoring, self.ctx.validation, speed=self.speed,
                          speed_seconds=SPEED_SECONDS)
        except RecserveError as e:
            b = Built(name, [*parent.stages, stage], CandidateStatus.FAILED, reasons=[str(e)],
                      seconds=self.clock() - t0, parent=parent)
            return self._record(b)
        loss, se = paired_loss(self.baseline, ev, self.ctx.validation)
        m = Measure(ev.size_bytes, ev.throughput_b256, loss, se, ev.quality.get("distinct_score_ratio", 1.0), ev.auc)
        reasons = quality_reasons(m, self.budget)
        status = CandidateStatus.REJECTED if reasons else CandidateStatus.ACCEPTED
        b = Built(name, [*parent.stages, stage], status, state, ev, m, reasons, self.clock() - t0, details, parent)
        return self._record(b)

    def _record(self, b: Built) -> Built:
        self.built.append(b)
        self.log(line(b, self.ref, self.clock() - self.start))
        return b


def part_bytes(state: ModelState) -> tuple[int, int]:
    """(bytes of dense-layer weights, bytes of embedding tables) of a float graph."""
    inits = initializers(state.graph)
    dense = sum(_elements(inits[lay.weight]) * 4 for lay in linear_layers(state.graph))
    tables = sum(_elements(inits[g.input[0]]) * 4 for g in embedding_gathers(state.graph))
    return dense, tables


def _renamed(q: QuantizeStage, graph) -> QuantizeStage:
    """``q`` for a graph whose layers were factorized: a layer kept float keeps its factors float."""
    if not q.exclude_nodes:
        return q
    names = [lay.node.name for lay in linear_layers(graph)]
    prefixes = [n.rsplit("/", 1)[0] + "/" for n in q.exclude_nodes]
    kept = [n for n in names if n in q.exclude_nodes or any(n.startswith(p) for p in prefixes)]
    return q.model_copy(update={"exclude_nodes": kept})


def _elements(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def line(b: Built, ref: Reference, elapsed: float) -> str:
    """One progress line per candidate (fits 80 columns before the name)."""
    if b.measure is None:
        return f"{elapsed:5.0f}s failed   {b.name}: {b.reasons[0] if b.reasons else ''}"
    m = b.measure
    verdict = "accepted" if b.accepted else "rejected"
    return (f"{elapsed:5.0f}s {verdict} {ref.size_bytes / m.size_bytes:6.1f}x {m.loss:+.2%} ±{m.se:.2%}  {b.name}")
