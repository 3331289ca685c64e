"""The load tester against real gRPC servers: the trivial server, a deliberately slow one, Triton."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from recserve.loadtest import generator, trivial
from recserve.loadtest.scenario import Scenario
from recserve.triton.server import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def trivial_server():
    def start(service_ms: float = 0.0) -> str:
        p, url = trivial.spawn(service_ms)
        procs.append(p)
        return url

    procs: list[subprocess.Popen] = []
    yield start
    for p in procs:
        p.kill()
        p.wait()


def _scenario(url: str | list[str], **kw) -> Scenario:
    base = {"target": "trivial", "url": url, "arrivals": {"process": "poisson", "rate": 200, "duration_s": 2,
                                                          "warmup_s": 0.5},
            "requests": {"candidates_min": 2, "candidates_max": 4}, "max_lag_p99_ms": 50}
    return Scenario.model_validate(base | kw)


def test_report_has_the_requested_rate_and_sane_percentiles(trivial_server):
    r = generator.run(_scenario(trivial_server())).report()
    assert r["rate"] == 200 and r["errors"] == {}
    assert r["achieved_rps"] == pytest.approx(200, rel=0.2)
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
    assert r["lag_ms"]["p99"] is not None and r["valid"]


def test_a_list_of_addresses_spreads_the_load_round_robin(trivial_server):
    # two fast servers and one that takes 10 ms a request (30 a second reach it: 30% busy): about a
    # third of the answers are slow, the median is fast
    urls = [trivial_server(), trivial_server(), trivial_server(service_ms=10.0)]
    r = generator.run(_scenario(urls, arrivals={"process": "constant", "rate": 90, "duration_s": 2,
                                                "warmup_s": 0.3})).report()
    lat = r["latency_ms"]
    assert r["errors"] == {} and r["valid"]
    assert lat["p50"] < 8 and lat["p90"] >= 10, lat


def test_open_loop_shows_the_queueing_a_closed_loop_hides(trivial_server):
    """A server taking 10 ms per request, one at a time, can do 100/s. Offered 150/s, the queue grows
    for the whole run: open-loop latency (from the intended send time) climbs far past the service
    time, while a closed loop with one request in flight sees just the service time."""
    url = trivial_server(service_ms=10)
    arrivals = {"process": "constant", "rate": 150, "duration_s": 2, "warmup_s": 0}
    open_loop = generator.run(_scenario(url, arrivals=arrivals, timeout_ms=5000)).report()
    closed = generator.run(_scenario(url, mode="closed", concurrency=1, arrivals=arrivals)).report()
    assert closed["latency_ms"]["p99"] < 30
    assert open_loop["latency_ms"]["p99"] > 300  # ~50 requests queued by the end: ~0.5 s behind
    assert open_loop["latency_ms"]["p99"] > 10 * closed["latency_ms"]["p99"]


def test_timeouts_are_counted_by_status(trivial_server):
    url = trivial_server(service_ms=50)
    r = generator.run(_scenario(url, timeout_ms=20)).report()
    assert r["errors"].get("DEADLINE_EXCEEDED", 0) > 0
    assert r["ok"] + sum(r["errors"].values()) == r["requests"]


def test_unreachable_target_is_counted_not_raised():
    r = generator.run(_scenario(f"127.0.0.1:{free_port()}", timeout_ms=200)).report()
    assert r["ok"] == 0 and r["errors"].get("UNAVAILABLE", 0) == r["requests"] > 0


def test_two_worker_processes_share_the_schedule(trivial_server):
    url = trivial_server()
    r = generator.run(_scenario(url, workers=2)).report()
    assert r["requests"] == pytest.approx(400, rel=0.2) and r["errors"] == {}


def test_sweep_finds_the_highest_rate_meeting_the_slo(trivial_server):
    url = trivial_server(service_ms=10)  # capacity 100/s
    s = _scenario(url, slo_p99_ms=40, timeout_ms=5000,
                  arrivals={"process": "constant", "rate": 1, "duration_s": 1.5, "warmup_s": 0})
    result = generator.sweep(s, [40, 300])
    assert [x["rate"] for x in result["runs"]] == [40, 300]
    assert result["max_rate_meeting_slo"] == 40


def test_cli_exits_3_when_nothing_succeeds_or_errors_are_too_many(tmp_path, trivial_server):
    def cli(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from recserve.cli import main; main()", "loadtest", *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    scenario = tmp_path / "s.yaml"
    scenario.write_text("target: trivial\nurl: 127.0.0.1:1\ntimeout_ms: 200\nmax_lag_p99_ms: 50\n"
                        "arrivals: {process: constant, rate: 50, duration_s: 1, warmup_s: 0}\n")
    dead = cli(scenario, "--url", f"127.0.0.1:{free_port()}")
    assert dead.returncode == 3, dead.stderr
    (line,) = [x for x in dead.stderr.splitlines() if x.startswith("error:")]
    assert "no request succeeded" in line and "UNAVAILABLE" in line
    alive = cli(scenario, "--url", trivial_server(), "--json")
    assert alive.returncode == 0, alive.stderr
    assert json.loads(alive.stdout)["run"]["valid"] is True
    slow = cli(scenario, "--url", trivial_server(service_ms=300), "--max-error-rate", "0.05")
    assert slow.returncode == 3 and "DEADLINE_EXCEEDED" in slow.stderr and "--max-error-rate 5.0%" in slow.stderr


def test_cli_rejects_a_bad_scenario_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("arrivals: {rate: fast}\n")
    p = subprocess.run([sys.executable, "-c", "from recserve.cli import main; main()", "loadtest", str(bad)],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert "error:" in p.stderr and "arrivals.rate" in p.stderr and "Traceback" not in p.stderr


def test_h2load_keeps_the_concurrency_in_flight(trivial_server):
    """The benchmarks' C load generator (bench/h2load.py) against a server that takes 4 ms a request,
    one at a time: with 4 calls always in flight each waits for the 3 ahead of it (~16 ms), and 40
    calls take at least 40 x 4 ms."""
    from bench import h2load
    from recserve.serving.protos.recommender_pb2 import RankRequest

    url = trivial_server(service_ms=4)
    message = RankRequest(request_id="r", candidate_item_ids=["a", "b"], top_k=1).SerializeToString()
    latencies, wall = h2load.closed_loop(url, "recserve.Recommender/Rank", message, concurrency=4, total=40,
                                         connections=2)
    assert len(latencies) == 40
    assert wall >= 40 * 4e-3
    assert sorted(latencies)[20] >= 3 * 4  # queued behind the others, not one at a time


def test_h2load_splits_calls_and_concurrency_over_several_targets(trivial_server):
    """One h2load per target (one port per direct-ingress router replica), all at once: a fast server
    and one taking 10 ms a call get half of the 20 calls each."""
    from bench import h2load
    from recserve.serving.protos.recommender_pb2 import RankRequest

    urls = [trivial_server(), trivial_server(service_ms=10)]
    message = RankRequest(request_id="r", candidate_item_ids=["a"]).SerializeToString()
    latencies, wall = h2load.closed_loop(urls, "recserve.Recommender/Rank", message, concurrency=2, total=20)
    assert len(latencies) == 20
    assert (latencies >= 10).sum() == 10, sorted(latencies)
    assert wall < 20 * 10e-3  # side by side: the slow server's ten calls, not all twenty in turn


def test_h2load_says_when_the_server_is_not_there():
    from bench import h2load

    with pytest.raises(h2load.LoadGeneratorError, match="is the server at"):
        h2load.closed_loop(f"127.0.0.1:{free_port()}", "recserve.Recommender/Rank", b"", concurrency=2, total=4)


def test_h2load_open_loop_keeps_its_rate_and_shows_the_queue(trivial_server):
    """Open loop against a server that takes 4 ms a call, one at a time (250 calls/s at most): at 100
    calls/s the calls leave on schedule (40 take ~0.4 s, where a closed loop would be done in 0.16 s)
    and no queue builds (the last calls take about what the first did); at 500 calls/s they still
    leave on schedule and the queue shows in the latency (the last calls wait for the ones before
    them), which a closed loop would hide by slowing down."""
    from bench import h2load
    from recserve.serving.protos.recommender_pb2 import RankRequest

    url = trivial_server(service_ms=4)
    message = RankRequest(request_id="r", candidate_item_ids=["a"]).SerializeToString()
    latencies, achieved = h2load.open_loop(url, "recserve.Recommender/Rank", message, rate=100, total=40, connections=2)
    assert len(latencies) == 40 and 95 <= achieved <= 110
    assert np.median(latencies[-10:]) < 3 * np.median(latencies[:10])
    latencies, achieved = h2load.open_loop(url, "recserve.Recommender/Rank", message, rate=500, total=100, connections=2)
    assert achieved >= 475
    assert np.median(latencies[-10:]) > 5 * np.median(latencies[:10]) and latencies.max() >= 50


def test_h2load_open_loop_refuses_a_rate_its_in_flight_cap_holds_back(trivial_server):
    """With at most 2 calls in flight and 4 ms a call, 500 calls/s cannot leave on schedule: the calls
    would be timed from when they left, hiding the wait, so it raises instead of reporting them."""
    from bench import h2load
    from recserve.serving.protos.recommender_pb2 import RankRequest

    url = trivial_server(service_ms=4)
    message = RankRequest(request_id="r").SerializeToString()
    with pytest.raises(h2load.LoadGeneratorError, match="calls/s of the 500 asked for"):
        h2load.open_loop(url, "recserve.Recommender/Rank", message, rate=500, total=100, max_in_flight=2, connections=2)
