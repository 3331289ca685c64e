"""Tables people read fit an 80-column terminal or CI log: cells wrap or are short, never cut to '…'."""

from __future__ import annotations

from rich.console import Console

from recserve.converters.report import (
    CandidateReport,
    CandidateStatus,
    CompressionReport,
    EvaluationReport,
    GateReport,
    SearchReport,
    StageReport,
    ValidationReport,
    pareto_table,
    report_table,
)
from recserve.loadtest.report import runs_table


def render(table, width: int = 80) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def ev(auc: float, size: int, thr: float) -> EvaluationReport:
    return EvaluationReport(quality={"auc": auc, "logloss": 0.5537, "calibration": 0.98, "distinct_score_ratio": 0.999},
                            size_bytes=size, parameters=size // 4, latency_ms_b1=0.05, throughput_b256=thr)


def report() -> CompressionReport:
    base, small = ev(0.78291, 2_348_134, 168_588.0), ev(0.78245, 37_391, 1_953_229.0)
    names = ["student d8 c1 top 32x16 + emb int4 rare<20:2d shared<1", "student d32 c2 top 256x128 + int8 (3 float)"]
    cands = [CandidateReport(name=n, stages=[], status=CandidateStatus.ACCEPTED, size_bytes=37_391 * (i + 1),
                             throughput_b256=1_953_229.0, validation_relative_loss=-0.0015,
                             validation_relative_loss_se=0.0007, test_auc=0.78245, chosen=i == 0)
             for i, n in enumerate(names)]
    return CompressionReport(
        model="runs/ranker/model.onnx", kind="ranker", mode="search", recipe="search",
        data="interactions:/work/shared/datasets/ecommerce_amazon_grocery/train.csv,meta=/work/shared/item_meta.csv",
        held_out_rows=20_000, baseline=base, stages=[StageReport(name="distill", evaluation=small),
                                                     StageReport(name="embeddings", evaluation=small)],
        result=small, relative_auc_loss=0.00058, size_ratio=62.8, throughput_ratio=11.2, distinct_score_ratio=0.999,
        gate=GateReport(passed=True), validation=ValidationReport(rows=8000, baseline=base, result=small,
                                                                 relative_auc_loss=-0.0015,
                                                                 relative_auc_loss_se=0.0007),
        pareto=cands, search=SearchReport(objective="size", time_budget_s=1200, seconds=24, stopped="explored",
                                          confidence=0.95, candidates=cands))


def test_compression_tables_fit_80_columns() -> None:
    for table in (report_table(report()), pareto_table(report())):
        text = render(table)
        assert "…" not in text, text
        assert max(len(line) for line in text.splitlines()) <= 80
    assert "62.8x" in render(report_table(report())) and "1,953,229" in render(report_table(report()))


def test_load_test_table_fits_80_columns() -> None:
    run = {"target": "router", "rate": 15000.0, "concurrency": None, "achieved_rps": 14320.0, "ok": 1_234_500,
           "errors": {"DEADLINE_EXCEEDED": 12, "UNAVAILABLE": 3}, "valid": False,
           "invalid_reason": "1,300 successful requests/s against the 1,500/s scheduled",
           "latency_ms": {"p50": 104.47, "p90": 125.66, "p99": 1237.65, "p99_9": 2348.02}, "lag_ms": {"p99": 0.64}}
    text = render(runs_table([run, dict(run, target="triton", errors={}, valid=True)], "sweep: router 10.0.0.7:9000"))
    assert "…" not in text, text
    assert "1,234,500" in text and "1,238" in text and "DEADLINE_EXCEEDED 12" in text and "invalid:" in text
