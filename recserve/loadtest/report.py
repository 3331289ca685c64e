"""Load-test results for people: a table and a plot of latency percentiles against rate."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def runs_table(runs: list[dict], title: str = "load test") -> Table:
    t = Table(title=title)
    for col in ("target", "rate", "achieved/s", "ok", "errors", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
                "lag p99 ms", "valid"):
        t.add_column(col, justify="left" if col == "target" else "right")
    for r in runs:
        lat, lag = r["latency_ms"], r["lag_ms"] or {}
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        t.add_row(r["target"], _f(r["rate"], "{:,.0f}") if r["rate"] else f"c={r['concurrency']}",
                  _f(r["achieved_rps"], "{:,.0f}"), f"{r['ok']:,}", errors, _f(lat["p50"]), _f(lat["p90"]),
                  _f(lat["p99"]), _f(lat["p99_9"]), _f(lag.get("p99")), "yes" if r["valid"] else "NO")
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
