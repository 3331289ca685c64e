"""What ``recserve compress`` writes as ``report.json`` for a text encoder: a typed contract (the operator
reads its ``gate`` like any compression report's) and a table for people. Imports pydantic and rich only."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

from recserve.converters.report import GateReport, StageReport


class EncoderMeasure(BaseModel):
    """One encoder on the held-out queries: retrieval quality, agreement with the teacher, size and CPU speed."""

    model_config = ConfigDict(extra="ignore")
    bytes: int
    parameters: int
    layers: int
    vocabulary: int | None = None
    ndcg_at_10: float
    recall_at_10: float
    teacher_overlap_at_10: float
    mean_cosine: float
    ms_b1: float
    """Median latency of one text of 16 tokens."""
    texts_per_s_b64: float
    """Throughput in batches of 64 texts of 16 tokens."""


class EncoderCandidate(BaseModel):
    """One encoder the search built and judged on the validation queries."""

    model_config = ConfigDict(extra="ignore")
    name: str
    status: Literal["accepted", "rejected", "failed"]
    reasons: list[str] = Field(default_factory=list)
    bytes: int | None = None
    size_ratio: float | None = None
    throughput_ratio: float | None = None
    validation_ndcg_at_10: float | None = None
    validation_relative_ndcg_loss: float | None = None
    validation_loss_se: float | None = None
    validation_overlap_at_10: float | None = None
    seconds: float = 0.0
    chosen: bool = False


class EncoderSearchReport(BaseModel):
    model_config = ConfigDict(extra="ignore")
    objective: str
    validation_queries: int
    seconds: float
    why: str
    candidates: list[EncoderCandidate]
    """Every candidate built, in the order it was built (cheapest first)."""


class EncoderReport(BaseModel):
    model_config = ConfigDict(extra="ignore")
    kind: Literal["encoder"] = "encoder"
    model: str
    recipe: str
    data: str
    products: int
    held_out_queries: int
    """Queries with a relevant product in the held-out half: the test split, used once, for this report."""
    catalog: Literal["self", "teacher"] = "self"
    """Who embedded the titles the queries were matched against: each encoder its own, or the teacher (an
    index built offline with the teacher; the compressed encoder serves the queries)."""
    teacher: EncoderMeasure
    result: EncoderMeasure
    stages: list[StageReport]
    size_ratio: float
    throughput_ratio: float
    """Compressed / teacher texts/s at batch 64, measured interleaved in one run."""
    relative_ndcg_loss: float
    teacher_overlap_at_10: float
    gate: GateReport
    compression: list[str] = Field(default_factory=list)
    """What was done, in order (the compressed encoder.json's ``compression``)."""
    search: EncoderSearchReport | None = None
    """With a recipe's ``search``: every candidate and why the one written was chosen."""
    model_sha256: str | None = None
    """sha256 of the model.onnx written beside this report (None when the gate failed and none was written)."""

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))


def encoder_table(report: EncoderReport) -> Table:
    """Teacher and result on the held-out queries, and each stage: fits 80 columns."""
    verdict = "PASSED" if report.gate.passed else "FAILED"
    against = ", titles embedded by the teacher" if report.catalog == "teacher" else ""
    t = Table(title=f"{report.recipe} on {report.data}{against}: gate {verdict}", title_justify="left",
              pad_edge=False)
    for col in ("", "NDCG@10", "recall", "overlap", "MiB", "ratio", "texts/s", "ms b1"):
        t.add_column(col, justify="left" if not col else "right", overflow="fold")
    for name, m in (("teacher", report.teacher), ("result", report.result)):
        t.add_row(name, f"{m.ndcg_at_10:.4f}", f"{m.recall_at_10:.4f}", f"{m.teacher_overlap_at_10:.3f}",
                  f"{m.bytes / 2**20:.1f}", f"{report.teacher.bytes / m.bytes:.1f}x", f"{m.texts_per_s_b64:,.0f}",
                  f"{m.ms_b1:.2f}")
    for i, s in enumerate(report.stages):
        t.add_row(f"{i + 1}. {s.name}", s.status.value, *[""] * 4, f"{s.seconds:.0f} s", "")
    return t
