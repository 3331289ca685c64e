"""Router benchmark (issues 4 and 15): what the Ray Serve router costs over calling Triton directly, and
failover time when the cloud goes away.

Capacity (issue 15's bar): the same generator (h2load, open loop, calls evenly spaced) sweeps rising
rates at Triton directly and through the router; each path's capacity is the highest rate whose p99
stayed within 10 ms, and ``capacity_ratio`` is the router's over Triton's. ``cpu_ms_per_request`` is
the router replicas' own CPU (their ``process_cpu_seconds_total``, less what they spend idle) per
routed call in a closed loop at concurrency 16 (``cpu_ms_per_request_half_capacity``: open loop at
half the router's capacity), next to the same figure for a Python gRPC server that does no work.

Both paths rank the same 50 candidates with the same INT8 ranker on the same embedded Triton; the
router's cache is off. At each concurrency the two run in alternating rounds (closed loop, from
h2load as in the Triton benchmark, every call checked against Triton's success counter), and the
added latency is router minus direct, p50 and p99. In a closed loop the slower path also gets fewer
calls per second, so at high concurrency the gap is mostly queueing behind the router's capacity.
The open-loop part sends both paths the same fixed rates (shares of the router's closed-loop
throughput at concurrency 16) to show what the router adds when it is not the bottleneck, next to
a Python gRPC server that does no work at the same rates.

Failover: a steady stream of Rank calls with a 100 ms budget while Triton is stopped; we report when
the first edge answer came, the slowest answer around the switch, and errors (should be none).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from bench import h2load
from bench.compression import SERVED
from bench.triton import METHOD, counted, counted_load, infer_request
from recserve.converters.build import build
from recserve.converters.triton_config import BuildProfile
from recserve.loadtest import trivial
from recserve.serving import app
from recserve.serving.client import RouterClient
from recserve.serving.config import RouterConfig
from recserve.serving.protos.recommender_pb2 import RankRequest
from recserve.triton.client import TritonClient
from recserve.triton.retrieval import ItemIndex, build_catalog_dir, context_encoder
from recserve.triton.server import EmbeddedTriton, ServerSettings, free_ports

CANDIDATES = 50
INGRESS = os.environ.get("BENCH_ROUTER_INGRESS", "replica")
REPLICAS = int(os.environ.get("BENCH_ROUTER_REPLICAS", "1"))
"""The router's shape: one replica serving its own port by default (``ingress: replica``; ``direct`` for Serve's
direct ingress); with more, one h2load per replica port shares out the calls, or Serve's proxy does (proxy)."""
LEVELS = (1, 16, 64)
REQUESTS = {1: 500, 16: 2000, 64: 3000}
ROUNDS = 3
RANK = "recserve.Recommender/Rank"
DEADLINE = {"grpc-timeout": "2S"}
"""Rank calls carry a 2 s deadline: the router always has the time to ask Triton."""
LOAD_FRACTIONS = (0.25, 0.5)
"""Open loop: fixed rates at these shares of the router's open-loop capacity (p99 <= SLO_P99_MS)."""
SLO_P99_MS = 10.0
SWEEP = (50.0, 1.25, 25)
"""Capacity sweeps: first rate, growth per step, most steps (50/s to about 13,000/s)."""
OPEN_LOOP_S = 2.0
"""Seconds of calls per open-loop round."""
OPEN_LOOP_CONNECTIONS = 1
"""h2load paces each connection on its own timer, and connections opened together tick together:
with 4, calls arrive in bursts of 4 (each burst's last waits for three). One connection per target
sends them evenly spaced."""


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


def _median(a: list[float]) -> float:
    return float(np.median(a))


Load = Callable[[str | list[str], str, bytes, dict | None], tuple[np.ndarray, float]]
"""(target, method, message, headers) -> (latencies ms, calls/s), every call counted by Triton."""


def _closed(client: TritonClient, concurrency: int, n: int) -> Load:
    def load(target, method, message, headers):
        latencies, wall = counted_load(client, "ranker", target, method, message, concurrency, n, headers,
                                       rows=CANDIDATES)
        return latencies, n / wall
    return load


def _open(client: TritonClient, rate: float, n: int) -> Load:
    def load(target, method, message, headers):
        return counted(client, "ranker", n, lambda: h2load.open_loop(target, method, message, rate, n,
                                                                      connections=OPEN_LOOP_CONNECTIONS, headers=headers),
                       rows=CANDIDATES)
    return load


def capacities(client: TritonClient, paths: dict[str, tuple]) -> dict[str, dict]:
    """Per path, the highest open-loop rate whose p99 stayed within SLO_P99_MS. Rates rise by SWEEP's growth;
    at each rate every path still in the sweep runs in turn (machine drift hits them alike), and a path
    leaves the sweep after two rates in a row that missed (p99 over the SLO, the sender falling behind,
    or the router answering from the edge): one noisy step on a shared machine does not end it."""
    first, growth, most = SWEEP
    out = {name: {"max_rate_meeting_slo": 0.0, "steps": []} for name in paths}
    misses = dict.fromkeys(paths, 0)
    rate = first
    for _ in range(most):
        live = [name for name in paths if misses[name] < 2]
        if not live:
            break
        n = max(300, int(rate * OPEN_LOOP_S))
        for name in live:
            try:
                latencies, achieved = _open(client, rate, n)(*paths[name])
            except (h2load.LoadGeneratorError, RuntimeError) as e:
                out[name]["steps"].append({"rate": rate, "failed": str(e)[:200]})
                misses[name] += 1
                continue
            p99 = float(np.percentile(latencies, 99))
            out[name]["steps"].append({"rate": rate, "achieved_rps": achieved,
                                       "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": p99})
            if p99 <= SLO_P99_MS:
                out[name]["max_rate_meeting_slo"], misses[name] = rate, 0
            else:
                misses[name] += 1
        rate *= growth
    return out


def _replica_stats(cfg: RouterConfig) -> tuple[float, float]:
    """(CPU seconds, resident bytes) summed over the router replicas, from their own /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    cpu = rss = 0.0
    for base in cfg.http_bases():
        text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "process_cpu_seconds_total":
                    cpu += sample.value
                elif sample.name == "process_resident_memory_bytes":
                    rss += sample.value
    return cpu, rss


def cpu_per_call(cfg: RouterConfig, send: Callable[[], int]) -> float:
    """Router replica CPU (ms) per routed call while ``send()`` sends its calls (it returns how many), less what
    the replicas spend idle over as long (Ray's own threads: heartbeats, metrics)."""
    cpu0, _ = _replica_stats(cfg)
    t0 = time.perf_counter()
    n = send()
    took = time.perf_counter() - t0
    cpu1, _ = _replica_stats(cfg)
    time.sleep(took)
    idle = _replica_stats(cfg)[0] - cpu1
    return max(0.0, cpu1 - cpu0 - idle) / n * 1e3


def _process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _alternate(paths: dict[str, tuple], load: Load) -> dict[str, tuple[list, list]]:
    """``load(target, method, message, headers)`` on each path in turn, ROUNDS times (machine drift
    hits both alike): per path, every latency and the per-round figure (calls/s)."""
    out: dict[str, tuple[list, list]] = {name: ([], []) for name in paths}
    for _ in range(ROUNDS):
        for name, (target, method, message, headers) in paths.items():
            latencies, figure = load(target, method, message, headers)
            out[name][0].extend(latencies)
            out[name][1].append(figure)
    return out


def _python_grpc_floor(message: bytes, rates: list[float]) -> dict:
    """The same Rank message to a Python gRPC server that does no work (``recserve.loadtest.trivial``):
    p50/p99 at concurrency 1 and at the open-loop rates. Part of what a call at a steady rate costs
    over one sent the moment the last returned is waking idle threads, in any Python gRPC service."""
    proc, url = trivial.spawn()
    try:
        h2load.closed_loop(url, RANK, message, 1, 200)
        out = {"closed_c1": _pct(h2load.closed_loop(url, RANK, message, 1, REQUESTS[1] * ROUNDS)[0])}
        cpu0 = _process_cpu_s(proc.pid)
        out["closed_c16"] = _pct(h2load.closed_loop(url, RANK, message, 16, REQUESTS[16])[0])
        out["closed_c16"]["cpu_ms_per_request"] = (_process_cpu_s(proc.pid) - cpu0) / REQUESTS[16] * 1e3
        for rate in rates:
            n = max(100, int(rate * OPEN_LOOP_S))
            cpu0 = _process_cpu_s(proc.pid)
            out[f"{rate:.0f}"] = _pct(h2load.open_loop(url, RANK, message, rate, n,
                                                       connections=OPEN_LOOP_CONNECTIONS)[0])
            out[f"{rate:.0f}"]["cpu_ms_per_request"] = (_process_cpu_s(proc.pid) - cpu0) / n * 1e3
        return out
    finally:
        proc.kill()
        proc.wait()


def http2_framing(calls: int = 2000, rounds: int = 3) -> dict:
    """CPU per call of a gRPC server's HTTP/2 handling alone, in this process, on the same calls (h2's client
    as the peer, headers as grpcio sends them, a 300-byte request and a 130-byte answer with trailers):
    the ``h2`` package, which the replica's server used before, against ``recserve.serving.http2``.
    Rounds alternate; medians in microseconds."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, StreamEnded

    from recserve.serving import http2

    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", RANK.encode()), (b":authority", b"router"),
               (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"100m")]
    request, response = b"\x00\x00\x00\x01\x2b" + b"r" * 299, b"\x00\x00\x00\x00\x7d" + b"a" * 125
    ok = ((b"grpc-status", b"0"),)
    blocks = (http2.header_block(((b":status", b"200"), (b"content-type", b"application/grpc"))),
              http2.header_block(ok))

    def h2_server():
        conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()

        def handle(raw: bytes) -> bytes:
            for ev in conn.receive_data(raw):
                if isinstance(ev, DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, StreamEnded):
                    conn.send_headers(ev.stream_id, ((b":status", b"200"), (b"content-type", b"application/grpc")))
                    conn.send_data(ev.stream_id, response)
                    conn.send_headers(ev.stream_id, ok, end_stream=True)
            return conn.data_to_send()
        return conn.data_to_send(), handle

    def lite_server():
        conn = http2.server(max_streams=1000, initial_window=1 << 20, max_header_bytes=64 << 10,
                                      connection_window=4 << 20)

        def handle(raw: bytes) -> bytes:
            for ev in conn.receive(raw):
                if type(ev) is http2.Data and ev.ended:
                    conn.send_headers(ev.stream_id, blocks[0])
                    conn.send_data(ev.stream_id, response)
                    conn.send_headers(ev.stream_id, blocks[1], end_stream=True)
            return conn.data_to_send()
        return conn.data_to_send(), handle

    def per_call(make) -> float:
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        greeting, handle = make()
        client.receive_data(greeting)
        spent, answered = 0.0, 0
        for _ in range(calls):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, headers)
            client.send_data(sid, request, end_stream=True)
            raw = client.data_to_send()
            t0 = time.process_time()
            out = handle(raw)
            spent += time.process_time() - t0
            for ev in client.receive_data(out):
                if isinstance(ev, DataReceived):
                    client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                answered += isinstance(ev, StreamEnded)
        assert answered == calls, answered
        return spent / calls * 1e6

    got: dict[str, list[float]] = {"h2": [], "recserve": []}
    for _ in range(rounds):
        got["h2"].append(per_call(h2_server))
        got["recserve"].append(per_call(lite_server))
    out = {k: _median(v) for k, v in got.items()}
    return {"h2_us_per_call": out["h2"], "recserve_us_per_call": out["recserve"],
            "ratio": out["h2"] / out["recserve"]}


def _added(by_path: dict[str, dict]) -> dict:
    d, r = by_path["direct"], by_path["router"]
    return {"direct": d, "router": r, "added_p50_ms": r["p50_ms"] - d["p50_ms"], "added_p99_ms": r["p99_ms"] - d["p99_ms"]}


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


def serve_ranker(model_dir: Path, spec: str, workdir: Path, replicas: int = REPLICAS,
                 ingress: str = INGRESS) -> tuple[EmbeddedTriton, RouterConfig, list[RankRequest], list]:
    """The ranker in ``model_dir`` built into a repository under ``workdir`` and served by the embedded Triton, and
    the router's config for it (edge: the same model, cache off; not started): (Triton, config, Rank requests,
    the ranker rows the router builds for them)."""
    repo = workdir / "router-repo"
    build(model_dir, "ranker", "onnxruntime", repo, BuildProfile(max_queue_delay_us=200, preferred_batch_sizes=[64]))
    catalog_dir = build_catalog_dir(model_dir, spec, workdir / "catalog")
    catalog = ItemIndex(catalog_dir)
    ranks, rows = _requests(catalog, context_encoder(model_dir / "preprocessing.json", catalog.layout))
    triton = EmbeddedTriton(ServerSettings.on_free_ports(repo)).start()
    cfg = RouterConfig.model_validate({
        "triton_url": triton.grpc_url, "grpc_port": free_ports(replicas), "http_port": free_ports(replicas),
        "cache_ttl_s": 0, "ingress": ingress, "num_replicas": replicas,
        "models": {"ranker": {"rankers": [{"triton_model": "ranker", "edge_model": str(model_dir / "model.onnx")}],
                              "catalog": str(catalog_dir), "preprocessing": str(model_dir / "preprocessing.json")}}})
    return triton, cfg, ranks, rows


def run(workdir: Path) -> dict:
    model_dir = workdir / SERVED
    spec = json.loads((model_dir / "report.json").read_text())["data"]
    triton, cfg, ranks, rows = serve_ranker(model_dir, spec, workdir)
    t0 = time.perf_counter()
    app.start(cfg)
    startup_s = time.perf_counter() - t0
    router_url = cfg.grpc_targets()
    paths = {"direct": (triton.grpc_url, METHOD, infer_request("ranker", *rows[0]).SerializeToString(), None),
             "router": (router_url, RANK, ranks[0].SerializeToString(), DEADLINE)}
    try:
        with TritonClient(triton.grpc_url) as client:
            counted_load(client, "ranker", *paths["router"][:3], 4, 200, DEADLINE, rows=CANDIDATES)  # warm-up
            levels = {}
            for c in LEVELS:
                runs = _alternate(paths, _closed(client, c, REQUESTS[c]))
                levels[str(c)] = _added({k: _pct(lat) | {"rps": _median(x)} for k, (lat, x) in runs.items()})
            caps = capacities(client, paths)
            router_capacity = caps["router"]["max_rate_meeting_slo"]
            rates = {}
            for fraction in LOAD_FRACTIONS:
                rate = fraction * (router_capacity or SWEEP[0])
                runs = _alternate(paths, _open(client, rate, max(100, int(rate * OPEN_LOOP_S))))
                rates[f"{fraction:g}"] = {"rate": rate} | _added(
                    {k: _pct(lat) | {"achieved_rps": _median(x)} for k, (lat, x) in runs.items()})
            half = 0.5 * (router_capacity or SWEEP[0])

            def at_half() -> int:
                n = max(300, int(half * 3))
                _open(client, half, n)(*paths["router"])
                return n

            def busy() -> int:
                _closed(client, 16, REQUESTS[16])(*paths["router"])
                return REQUESTS[16]

            cpu_half, cpu_busy = cpu_per_call(cfg, at_half), cpu_per_call(cfg, busy)
            rss = _replica_stats(cfg)[1]
            floor = _python_grpc_floor(paths["router"][2], [x["rate"] for x in rates.values()])
            framing = http2_framing()
        fail = failover(triton, router_url, ranks)
    finally:
        triton.stop()
        app.stop()
    direct_capacity = caps["direct"]["max_rate_meeting_slo"]
    return {"candidates": CANDIDATES, "ingress": INGRESS, "replicas": REPLICAS, "load_generator": "h2load",
            "cores": os.cpu_count(), "levels": levels, "open_loop": rates, "capacity": caps,
            "capacity_ratio": router_capacity / direct_capacity if direct_capacity else None,
            "cpu_ms_per_request": cpu_busy, "cpu_ms_per_request_half_capacity": cpu_half,
            "replica_rss_mb": rss / 2**20, "startup_s": startup_s,
            "python_grpc_floor": floor, "http2_framing": framing, "failover": fail}


def markdown(r: dict) -> str:
    shape = f"{r['replicas']} replica{'s' if r['replicas'] > 1 else ''}, {r['ingress']} ingress"
    lines = [f"### Router (Ray Serve, {shape} -> Triton; {r['candidates']} candidates per request, cache off; "
             f"load from {r.get('load_generator', 'h2load')} on {r['cores']} cores)",
             "", "Closed loop (the bar): each concurrency level alternates direct and routed rounds.", "",
             "| concurrency | direct Triton p50 / p99 ms | through router p50 / p99 ms | added p50 | added p99 "
             "| direct / router calls/s |", "|---:|---:|---:|---:|---:|---:|"]
    for c, x in r["levels"].items():
        rps = f"{x['direct']['rps']:,.0f} / {x['router']['rps']:,.0f}" if "rps" in x["direct"] else "-"
        lines.append(f"| {c} | {x['direct']['p50_ms']:.2f} / {x['direct']['p99_ms']:.2f} | {x['router']['p50_ms']:.2f} / "
                     f"{x['router']['p99_ms']:.2f} | {x['added_p50_ms']:+.2f} | {x['added_p99_ms']:+.2f} | {rps} |")
    if r.get("open_loop"):
        lines += ["", "Open loop at fixed shares of the router's open-loop capacity: "
                  "what the router adds when it is not the bottleneck.", "",
                  "| share of capacity | calls/s | direct Triton p50 / p99 ms | through router p50 / p99 ms | added p50 "
                  "| added p99 |", "|---:|---:|---:|---:|---:|---:|"]
        for share, x in r["open_loop"].items():
            lines.append(f"| {float(share):.0%} | {x['rate']:,.0f} | {x['direct']['p50_ms']:.2f} / {x['direct']['p99_ms']:.2f} "
                         f"| {x['router']['p50_ms']:.2f} / {x['router']['p99_ms']:.2f} | {x['added_p50_ms']:+.2f} "
                         f"| {x['added_p99_ms']:+.2f} |")
    if r.get("capacity"):
        caps = r["capacity"]
        floor = r["python_grpc_floor"]
        floor_open = [x["cpu_ms_per_request"] for k, x in floor.items() if not k.startswith("closed")]
        lines += ["", f"Capacity (open loop, rates rising by {SWEEP[1]:g}x, highest with p99 <= {SLO_P99_MS:g} ms): "
                  f"Triton direct {caps['direct']['max_rate_meeting_slo']:,.0f}/s, through the router "
                  f"{caps['router']['max_rate_meeting_slo']:,.0f}/s: **capacity_ratio "
                  + (f"{r['capacity_ratio']:.2f}**" if r["capacity_ratio"] is not None else "-**")
                  + f". Router replica CPU per routed call: **{r['cpu_ms_per_request']:.3f} ms** at concurrency 16 "
                  f"({floor['closed_c16']['cpu_ms_per_request']:.3f} ms for a Python gRPC server doing no work), "
                  f"{r['cpu_ms_per_request_half_capacity']:.3f} ms at half its capacity"
                  + (f" ({min(floor_open):.3f}-{max(floor_open):.3f} ms for the server doing no work)" if floor_open else "")
                  + f"; replica RSS {r['replica_rss_mb']:.0f} MiB; `app.start` to serving {r['startup_s']:.1f} s."]
    if r.get("python_grpc_floor"):
        floor = r["python_grpc_floor"]
        lines += ["", "A Python gRPC server doing no work, same load generator (p50 / p99 ms): concurrency 1 "
                  + f"{floor['closed_c1']['p50_ms']:.2f} / {floor['closed_c1']['p99_ms']:.2f}; "
                  + "; ".join(f"open loop {float(rate):,.0f}/s {x['p50_ms']:.2f} / {x['p99_ms']:.2f}"
                              for rate, x in floor.items() if not rate.startswith("closed")) + "."]
    if r.get("http2_framing"):
        x = r["http2_framing"]
        lines += ["", f"HTTP/2 framing alone, CPU per call in one process (the same calls, rounds alternating): the h2 "
                  f"package {x['h2_us_per_call']:.0f} us, the replica's own (`recserve.serving.http2`) "
                  f"{x['recserve_us_per_call']:.0f} us ({x['ratio']:.1f}x less)."]
    f = r["failover"]
    first = f["first_edge_answer_after_stop_ms"]
    lines += ["", f"Failover (Triton stopped under a Rank stream, {f['budget_ms']} ms budget): first edge answer "
              f"{first:.1f} ms after the stop; slowest answer in the first second {f['max_latency_first_second_ms']:.1f} ms; "
              f"{f['errors']} errors and {f['over_budget']} answers over budget out of {f['requests']} requests; "
              f"after the stop: {f['served_by_after_stop']}."]
    return "\n".join(lines)
