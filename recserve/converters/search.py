"""Decisions of the budgeted compression search, as pure functions (no models, no I/O).

How the search decides (``search_run`` does the work):

- **Acceptance.** A candidate keeps the budget when the gate, judged on a split of the test
  split's size, would pass with probability ``confidence``: its relative AUC loss against the
  baseline on the validation split, plus ``z`` times the error of predicting the test loss from it
  (the validation loss's standard error, DeLong paired, and the test loss's, scaled from it by the
  splits' sizes), is within the budget; and its scores still rank (distinct-score ratio). A
  candidate is never accepted on a lucky validation draw alone.
- **Order.** Cheap post-training steps first, each greedy (the most aggressive variant first, the
  first accepted kept): dense layers (INT8, then INT8 with the most sensitive layers kept float,
  then FP16), embedding widths (INT4, then INT8), rare rows (mixed dimensions, a shared row), then
  low-rank factorization with whatever budget is left. Training steps follow only where they can
  win: distillation students from a ladder sized from the teacher, smallest first, each followed by
  the same post-training steps; the ladder stops at the first student whose result passes everything.
- **Steps worth their risk.** Every accepted step is another chance that a validation draw was
  lucky, so a step runs only on a part of the model worth shrinking: dense layers or embedding
  tables holding at least :data:`WORTH` of the model's bytes, the larger part first.
- **Choice.** Of the accepted candidates that meet the gate's size and throughput limits, the best
  by the objective (size: fewest bytes; throughput: most rows/s), candidates within :data:`TIE` of
  it counting as equal and the one with the fewest stages winning; when none meets the limits, the
  best accepted one; when none is accepted, the one with the least loss (the gate then fails).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Budget:
    """What a candidate must keep, from the gate and the search spec."""

    max_relative_loss: float
    z: float = 1.645
    """Normal quantile of the search's confidence (1.645: 95%)."""
    test_to_validation: float = 1.0
    """Validation rows / test rows: the test loss's variance relative to the validation loss's."""
    min_distinct_score_ratio: float | None = 0.5
    min_size_ratio: float | None = None
    min_throughput_ratio: float | None = None


@dataclass(frozen=True)
class Measure:
    """What the search knows of one candidate (all on the validation split)."""

    size_bytes: int
    throughput: float | None
    loss: float
    """Relative AUC loss against the baseline."""
    se: float
    """Standard error of ``loss``."""
    distinct: float
    auc: float


@dataclass(frozen=True)
class Reference:
    """The baseline's size and speed, which ratios are taken against."""

    size_bytes: int
    throughput: float | None


def quality_reasons(m: Measure, b: Budget) -> list[str]:
    """Why a candidate does not keep the quality budget (empty: it does)."""
    reasons = []
    se = prediction_se(m, b)
    bound = m.loss + b.z * se
    if not bound <= b.max_relative_loss:
        reasons.append(f"validation loss {m.loss:+.3%} + {b.z:.2f} x {se:.3%} = {bound:+.3%} "
                       f"> budget {b.max_relative_loss:.3%}")
    if b.min_distinct_score_ratio is not None and not m.distinct >= b.min_distinct_score_ratio:
        reasons.append(f"distinct score ratio {m.distinct:.3f} < {b.min_distinct_score_ratio}")
    return reasons


def prediction_se(m: Measure, b: Budget) -> float:
    """Standard error of the test loss predicted by the validation loss (both splits' errors)."""
    se = 0.0 if math.isnan(m.se) else m.se
    return se * math.sqrt(1.0 + b.test_to_validation)


def z_for(confidence: float) -> float:
    """The standard normal quantile of ``confidence`` (one-sided)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(confidence)


def limit_reasons(m: Measure, ref: Reference, b: Budget) -> list[str]:
    """Which of the gate's size and throughput limits a candidate misses."""
    reasons = []
    ratio = ref.size_bytes / m.size_bytes
    if b.min_size_ratio is not None and ratio < b.min_size_ratio:
        reasons.append(f"size ratio {ratio:.2f}x < {b.min_size_ratio}x")
    if b.min_throughput_ratio is not None:
        t = throughput_ratio(m, ref)
        if t is None or t < b.min_throughput_ratio:
            reasons.append(f"throughput ratio {'-' if t is None else f'{t:.2f}'}x < {b.min_throughput_ratio}x")
    return reasons


def throughput_ratio(m: Measure, ref: Reference) -> float | None:
    return m.throughput / ref.throughput if m.throughput and ref.throughput else None


def key(m: Measure, objective: str) -> tuple[float, float]:
    """Sort key, best first: the objective, then the other measure, then the loss."""
    thr = -(m.throughput or 0.0)
    return (m.size_bytes, thr, m.loss) if objective == "size" else (thr, m.size_bytes, m.loss)


@dataclass
class Choice:
    index: int | None
    why: str


TIE = 0.05
"""Candidates within 5% of the best by the objective count as equally good; of those, the one built
with the fewest stages wins (each stage adds loss in expectation, and a measured gain that small is
more likely noise than a better model)."""


def best(indices: list[int], measures: list[Measure | None], depth: list[int], objective: str) -> int:
    """The best index by the objective, ties within :data:`TIE` going to fewer stages, then less loss."""
    top = min(indices, key=lambda i: key(measures[i], objective))
    m = measures[top]
    if objective == "size":
        near = [i for i in indices if measures[i].size_bytes <= m.size_bytes * (1 + TIE)]
    else:
        near = [i for i in indices if (measures[i].throughput or 0.0) >= (m.throughput or 0.0) * (1 - TIE)]
    return min(near, key=lambda i: (depth[i], measures[i].loss, key(measures[i], objective)))


def choose(measures: list[Measure | None], accepted: list[bool], ref: Reference, b: Budget, objective: str,
           depth: list[int] | None = None) -> Choice:
    """Which candidate the search returns (see the module docstring); ``depth``: stages per candidate."""
    depth = depth or [0] * len(measures)
    ok = [i for i, (m, a) in enumerate(zip(measures, accepted)) if a and m is not None]
    within = [i for i in ok if not limit_reasons(measures[i], ref, b)]
    if within:
        return Choice(best(within, measures, depth, objective), "best within the budget and limits")
    if ok:
        return Choice(best(ok, measures, depth, objective),
                      "best within the budget; no candidate met the size/throughput limits")
    built = [i for i, m in enumerate(measures) if m is not None]
    if built:
        return Choice(min(built, key=lambda i: measures[i].loss), "no candidate kept the budget: the least loss")
    return Choice(None, "no candidate could be built")


def pareto_front(measures: list[Measure | None]) -> list[int]:
    """Indices not dominated in (smaller size, higher throughput, higher validation AUC)."""
    pts = [(i, m) for i, m in enumerate(measures) if m is not None]

    def dominates(a: Measure, c: Measure) -> bool:
        ta, tc = a.throughput or 0.0, c.throughput or 0.0
        no_worse = a.size_bytes <= c.size_bytes and ta >= tc and a.auc >= c.auc
        better = a.size_bytes < c.size_bytes or ta > tc or a.auc > c.auc
        return no_worse and better

    return [i for i, m in pts if not any(dominates(o, m) for j, o in pts if j != i)]


WORTH = 0.10
"""A post-training step runs only on a part (dense layers, embedding tables) holding this share of the bytes."""


def steps_worth_running(dense_bytes: int, table_bytes: int, total_bytes: int) -> list[str]:
    """``dense`` and ``tables``, the larger first, each only when it holds at least :data:`WORTH` of the model."""
    parts = [("dense", dense_bytes), ("tables", table_bytes)]
    return [name for name, n in sorted(parts, key=lambda p: -p[1]) if total_bytes and n >= WORTH * total_bytes]


@dataclass(frozen=True)
class TeacherShape:
    """What the student ladder is sized from."""

    embedding_dim: int
    rows: int
    """Embedding rows (all features)."""
    fields: int
    """Sparse features + the dense field."""
    num_dense: int = 0
    cross_layers: int = 3
    top_mlp: tuple[int, ...] = (512, 256, 128)
    bottom_mlp: tuple[int, ...] = (64,)


@dataclass(frozen=True)
class Student:
    embedding_dim: int
    cross_layers: int
    cross_rank: int
    bottom_mlp: list[int] = field(default_factory=list)
    top_mlp: list[int] = field(default_factory=list)

    def parameters(self, t: TeacherShape) -> int:
        """Parameters of this student for the teacher's features (its size, before quantization)."""
        d, width = self.embedding_dim, self.embedding_dim * t.fields
        bottom = _mlp([t.num_dense, *self.bottom_mlp, d]) if t.num_dense else 0
        cross = self.cross_layers * (2 * width * self.cross_rank + width)
        top = _mlp([width, *self.top_mlp, 1])
        return t.rows * d + bottom + cross + top


def _mlp(sizes: list[int]) -> int:
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


RUNGS = ((4, 16, 1), (2, 8, 1), (1, 8, 1), (1, 4, 1), (1, 2, 2))
"""(embedding dim divisor, MLP width divisor, cross layers): the ladder, before sorting by size. Students
as wide as the teacher's table start from it; narrower ones from its leading principal components."""


def student_ladder(t: TeacherShape) -> list[Student]:
    """Distillation students sized from the teacher, smallest first, without duplicates."""
    out: dict[tuple, Student] = {}
    for emb_div, mlp_div, cross in RUNGS:
        d = max(min(4, t.embedding_dim), t.embedding_dim // emb_div)
        s = Student(
            embedding_dim=d,
            cross_layers=min(cross, max(1, t.cross_layers)),
            cross_rank=max(4, d // 2),
            bottom_mlp=[max(4, w // emb_div) for w in t.bottom_mlp[:1]],
            top_mlp=[max(8 // (i + 1), w // mlp_div) for i, w in enumerate(t.top_mlp[:2])],
        )
        out.setdefault((s.embedding_dim, s.cross_layers, s.cross_rank, tuple(s.bottom_mlp), tuple(s.top_mlp)), s)
    return sorted(out.values(), key=lambda s: s.parameters(t))


@dataclass(frozen=True)
class RareRows:
    """One way to store rare rows: ids read fewer than ``min_count`` times share a row, fewer than
    ``threshold`` times keep ``dim`` dimensions."""

    min_count: int
    threshold: int
    dim: int | None


def rare_row_variants(embedding_dim: int) -> list[RareRows]:
    """Most aggressive first; the first one the budget accepts is kept."""
    low = max(1, embedding_dim // 4)
    variants = [RareRows(1, 20, low), RareRows(1, 5, low)]
    return [v for v in variants if v.dim is None or v.dim < embedding_dim] + [RareRows(1, 0, None)]
