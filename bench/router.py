"""Router benchmark (issue 4's bar): latency the Ray Serve router adds over calling Triton directly, and
failover time when the cloud goes away.

Both paths rank the same 50 candidates with the same INT8 ranker on the same embedded Triton; the
router's cache is off. At each concurrency the two run in alternating rounds (closed loop, from
h2load as in the Triton benchmark, every call checked against Triton's success counter), and the
added latency is router minus direct, p50 and p99. Failover: a steady stream of Rank calls
with a 100 ms budget while Triton is stopped; we report when the first edge answer came, the
slowest answer around the switch, and errors (should be none).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from bench.triton import METHOD, counted_load, infer_request
from recserve.converters.build import build
from recserve.converters.triton_config import BuildProfile
from recserve.serving import app
from recserve.serving.client import RouterClient
from recserve.serving.config import RouterConfig
from recserve.serving.protos.recommender_pb2 import RankRequest
from recserve.triton.client import TritonClient
from recserve.triton.retrieval import ItemIndex, build_catalog_dir, context_encoder
from recserve.triton.server import EmbeddedTriton, ServerSettings, free_port, free_ports

CANDIDATES = 50
INGRESS = os.environ.get("BENCH_ROUTER_INGRESS", "direct")
REPLICAS = int(os.environ.get("BENCH_ROUTER_REPLICAS", "1"))
"""The router's shape: one direct-ingress replica by default; with more, one h2load per replica port
shares out the calls (direct), or Serve's proxy does (proxy)."""
LEVELS = (1, 16, 64)
REQUESTS = {1: 500, 16: 2000, 64: 3000}
ROUNDS = 3
RANK = "recserve.Recommender/Rank"
DEADLINE = {"grpc-timeout": "2S"}
"""Rank calls carry a 2 s deadline: the router always has the time to ask Triton."""


def _requests(catalog: ItemIndex, encoder, n: int = 64) -> tuple[list[RankRequest], list]:
    """Rank requests and the ranker rows the router will build for them (for the direct path)."""
    rng = np.random.default_rng(0)
    ranks, rows = [], []
    for i in range(n):
        items = [str(x) for x in rng.choice(catalog.item_ids, CANDIDATES, replace=False)]
        req = RankRequest(request_id=str(i), user={"user_id": str(int(rng.integers(1, 300)))},
                          query=str(int(rng.integers(1, 50))), candidate_item_ids=items, top_k=10)
        values = dict(req.user) | {"query_id": req.query}
        raw = np.array([[values.get(n, "") for n in encoder.sparse_names]], dtype=object)
        cs, cd = encoder.encode(raw, np.full((1, len(encoder.transforms)), np.nan))
        rows.append(catalog.ranker_rows(catalog.rows_for(items), cs, cd))
        ranks.append(req)
    return ranks, rows


def _pct(a: list[float]) -> dict:
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def failover(triton: EmbeddedTriton, router_url: str | list[str], ranks) -> dict:
    """Stop Triton under a steady Rank stream; measure the switch to the edge."""
    results: list[tuple[float, float, str]] = []  # (sent at, latency ms, served_by)
    errors: list[str] = []
    stop_at: list[float] = []
    done = threading.Event()

    def stream() -> None:
        with RouterClient(router_url) as client:
            i = 0
            while not done.is_set():
                t0 = time.perf_counter()
                try:
                    r = client.rank(ranks[i % len(ranks)], timeout_s=0.1)
                    results.append((t0, (time.perf_counter() - t0) * 1e3, r.served_by))
                except grpc.RpcError as e:
                    errors.append(str(e.code()))
                i += 1
                time.sleep(0.005)

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(1.5)
    stop_at.append(time.perf_counter())
    triton.stop()
    time.sleep(3.0)
    done.set()
    t.join()
    after = [(s, lat, by) for s, lat, by in results if s >= stop_at[0]]
    first_edge = next((s + lat / 1e3 for s, lat, by in after if by == "edge"), None)
    window = [lat for s, lat, _ in after if s < stop_at[0] + 1.0]
    return {
        "requests": len(results) + len(errors), "errors": len(errors), "budget_ms": 100,
        "first_edge_answer_after_stop_ms": (first_edge - stop_at[0]) * 1e3 if first_edge else None,
        "max_latency_first_second_ms": max(window) if window else None,
        "served_by_after_stop": {k: sum(1 for *_, b in after if b == k) for k in ("cloud", "edge", "cache")},
        "over_budget": sum(1 for _, lat, _ in results if lat > 100),
    }


def run(workdir: Path) -> dict:
    model_dir = workdir / "ranker-8x"
    spec = json.loads((model_dir / "report.json").read_text())["data"]
    repo = workdir / "router-repo"
    build(model_dir, "ranker", "onnxruntime", repo, BuildProfile(max_queue_delay_us=200, preferred_batch_sizes=[64]))
    catalog_dir = build_catalog_dir(model_dir, spec, workdir / "catalog")
    catalog = ItemIndex(catalog_dir)
    encoder = context_encoder(model_dir / "preprocessing.json", catalog.layout)
    ranks, rows = _requests(catalog, encoder)
    settings = ServerSettings(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    triton = EmbeddedTriton(settings).start()
    cfg = RouterConfig.model_validate({
        "triton_url": triton.grpc_url, "grpc_port": free_ports(REPLICAS),
        "http_port": free_ports(REPLICAS, start=30_000, stop=32_000),
        "cache_ttl_s": 0, "ingress": INGRESS, "num_replicas": REPLICAS,
        "models": {"ranker": {"rankers": [{"triton_model": "ranker", "edge_model": str(model_dir / "model.onnx")}],
                              "catalog": str(catalog_dir), "preprocessing": str(model_dir / "preprocessing.json")}}})
    app.start(cfg)
    router_url = cfg.grpc_targets()
    direct_msg, rank_msg = infer_request("ranker", *rows[0]).SerializeToString(), ranks[0].SerializeToString()
    try:
        with TritonClient(triton.grpc_url) as client:
            counted_load(client, "ranker", router_url, RANK, rank_msg, 4, 200, DEADLINE)  # warm-up: connections, caches
            levels = {}
            for c in LEVELS:
                direct, routed = [], []
                for _ in range(ROUNDS):
                    direct += list(counted_load(client, "ranker", triton.grpc_url, METHOD, direct_msg, c, REQUESTS[c])[0])
                    routed += list(counted_load(client, "ranker", router_url, RANK, rank_msg, c, REQUESTS[c], DEADLINE)[0])
                d, r = _pct(direct), _pct(routed)
                levels[str(c)] = {"direct": d, "router": r, "added_p50_ms": r["p50_ms"] - d["p50_ms"],
                                  "added_p99_ms": r["p99_ms"] - d["p99_ms"]}
        fail = failover(triton, router_url, ranks)
    finally:
        triton.stop()
        app.stop()
    return {"candidates": CANDIDATES, "ingress": INGRESS, "replicas": REPLICAS, "load_generator": "h2load",
            "cores": os.cpu_count(), "levels": levels, "failover": fail}


def markdown(r: dict) -> str:
    shape = f"{r['replicas']} replica{'s' if r['replicas'] > 1 else ''}, {r['ingress']} ingress"
    lines = [f"### Router (Ray Serve, {shape} -> Triton; {r['candidates']} candidates per request, cache off; "
             f"load from {r.get('load_generator', 'h2load')} on {r['cores']} cores)",
             "", "| concurrency | direct Triton p50 / p99 ms | through router p50 / p99 ms | added p50 | added p99 |",
             "|---:|---:|---:|---:|---:|"]
    for c, x in r["levels"].items():
        lines.append(f"| {c} | {x['direct']['p50_ms']:.2f} / {x['direct']['p99_ms']:.2f} | {x['router']['p50_ms']:.2f} / "
                     f"{x['router']['p99_ms']:.2f} | {x['added_p50_ms']:+.2f} | {x['added_p99_ms']:+.2f} |")
    f = r["failover"]
    first = f["first_edge_answer_after_stop_ms"]
    lines += ["", f"Failover (Triton stopped under a Rank stream, {f['budget_ms']} ms budget): first edge answer "
              f"{first:.1f} ms after the stop; slowest answer in the first second {f['max_latency_first_second_ms']:.1f} ms; "
              f"{f['errors']} errors and {f['over_budget']} answers over budget out of {f['requests']} requests; "
              f"after the stop: {f['served_by_after_stop']}."]
    return "\n".join(lines)
