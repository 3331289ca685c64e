"""Load-test benchmark (issue 7's bar).

1. The generator itself: open loop at 5,000 requests/s from ONE process against the trivial gRPC
   server; its p99 scheduling lag must stay under 1 ms for the run to count.
2. The highest rate meeting p99 <= 10 ms for the compressed ranker on the embedded Triton,
   directly and through the Ray Serve router (open-loop Poisson rate sweeps, 20-100 Zipf-drawn
   candidates per request).
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.compression import SERVED
from recserve.converters.build import build
from recserve.converters.triton_config import BuildProfile
from recserve.loadtest import generator, trivial
from recserve.loadtest.report import plot_sweep
from recserve.loadtest.scenario import Scenario
from recserve.serving import app
from recserve.serving.config import RouterConfig
from recserve.triton.retrieval import build_catalog_dir
from recserve.triton.server import EmbeddedTriton, ServerSettings, free_port

HERE = Path(__file__).resolve().parent
TRITON_RATES = [250, 500, 1000, 2000, 3000]
ROUTER_RATES = [50, 100, 200, 300, 400, 600, 800]


def generator_check() -> dict:
    server, url = trivial.spawn()
    try:
        s = Scenario.model_validate({"name": "generator", "target": "trivial", "url": url,
                                     "arrivals": {"process": "constant", "rate": 5000, "duration_s": 8, "warmup_s": 2},
                                     "requests": {"candidates_min": 5, "candidates_max": 10}})
        return generator.run(s).report()
    finally:
        server.kill()


def run(workdir: Path) -> dict:
    import json

    model_dir = workdir / SERVED
    spec = json.loads((model_dir / "report.json").read_text())["data"]
    gen = generator_check()
    repo = workdir / "loadtest-repo"
    build(model_dir, "ranker", "onnxruntime", repo, BuildProfile(max_queue_delay_us=500, preferred_batch_sizes=[4]))
    catalog = build_catalog_dir(model_dir, spec, workdir / "loadtest-catalog")
    pre = model_dir / "preprocessing.json"
    common = {"catalog": str(catalog), "slo_p99_ms": 10, "requests": {"candidates_min": 20, "candidates_max": 100},
              "arrivals": {"process": "poisson", "duration_s": 5, "warmup_s": 1}}
    triton = EmbeddedTriton(ServerSettings.on_free_ports(repo)).start()
    try:
        direct = generator.sweep(Scenario.model_validate(
            common | {"name": "triton", "target": "triton", "url": triton.grpc_url, "preprocessing": str(pre)}),
            TRITON_RATES)
        cfg = RouterConfig.model_validate({
            "triton_url": triton.grpc_url, "grpc_port": free_port(), "http_port": free_port(), "cache_ttl_s": 0,
            "models": {"ranker": {"rankers": [{"triton_model": "ranker", "edge_model": str(model_dir / "model.onnx")}],
                                  "catalog": str(catalog), "preprocessing": str(pre)}}})
        app.start(cfg)
        time.sleep(1.0)
        try:
            routed = generator.sweep(Scenario.model_validate(
                common | {"name": "router", "target": "router", "url": f"127.0.0.1:{cfg.grpc_port}",
                          "timeout_ms": 1000}), ROUTER_RATES)
        finally:
            app.stop()
    finally:
        triton.stop()
    plot_sweep({"triton": direct, "router": routed}, HERE / "loadtest.png")
    return {"generator": gen, "triton": direct, "router": routed}


def markdown(r: dict) -> str:
    g = r["generator"]
    lines = ["### Load tests (open loop, Poisson arrivals, latency from intended send time)", "",
             f"Generator, one process, constant 5,000 requests/s at a trivial gRPC server: achieved "
             f"{g['achieved_rps']:,.0f}/s, scheduling lag p50 {g['lag_ms']['p50']:.3f} ms / p99 {g['lag_ms']['p99']:.3f} ms "
             f"({'valid' if g['valid'] else 'INVALID: ' + g['invalid_reason']}); {sum(g['errors'].values())} errors.", "",
             "| target | rate/s | achieved/s | p50 ms | p99 ms | p99.9 ms | lag p99 ms | errors | valid |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name in ("triton", "router"):
        for x in r[name]["runs"]:
            lat = x["latency_ms"]
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(f"| {name} | {x['rate']:,.0f} | {x['achieved_rps']:,.0f} | {fmt(lat['p50'])} | {fmt(lat['p99'])} | "
                         f"{fmt(lat['p99_9'])} | {fmt(x['lag_ms']['p99'])} | {sum(x['errors'].values())} | "
                         f"{'yes' if x['valid'] else 'no'} |")
    lines += ["", f"Highest rate with p99 <= 10 ms: Triton direct **{r['triton']['max_rate_meeting_slo']}**/s, "
              f"through the router **{r['router']['max_rate_meeting_slo']}**/s (`bench/loadtest.png`)."]
    return "\n".join(lines)
