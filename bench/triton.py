"""Triton benchmark (issue 3's bar), against the real embedded tritonserver.

* dynamic batching against none: the same INT8 ranker served twice, closed loop at concurrency
  64 with batch-1 requests from h2load (a C load generator: a Python client took a third of a
  2-core machine's CPU from the server), the two configs alternating round by round: throughput
  ratio and p99; every call is checked against Triton's own success counter;
* batch-1 latency at concurrency 1: client-measured against Triton's own server-side time
  (queue + compute, from the statistics delta around each request), p50 and p99.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from bench import h2load
from bench.compression import SERVED
from bench.timing import paired_ratio
from recserve.converters.build import build
from recserve.converters.triton_config import BuildProfile
from recserve.data import load_dataset
from recserve.triton.client import TritonClient
from recserve.triton.server import EmbeddedTriton, ServerSettings

CONCURRENCY = 64
QUEUE_DELAY_US = 0
REQUESTS = 40_000
"""Per round: two to ten seconds of load."""
ROUNDS = 5
CONNECTIONS = 4
"""HTTP/2 connections the load generator spreads the concurrency over."""
METHOD = "inference.GRPCInferenceService/ModelInfer"
T = TypeVar("T")


def _inputs(sparse: np.ndarray, dense: np.ndarray) -> list:
    a = grpcclient.InferInput("sparse", list(sparse.shape), "INT64")
    a.set_data_from_numpy(sparse)
    b = grpcclient.InferInput("dense", list(dense.shape), "FP32")
    b.set_data_from_numpy(dense)
    return [a, b]


def infer_request(model: str, sparse: np.ndarray, dense: np.ndarray) -> service_pb2.ModelInferRequest:
    """A KServe v2 request built once and reused: the load generator's own cost stays small."""
    req = service_pb2.ModelInferRequest(model_name=model)
    for name, arr, dtype in (("sparse", sparse, "INT64"), ("dense", dense, "FP32")):
        req.inputs.add(name=name, datatype=dtype, shape=list(arr.shape))
        req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    return req


STATS_SETTLE_S = 5.0
"""Triton's backends report a batch's statistics after sending its responses, so a client holding every
answer can read counts a moment old: how long :func:`_settled` waits for them to reach what was sent."""


def _settled(read: Callable[[], T], done: Callable[[T], bool]) -> T:
    """``read()`` again until ``done`` says its value has caught up, or ``STATS_SETTLE_S`` passed: the last value."""
    deadline = time.monotonic() + STATS_SETTLE_S
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.001)
    return value


def _successes(client: TritonClient, model: str) -> tuple[int, int]:
    """Rows Triton scored for ``model`` (its ``inference_count``: a batch of n rows counts n) and failed calls."""
    stats = client.statistics(model)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats["inference_stats"].get("fail", {}).get("count", 0))


def counted(client: TritonClient, model: str, total: int, load: Callable[[], T], rows: int = 1) -> T:
    """``load()``'s result, raising unless Triton scored exactly ``total`` calls of ``rows`` rows of
    ``model`` meanwhile, none failing: h2load sees HTTP statuses only, and a gRPC error is HTTP 200 too.
    The load may go to Triton itself or to a router in front of it (which may carry several Rank calls
    in one Triton call: rows, not calls, are what every path has in common)."""
    ok0, fail0 = _successes(client, model)
    result = load()
    want = (ok0 + total * rows, fail0)
    ok1, fail1 = _settled(lambda: _successes(client, model), want.__eq__)
    if (ok1 - ok0, fail1 - fail0) != (total * rows, 0):
        raise RuntimeError(f"{model}: Triton scored {ok1 - ok0} rows of the {total} x {rows} sent, "
                           f"{fail1 - fail0} calls failed")
    return result


def counted_load(client: TritonClient, model: str, target: str | list[str], method: str, message: bytes,
                 concurrency: int, total: int, headers: dict[str, str] | None = None,
                 rows: int = 1) -> tuple[np.ndarray, float]:
    """h2load's closed loop (latencies ms, wall s), every call checked by :func:`counted`."""
    return counted(client, model, total,
                   lambda: h2load.closed_loop(target, method, message, concurrency, total, CONNECTIONS, headers), rows)


def triton_load(client: TritonClient, url: str, model: str, message: bytes, concurrency: int, total: int) -> dict:
    """One closed-loop round of batch-1 calls straight to Triton: requests/s, p50 and p99."""
    latencies, wall = counted_load(client, model, url, METHOD, message, concurrency, total)
    return {"rps": total / wall, "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99))}


def server_vs_client(client: TritonClient, url: str, model: str, rows, n: int = 300) -> dict:
    raw = grpcclient.InferenceServerClient(url)
    client_ms, server_ms = [], []

    def server_ns() -> tuple[int, int]:
        """(successful calls, their queue + compute ns)."""
        s = client.statistics(model)["model_stats"][0]["inference_stats"]
        return int(s["success"].get("count", 0)), sum(
            int(s[k].get("ns", 0)) for k in ("queue", "compute_input", "compute_infer", "compute_output"))

    for i in range(n + 20):
        sp, de = rows[i % len(rows)]
        calls, before = server_ns()
        t0 = time.perf_counter()
        raw.infer(model, _inputs(sp, de))
        took = time.perf_counter() - t0
        _, after = _settled(server_ns, lambda v, want=calls + 1: v[0] >= want)
        if i >= 20:
            client_ms.append(took * 1e3)
            server_ms.append((after - before) / 1e6)
    raw.close()
    pct = lambda a, q: float(np.percentile(a, q))  # noqa: E731
    return {"client_p50_ms": pct(client_ms, 50), "client_p99_ms": pct(client_ms, 99),
            "server_p50_ms": pct(server_ms, 50), "server_p99_ms": pct(server_ms, 99)}


def run(workdir: Path) -> dict:
    model_dir = workdir / SERVED
    if not (model_dir / "model.onnx").exists():
        raise RuntimeError(f"run the compression benchmark first (it writes {SERVED})")
    repo = workdir / "triton-repo"
    # No queue delay and no preferred size: the batcher never holds a request back for a fuller batch
    # (a 1 ms delay waiting for 64 left the one instance idle between batches), and batches form from
    # what queued while the instance was busy: under load they are large, alone a request runs at once.
    build(model_dir, "ranker_batched", "onnxruntime", repo,
          BuildProfile(max_queue_delay_us=QUEUE_DELAY_US, intra_op_threads=1))
    build(model_dir, "ranker_nobatch", "onnxruntime", repo, BuildProfile(dynamic_batching=False, intra_op_threads=1))
    data = load_dataset(_spec(workdir), preprocessing=model_dir / "preprocessing.json")
    t = data.ranking_test
    rows = [(t.sparse[i:i + 1], t.dense[i:i + 1]) for i in range(512)]
    messages = {m: infer_request(m, *rows[0]).SerializeToString() for m in ("ranker_batched", "ranker_nobatch")}
    settings = ServerSettings.on_free_ports(repo)
    with EmbeddedTriton(settings) as server, TritonClient(server.grpc_url) as client:
        latency = {m: server_vs_client(client, server.grpc_url, m, rows) for m in ("ranker_nobatch", "ranker_batched")}
        results: dict[str, list[dict]] = {"ranker_batched": [], "ranker_nobatch": []}
        for model in results:  # warm-up
            triton_load(client, server.grpc_url, model, messages[model], CONCURRENCY, REQUESTS // 10)
        for _ in range(ROUNDS):
            for model in results:
                results[model].append(triton_load(client, server.grpc_url, model, messages[model], CONCURRENCY, REQUESTS))
        stats = {m: client.statistics(m)["model_stats"][0] for m in results}
    med = {m: {k: float(np.median([r[k] for r in rs])) for k in ("rps", "p50_ms", "p99_ms")} for m, rs in results.items()}
    return {
        "model": "the compressed MovieLens ranker (budgeted search)", "concurrency": CONCURRENCY, "requests_per_round": REQUESTS,
        "load_generator": f"h2load, {CONNECTIONS} HTTP/2 connections", "cores": os.cpu_count(), "queue_delay_us": QUEUE_DELAY_US,
        "rounds": ROUNDS, "dynamic_batching": med["ranker_batched"], "no_batching": med["ranker_nobatch"],
        "throughput_ratio": paired_ratio([r["rps"] for r in results["ranker_batched"]],
                                         [r["rps"] for r in results["ranker_nobatch"]]),
        "batches": {m: {"inference_count": int(s["inference_count"]), "execution_count": int(s["execution_count"]),
                        "server_compute_us_per_inference": _compute_ns(s) / int(s["inference_count"]) / 1e3}
                    for m, s in stats.items()},
        "batch1_latency": latency,
    }


def _compute_ns(model_stats: dict) -> int:
    """Server compute time of all executions (batch_stats: one entry per batch size; a request's own
    inference_stats would charge it the whole batch's time)."""
    return sum(int(b[k]["ns"]) for b in model_stats.get("batch_stats", [])
               for k in ("compute_input", "compute_infer", "compute_output") if k in b)


def _spec(workdir: Path) -> str:
    import json

    return json.loads((workdir / SERVED / "report.json").read_text())["data"]


def markdown(r: dict) -> str:
    b, n, lat = r["dynamic_batching"], r["no_batching"], r["batch1_latency"]
    lines = [f"### Triton ({r['model']}, embedded tritonserver on CPU)", "",
             f"Closed loop, concurrency {r['concurrency']} ({r['load_generator']}) on {r['cores']} cores, "
             f"batch-1 requests, {r['requests_per_round']:,} a round, {r['rounds']} alternating rounds:", "",
             "| config | requests/s | p50 ms | p99 ms | inferences / executions | server compute us / inference |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, x in (("dynamic batching", b), ("no batching", n)):
        key = "ranker_batched" if name == "dynamic batching" else "ranker_nobatch"
        c = r["batches"][key]
        lines.append(f"| {name} | {x['rps']:,.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | "
                     f"{c['inference_count']:,} / {c['execution_count']:,} | {c['server_compute_us_per_inference']:.1f} |")
    cost = r["batches"]["ranker_nobatch"]["server_compute_us_per_inference"] / \
        r["batches"]["ranker_batched"]["server_compute_us_per_inference"]
    lines += ["", f"Dynamic batching: **{r['throughput_ratio']:.2f}x** the end-to-end throughput of no batching (paired "
              f"rounds; the load generator and Triton share the machine's cores); server compute per inference "
              f"{cost:.1f}x lower.", "",
              "Batch-1 latency at concurrency 1 (ms; server-side = Triton's queue + compute for the same requests):", "",
              "| config | client p50 | client p99 | server p50 | server p99 |", "|---|---:|---:|---:|---:|"]
    for key, name in (("ranker_nobatch", "no batching"),
                      ("ranker_batched", f"dynamic batching ({r.get('queue_delay_us', QUEUE_DELAY_US)} us queue delay)")):
        x = lat[key]
        lines.append(f"| {name} | {x['client_p50_ms']:.3f} | {x['client_p99_ms']:.3f} | {x['server_p50_ms']:.3f} | "
                     f"{x['server_p99_ms']:.3f} |")
    return "\n".join(lines)
