"""The compression report for people: a table on the terminal and a quality-against-size plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def _rows(report: dict[str, Any]) -> list[tuple[str, dict]]:
    return [("baseline", report["baseline"])] + [(f"{i + 1}. {s['name']}", s["evaluation"])
                                                 for i, s in enumerate(report["stages"])]


def report_table(report: dict[str, Any]) -> Table:
    base = report["baseline"]
    retr = report["kind"] == "two-tower"
    recall = next((k for k in base["quality"] if k.startswith("recall@")), None)
    gate = report["gate"]
    title = f"{report['recipe']} on {report['data']}: gate {'PASSED' if gate['passed'] else 'FAILED'}"
    t = Table(title=title)
    for col in ["stage", "AUC", "rel. AUC loss", recall if retr else "logloss", "calibration" if not retr else "ndcg",
                "size KB", "size ratio", "params", "p50 b1 ms", "rows/s b256"]:
        t.add_column(col, justify="left" if col == "stage" else "right")
    for name, ev in _rows(report):
        q = ev["quality"]
        loss = (base["quality"]["auc"] - q["auc"]) / base["quality"]["auc"]
        third = q[recall] if retr else q["logloss"]
        fourth = q[recall.replace("recall", "ndcg")] if retr else q["calibration"]
        t.add_row(name, f"{q['auc']:.4f}", f"{loss:+.3%}", f"{third:.4f}", f"{fourth:.3f}",
                  f"{ev['size_bytes'] / 1024:,.1f}", f"{base['size_bytes'] / ev['size_bytes']:.1f}x",
                  f"{ev['parameters']:,}", _fmt(ev["latency_ms_b1"], "{:.3f}"), _fmt(ev["throughput_b256"], "{:,.0f}"))
    return t


def _fmt(v: float | None, f: str) -> str:
    return "-" if v is None else f.format(v)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """AUC against size on disk after each stage (log-scale size), the gate's AUC floor dashed."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(report)
    sizes = [ev["size_bytes"] / 1024 for _, ev in rows]
    aucs = [ev["quality"]["auc"] for _, ev in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(sizes, aucs, "-o", color="tab:blue")
    for (name, _), x, y in zip(rows, sizes, aucs):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    limit = report["gate"]["limits"].get("max_relative_auc_loss")
    if limit is not None:
        floor = report["baseline"]["quality"]["auc"] * (1 - limit)
        ax.axhline(floor, ls="--", color="tab:red", lw=1, label=f"gate: AUC >= {floor:.4f}")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("size on disk (KiB, log scale)")
    ax.set_ylabel("held-out AUC")
    ax.set_title(f"{report['recipe']}: quality against size per stage")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
