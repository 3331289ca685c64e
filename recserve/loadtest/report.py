"""Load-test results for people: a table and a plot of latency percentiles against rate."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ms(v: float | None) -> str:
    """Three significant figures at most: 0.64, 7.65, 12.3, 1,238."""
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def runs_table(runs: list[dict], title: str = "load test") -> Table:
    """One row per run, numbers only (errors by status and why a run is invalid go in the caption), with
    short headers and light borders: it fits 80 columns without cutting a cell."""
    t = Table(title=f"{title} (latency ms, from the intended send time)", title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False, show_edge=False, caption_justify="left", padding=0)
    for col in ("target", "rate", "got/s", "ok", "errors", "p50", "p90", "p99", "p99.9", "lag99", "valid"):
        t.add_column(col, justify="left" if col == "target" else "right", no_wrap=True)
    notes = []
    for r in runs:
        lat, lag = r["latency_ms"], r["lag_ms"] or {}
        rate = _f(r["rate"], "{:,.0f}") if r["rate"] else f"c={r['concurrency']}"
        t.add_row(r["target"], rate, _f(r["achieved_rps"], "{:,.0f}"), f"{r['ok']:,}", f"{sum(r['errors'].values()):,}",
                  _ms(lat["p50"]), _ms(lat["p90"]), _ms(lat["p99"]), _ms(lat["p99_9"]), _ms(lag.get("p99")),
                  "yes" if r["valid"] else "NO")
        if r["errors"]:
            notes.append(f"rate {rate}: errors " + ", ".join(f"{k} {v:,}" for k, v in r["errors"].items()))
        if not r["valid"]:
            notes.append(f"rate {rate}: invalid: {r.get('invalid_reason') or ''}")
    if notes:
        t.caption = "\n".join(notes)
    return t


def plot_sweep(sweeps: dict[str, dict], path: Path) -> None:
    """p50/p99 latency against offered rate, one line pair per target; the SLO dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    slo = None
    for name, sweep in sweeps.items():
        runs = [r for r in sweep["runs"] if r["latency_ms"]["p99"] is not None]
        rates = [r["rate"] for r in runs]
        ax.plot(rates, [r["latency_ms"]["p99"] for r in runs], "-o", label=f"{name} p99")
        ax.plot(rates, [r["latency_ms"]["p50"] for r in runs], "--.", label=f"{name} p50")
        slo = sweep["slo_p99_ms"]
    if slo is not None:
        ax.axhline(slo, color="tab:red", lw=1, ls=":", label=f"SLO p99 {slo} ms")
    ax.set_xlabel("offered rate (requests/s, open loop)")
    ax.set_ylabel("latency from intended send time (ms)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("latency against rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
