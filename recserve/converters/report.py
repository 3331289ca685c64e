"""The compression report: a typed contract (``report.json``), a table for people and plots.

The operator reads :class:`GateReport` from a ModelRollout's ``compressionReport``; everything else
is for people and tools. This module imports only pydantic and rich (matplotlib lazily), so the
serving runtime and the operator can read reports without the training stack.
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table


class _Report(BaseModel):
    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="constants")


class StageStatus(str, Enum):
    """What became of one stage of a recipe (recorded even when a later stage fails)."""

    OK = "ok"
    FAIL = "fail"
    SKIPPED = "skipped"


class EvaluationReport(_Report):
    """Quality and cost of one model on one split (see ``recserve.converters.evaluate.Evaluation``)."""

    quality: dict[str, float]
    size_bytes: int
    parameters: int
    latency_ms_b1: float | None = None
    throughput_b256: float | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def auc(self) -> float:
        return self.quality["auc"]


class StageReport(_Report):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    status: StageStatus = StageStatus.OK
    seconds: float = 0.0
    evaluation: EvaluationReport | None = None
    """On the validation split (the test split is used once, for the result)."""
    details: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class GateReport(_Report):
    """The verdict the operator reads: a candidate whose gate did not pass is never rolled out."""

    passed: bool
    reasons: list[str] = Field(default_factory=list)
    limits: dict[str, float] = Field(default_factory=dict)


class ValidationReport(_Report):
    """Baseline and result on the validation split, on which every choice was made."""

    rows: int
    baseline: EvaluationReport
    result: EvaluationReport
    relative_auc_loss: float
    relative_auc_loss_se: float
    """Standard error of the loss (DeLong, paired: both models scored the same rows)."""


class CandidateStatus(str, Enum):
    ACCEPTED = "accepted"
    """Within the quality budget on validation (with the margin) and ranking (distinct scores)."""
    REJECTED = "rejected"
    FAILED = "failed"
    """A stage could not build it (the error is in ``reasons``)."""


class CandidateReport(_Report):
    """One model the search built and measured."""

    name: str
    stages: list[dict[str, Any]]
    status: CandidateStatus
    reasons: list[str] = Field(default_factory=list)
    size_bytes: int | None = None
    size_ratio: float | None = None
    throughput_b256: float | None = None
    throughput_ratio: float | None = None
    validation_auc: float | None = None
    validation_relative_loss: float | None = None
    validation_relative_loss_se: float | None = None
    distinct_score_ratio: float | None = None
    test_auc: float | None = None
    """Only for the Pareto front, measured after the search chose (never used to choose)."""
    seconds: float = 0.0
    chosen: bool = False


class SearchReport(_Report):
    objective: str
    time_budget_s: float
    seconds: float
    stopped: str
    """Why the search ended: ``explored`` (nothing left that could win) or ``time budget``."""
    confidence: float
    chosen: str | None = None
    candidates: list[CandidateReport] = Field(default_factory=list)
    """Every candidate built, in the order it was built."""
    recipe: dict[str, Any] = Field(default_factory=dict)
    """The chosen stages as a recipe (``recserve compress --recipe`` reruns them without the search)."""


class CompressionReport(_Report):
    """What ``recserve compress`` writes as ``report.json``."""

    model: str
    kind: str
    mode: str = "recipe"
    """``recipe`` (the stages given) or ``search`` (the stages found)."""
    recipe: str
    data: str
    corrupt_rows: int = 0
    """Rows of the data that could not be parsed and were skipped."""
    score_output: str | None = None
    score_kind: str = "probability"
    held_out_rows: int
    """Rows (rankers) or pairs (retrievers) of the test split."""
    baseline: EvaluationReport
    """On the test split."""
    stages: list[StageReport]
    result: EvaluationReport
    """On the test split, measured once."""
    relative_auc_loss: float
    relative_auc_loss_se: float | None = None
    size_ratio: float
    throughput_ratio: float | None = None
    """Compressed / baseline rows/s at batch 256, measured interleaved in one run."""
    distinct_score_ratio: float
    gate: GateReport
    validation: ValidationReport
    pareto: list[CandidateReport] = Field(default_factory=list)
    search: SearchReport | None = None
    storage: dict[str, Any] = Field(default_factory=dict)
    """How the weights are stored on disk (sparse initializers, or why the file did not shrink)."""
    model_sha256: str | None = None
    """sha256 of the model.onnx written beside this report (None when the gate failed and none was written):
    ``recserve build`` records it with the version it adds, and the operator checks that they match."""

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def report_table(report: CompressionReport) -> Table:
    """Baseline, each stage (validation) and the result (test): fits 80 columns."""
    base = report.baseline
    retr = report.kind == "two-tower"
    verdict = "PASSED" if report.gate.passed else "FAILED"
    t = Table(title=f"{report.recipe} on {report.data}: gate {verdict}", title_justify="left", pad_edge=False)
    third = next((k for k in base.quality if k.startswith("recall@")), "recall") if retr else "logloss"
    for col, just in (("stage", "left"), ("split", "left"), ("AUC", "right"), ("loss", "right"), (third, "right"),
                      ("KiB", "right"), ("ratio", "right"), ("rows/s", "right")):
        t.add_column(col, justify=just, overflow="fold")
    val = report.validation

    def row(name: str, split: str, ev: EvaluationReport, ref: EvaluationReport) -> None:
        q = ev.quality
        loss = (ref.auc - q["auc"]) / ref.auc if ref.auc else float("nan")
        t.add_row(name, split, _f(q["auc"], "{:.4f}"), _f(loss, "{:+.2%}"), _f(q.get(third), "{:.4f}"),
                  _f(ev.size_bytes / 1024, "{:,.0f}"), _f(base.size_bytes / ev.size_bytes, "{:.1f}x"),
                  _f(ev.throughput_b256, "{:,.0f}"))

    row("baseline", "val", val.baseline, val.baseline)
    for i, s in enumerate(report.stages):
        if s.evaluation is not None:
            row(f"{i + 1}. {s.name}", "val", s.evaluation, val.baseline)
        else:
            t.add_row(f"{i + 1}. {s.name}", s.status.value, *["-"] * 6)
    row("baseline", "test", base, base)
    row("result", "test", report.result, base)
    return t


def pareto_table(report: CompressionReport) -> Table:
    """The search's Pareto front: size, speed and quality per candidate (validation, and test after)."""
    t = Table(title="Pareto front (val: chosen on; test: measured after; * chosen)", title_justify="left",
              pad_edge=False)
    for col in ("candidate", "ok", "KiB", "rows/s", "val loss", "± se", "test AUC"):
        t.add_column(col, justify="left" if col in ("candidate", "ok") else "right", overflow="fold")
    for c in report.pareto:
        name = ("* " if c.chosen else "") + c.name
        t.add_row(name, "yes" if c.status == CandidateStatus.ACCEPTED else "no",
                  _f((c.size_bytes or 0) / 1024, "{:,.0f}"), _f(c.throughput_b256, "{:,.0f}"),
                  _f(c.validation_relative_loss, "{:+.2%}"), _f(c.validation_relative_loss_se, "{:.2%}"),
                  _f(c.test_auc, "{:.4f}"))
    return t


def plot_report(report: CompressionReport, path: Path) -> None:
    """Quality against size: each stage, or every candidate of a search with its Pareto front."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    base = report.validation.baseline
    if report.search is not None:
        _plot_search(ax, report)
    else:
        rows = [("baseline", base)] + [(f"{i + 1}. {s.name}", s.evaluation) for i, s in enumerate(report.stages)
                                        if s.evaluation is not None]
        sizes = [ev.size_bytes / 1024 for _, ev in rows]
        aucs = [ev.auc for _, ev in rows]
        ax.plot(sizes, aucs, "-o", color="tab:blue", label="validation AUC after each stage")
        for (name, _), x, y in zip(rows, sizes, aucs):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.plot([report.result.size_bytes / 1024], [report.result.auc], "s", color="tab:green",
                label=f"result, test AUC (baseline {report.baseline.auc:.4f})")
    limit = report.gate.limits.get("max_relative_auc_loss")
    if limit is not None:
        floor = base.auc * (1 - limit)
        ax.axhline(floor, ls="--", color="tab:red", lw=1, label=f"budget: validation AUC >= {floor:.4f}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("size on disk (KiB, log scale)")
    ax.set_ylabel("AUC")
    what = "search" if report.search is not None else "stages"
    ax.set_title(f"{report.recipe}: quality against size ({what})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_search(ax, report: CompressionReport) -> None:
    assert report.search is not None
    for status, color in ((CandidateStatus.ACCEPTED, "tab:blue"), (CandidateStatus.REJECTED, "tab:gray")):
        cs = [c for c in report.search.candidates if c.status == status and c.validation_auc is not None]
        if cs:
            ax.scatter([c.size_bytes / 1024 for c in cs], [c.validation_auc for c in cs], color=color, s=14, alpha=0.6,
                       label=f"{status.value} (validation AUC)")
    front = sorted((c for c in report.pareto if c.validation_auc is not None), key=lambda c: c.size_bytes)
    if front:
        ax.step([c.size_bytes / 1024 for c in front], [c.validation_auc for c in front], where="post",
                color="tab:blue", lw=1, label="Pareto front (size, speed, validation AUC)")
    tested = [c for c in front if c.test_auc is not None]
    if tested:
        ax.scatter([c.size_bytes / 1024 for c in tested], [c.test_auc for c in tested], facecolors="none",
                   edgecolors="tab:orange", s=34, label="front, test AUC (after the choice)")
    for c in report.pareto:
        if c.chosen and c.validation_auc is not None:
            ax.annotate(f"chosen: {c.name}", (c.size_bytes / 1024, c.validation_auc), textcoords="offset points",
                        xytext=(5, -12), fontsize=7)
