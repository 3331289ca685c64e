"""The router end to end: real Ray Serve (replica ingress: gRPC + HTTP on the replica) in front of the real
embedded Triton.

One Triton and one Ray/Serve start for the whole module (Ray alone takes ~8 s on 2 cores). Requests get a fresh
user id each (``stack.request()``), so the router's result cache does not answer unless a test means it to.
The tests that stop Triton run last (the last one starts it again on the same ports).
"""

from __future__ import annotations

import json
import os
import threading
import time

import grpc
import numpy as np
import pytest
import router_fixtures
from google.protobuf import json_format
from router_fixtures import (
    CANDIDATES,
    RouterStack,
    leave_server_side_time_wait,
    listener,
    listener_of,
    policy,
    start_stack,
    stop_stack,
    wait_until,
)

from recserve.serving import app
from recserve.serving.client import BUDGET_HEADER, RouterClient
from recserve.serving.policy import write_policy
from recserve.serving.protos.recommender_pb2 import RankRequest, RankResponse
from recserve.serving.router import Router
from recserve.serving.scorers import CloudError

pytestmark = pytest.mark.slow

router_repo = router_fixtures.router_repo


@pytest.fixture(scope="module")
def stack(router_repo) -> RouterStack:
    write_policy(policy({"1": 100, "2": 0}), router_repo.policy_file)
    s = start_stack(router_repo)
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def client(stack: RouterStack) -> RouterClient:
    with RouterClient(stack.grpc_target) as c:
        yield c


def rank(client: RouterClient, req: RankRequest, timeout_s: float = 5.0) -> RankResponse:
    return client.rank(req, timeout_s=timeout_s)


def serving(client: RouterClient, stack: RouterStack, *, version: str | None = None, timeout: float = 15.0,
            **req) -> RankResponse:
    """Poll until a fresh request is served by the cloud (and by ``version``); returns that response."""
    def ok():
        r = rank(client, stack.request(**req))
        return r if r.served_by == "cloud" and (version is None or r.version == version) else None

    return wait_until(ok, timeout, 0.05, f"a cloud answer from version {version}")


class FailingCloud:
    async def score(self, *a, **k):
        raise CloudError("unavailable", "offline reference")

    async def close(self):
        pass


def local_edge_answer(stack: RouterStack, req: RankRequest) -> RankResponse:
    """What the router core, in this process and without Triton, answers from the edge model (the ranker served as
    version 1): the reference the cloud's version-1 answer must equal."""
    import asyncio

    cfg = stack.config.model_copy(update={"policy_file": None, "retriever": None, "cache_ttl_s": 0})
    router = Router(cfg, cloud=FailingCloud())
    out = asyncio.run(router.rank(req, None))
    assert out.served_by == "edge"
    return out


def assert_same_ranking(got: RankResponse | dict, want: RankResponse) -> None:
    items = list(got["items"] if isinstance(got, dict) else got.items)
    scores = np.array(got["scores"] if isinstance(got, dict) else got.scores, dtype=np.float64)
    assert items == list(want.items)
    np.testing.assert_allclose(scores, np.array(want.scores), rtol=1e-4, atol=1e-6)


# --- the happy path -------------------------------------------------------------------------------------------------


def test_rank_is_served_by_the_cloud_and_http_agrees(stack: RouterStack, client: RouterClient) -> None:
    serving(client, stack, version="1")
    a = stack.request(top_k=5)
    got = rank(client, a)
    assert (got.served_by, got.model, got.version, got.request_id) == ("cloud", "ranker", "1", a.request_id)
    assert len(got.items) == 5 and set(got.items) <= set(CANDIDATES)
    assert list(got.scores) == sorted(got.scores, reverse=True)
    # Triton's version 1 is the ranker the edge runs: the same items and scores
    assert_same_ranking(got, local_edge_answer(stack, a))

    # HTTP JSON, a fresh request: served by the cloud, the same as the local reference
    b = stack.request(top_k=4)
    status, body = stack.http("/v1/rank", json_format.MessageToJson(b).encode())
    assert status == 200, body
    doc = json.loads(body)
    assert (doc["served_by"], doc["version"], doc["request_id"]) == ("cloud", "1", b.request_id)
    assert_same_ranking(doc, local_edge_answer(stack, b))

    # HTTP with the content of the gRPC request: the same items (from the router's cache)
    a_http = RankRequest()
    a_http.CopyFrom(a)
    a_http.request_id = "over-http"
    status, body = stack.http("/v1/rank", json_format.MessageToJson(a_http).encode())
    assert status == 200, body
    doc = json.loads(body)
    assert doc["items"] == list(got.items)
    assert (doc["served_by"], doc["request_id"]) == ("cache", "over-http")

    text = stack.metrics()
    assert "recserve_router_requests_total" in text
    assert stack.metric("recserve_router_requests_total", model="ranker", route="cloud", version="1", code="OK") >= 2
    assert stack.metric("recserve_router_cache_hits_total") >= 1
    assert stack.http("/healthz") == (200, b"ok")


def test_recserve_rank_over_grpc_and_http(stack: RouterStack, client: RouterClient) -> None:
    """The CLI a newcomer sends a first request with: flags or JSON, gRPC or HTTP, the version in the answer."""
    import subprocess
    import sys

    serving(client, stack, version="1")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from recserve.cli import main; main()", "rank", *args],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})

    items = ",".join(CANDIDATES[:6])
    by_flags = cli("--url", stack.grpc_target, "--user", "user_id=5", "--query", "3", "--items", items,
                   "--top-k", "3", "--numeric", "query_category_match=0.5", "--budget-ms", "2000", "--json")
    assert by_flags.returncode == 0, by_flags.stderr
    doc = json.loads(by_flags.stdout)
    assert doc["served_by"] == "cloud" and doc["version"] == "1" and len(doc["items"]) == 3
    assert set(doc["items"]) <= set(CANDIDATES[:6])
    body = json.dumps({"user": {"user_id": "6"}, "query": "3", "candidate_item_ids": CANDIDATES[:6], "top_k": 2})
    over_http = cli("--http", "--url", stack.http_base, "--request", body, "--budget-ms", "2000")
    assert over_http.returncode == 0, over_http.stderr
    lines = over_http.stdout.splitlines()
    assert lines[0].startswith("served_by cloud, model ranker version 1")
    assert [line.split()[0] for line in lines[1:]] == ["1.", "2."] and lines[1].split()[1] in CANDIDATES[:6]
    refused = cli("--url", stack.grpc_target, "--items", items, "--top-k", "2", "--model", "nope")
    assert refused.returncode == 2 and refused.stderr.startswith("error: the router at") and "NOT_FOUND" in refused.stderr


def test_replica_ingress_the_router_replica_itself_listens_on_both_ports(stack: RouterStack) -> None:
    assert stack.config.ingress == "replica"  # its own gRPC server, and Serve's direct ingress for HTTP
    for port in (stack.config.grpc_port, stack.config.http_port):
        assert "ServeReplica:recserve:RouterDeployment" in listener_of(port)


def test_requests_without_candidates_use_the_retriever(stack: RouterStack, client: RouterClient) -> None:
    from recserve.serving.router import Retriever

    catalog = stack.repo.catalog_items()
    reference = Retriever(stack.config.retriever)
    for user in ("17", "250", "3"):
        req = stack.request(candidates=[], top_k=0, user={"user_id": user})
        got = rank(client, req)
        assert got.served_by == "cloud"
        assert len(got.items) == stack.config.retriever.candidates == len(set(got.items))
        assert set(got.items) <= catalog
        # exactly the candidates the retriever finds for this user (the Retriever deployment did the work)
        assert set(got.items) == set(reference.candidates({"user_id": user}))
        top = rank(client, stack.request(candidates=[], top_k=3, user={"user_id": user}))
        assert len(top.items) == 3 and set(top.items) <= set(got.items)


# --- routing policy: weights and shadow ------------------------------------------------------------------------------


def test_weight_change_in_the_policy_file_reaches_the_traffic_split(stack: RouterStack, client: RouterClient) -> None:
    write_policy(policy({"1": 100, "2": 0}), stack.repo.policy_file)
    serving(client, stack, version="1")
    for _ in range(5):
        assert rank(client, stack.request()).version == "1"

    write_policy(policy({"1": 0, "2": 100}), stack.repo.policy_file)
    first = serving(client, stack, version="2")  # the router re-reads the file within ~1 s
    assert first.served_by == "cloud"
    v1, v2 = stack.triton_inferences("1"), stack.triton_inferences("2")
    n = 10
    for _ in range(n):
        r = rank(client, stack.request())
        assert (r.served_by, r.version) == ("cloud", "2")
    # Triton's own statistics: version 2 ran them, version 1 nothing
    wait_until(lambda: stack.triton_inferences("2") >= v2 + n, 10, what="version 2 counting the requests")
    assert stack.triton_inferences("1") == v1
    assert stack.metric("recserve_router_policy_reloads") >= 2
    assert stack.metric("recserve_router_requests_total", route="cloud", version="2") >= n + 1


def test_weight_change_through_user_config_reaches_the_traffic_split(stack: RouterStack,
                                                                     client: RouterClient) -> None:
    write_policy(policy({"1": 100, "2": 0}), stack.repo.policy_file)
    serving(client, stack, version="1")
    stack.repo.policy_file.unlink()  # the router keeps its last policy while the file is gone
    for _ in range(3):
        assert rank(client, stack.request()).version == "1"
    try:
        app.update_policy(policy({"1": 0, "2": 100}), stack.config)
        serving(client, stack, version="2")
        for _ in range(5):
            r = rank(client, stack.request())
            assert (r.served_by, r.version) == ("cloud", "2")
    finally:
        write_policy(policy({"1": 100, "2": 0}), stack.repo.policy_file)


def test_a_user_config_policy_change_reconfigures_the_replica_in_place_and_drops_nothing(stack: RouterStack,
                                                                                        client: RouterClient) -> None:
    write_policy(policy({"1": 100, "2": 0}), stack.repo.policy_file)
    serving(client, stack, version="1")
    pid = listener(stack.config.grpc_port)[0]
    answered: list[str] = []
    failed: list[str] = []
    done = threading.Event()

    def stream() -> None:
        with RouterClient(stack.grpc_target) as c:
            while not done.is_set():
                try:
                    answered.append(c.rank(stack.request(), timeout_s=1.0).version)
                except grpc.RpcError as e:
                    failed.append(str(e.code()))
                time.sleep(0.005)

    t = threading.Thread(target=stream)
    t.start()
    try:
        wait_until(lambda: len(answered) >= 20, 10, what="a steady stream")
        app.update_policy(policy({"1": 0, "2": 100}), stack.config)
        wait_until(lambda: answered[-1:] == ["2"], 10, what="version 2 serving")
        n = len(answered)
        wait_until(lambda: len(answered) >= n + 20, 10, what="more answers after the change")
    finally:
        done.set()
        t.join()
        write_policy(policy({"1": 100, "2": 0}), stack.repo.policy_file)
        app.update_policy(policy({"1": 100, "2": 0}), stack.config)
    assert failed == []
    assert listener(stack.config.grpc_port)[0] == pid  # the same replica process, reconfigured
    assert answered[:20] == ["1"] * 20 and answered[-20:] == ["2"] * 20


def test_update_policy_wins_over_an_unchanged_policy_file_without_a_restart(stack: RouterStack,
                                                                           client: RouterClient) -> None:
    write_policy(policy({"1": 0, "2": 100}), stack.repo.policy_file)
    serving(client, stack, version="2")
    served = stack.metric("recserve_router_requests_total")
    assert served >= 1
    app.update_policy(policy({"1": 100, "2": 0}), stack.config)
    try:
        serving(client, stack, version="1", timeout=8)
        # the same replica kept serving: its counters carry on
        assert stack.metric("recserve_router_requests_total") > served
    finally:
        write_policy(policy({"1": 100, "2": 0}), stack.repo.policy_file)


def test_shadow_traffic_shows_in_the_metrics(stack: RouterStack, client: RouterClient) -> None:
    write_policy(policy({"1": 100, "2": 0}, shadow_percent=100, shadow_version="2"), stack.repo.policy_file)
    serving(client, stack, version="1")
    v2 = stack.triton_inferences("2")

    def overlap_count() -> float:
        r = rank(client, stack.request())
        assert (r.served_by, r.version) == ("cloud", "1"), "shadow traffic must not change what is served"
        return stack.metric("recserve_router_shadow_overlap_count", model="ranker", version="2")

    assert wait_until(overlap_count, 15, 0.1, "a shadow overlap sample") > 0
    assert stack.metric("recserve_router_shadow_requests_total", model="ranker", version="2") > 0
    assert stack.metric("recserve_router_shadow_score_drift_count", model="ranker", version="2") > 0
    assert stack.metric("recserve_router_shadow_failures_total") == 0
    # (Triton counts a call a moment after answering it)
    wait_until(lambda: stack.triton_inferences("2") > v2, 10, what="the shadow version really asked")
    write_policy(policy({"1": 100, "2": 0}), stack.repo.policy_file)


# --- bad input -----------------------------------------------------------------------------------------------------


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_bad_input_gets_the_right_status_and_the_service_keeps_serving(stack: RouterStack,
                                                                       client: RouterClient) -> None:
    serving(client, stack)

    def good() -> None:
        r = rank(client, stack.request())
        assert r.served_by in ("cloud", "edge") and len(r.items) == 5

    too_many = [str(i) for i in range(stack.config.max_candidates + 1)]
    grpc_cases = {
        "unknown model": (lambda: rank(client, stack.request(model="nope")), grpc.StatusCode.NOT_FOUND),
        "too many candidates": (lambda: rank(client, stack.request(candidates=too_many)),
                                grpc.StatusCode.INVALID_ARGUMENT),
        "negative top_k": (lambda: rank(client, stack.request(top_k=-1)), grpc.StatusCode.INVALID_ARGUMENT),
        "budget -5": (lambda: client.stub.Rank(stack.request(), timeout=5, metadata=((BUDGET_HEADER, "-5"),)),
                      grpc.StatusCode.DEADLINE_EXCEEDED),
        "budget abc": (lambda: client.stub.Rank(stack.request(), timeout=5, metadata=((BUDGET_HEADER, "abc"),)),
                       grpc.StatusCode.INVALID_ARGUMENT),
    }
    for name, (call, code) in grpc_cases.items():
        assert _code(call) == code, name
        good()

    ok_body = json_format.MessageToJson(stack.request()).encode()
    http_cases = {
        "bad JSON": (b"{not json", {}, 400, "INVALID_ARGUMENT"),
        "not a RankRequest": (b'{"no_such_field": 1}', {}, 400, "INVALID_ARGUMENT"),
        "wrong type": (b'{"top_k": "many"}', {}, 400, "INVALID_ARGUMENT"),
        "unknown model": (json_format.MessageToJson(stack.request(model="nope")).encode(), {}, 404, "NOT_FOUND"),
        "budget abc": (ok_body, {BUDGET_HEADER: "abc"}, 400, "INVALID_ARGUMENT"),
        "budget -5": (ok_body, {BUDGET_HEADER: "-5"}, 504, "DEADLINE_EXCEEDED"),
    }
    for name, (body, headers, status, code) in http_cases.items():
        got_status, got_body = stack.http("/v1/rank", body, headers)
        assert got_status == status, (name, got_body)
        assert json.loads(got_body)["error"] == code, name
        status, body = stack.http("/v1/rank", json_format.MessageToJson(stack.request()).encode())
        assert status == 200 and len(json.loads(body)["items"]) == 5, name
    assert stack.http("/v1/nothing-here")[0] == 404
    assert stack.metric("recserve_router_requests_total", code="NOT_FOUND") >= 2
    good()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_budget_is_invalid_argument(stack: RouterStack, client: RouterClient, value: str) -> None:
    serving(client, stack)
    try:
        r = client.stub.Rank(stack.request(), timeout=5, metadata=((BUDGET_HEADER, value),))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    else:
        pytest.fail(f"x-budget-ms {value!r} was accepted: served_by={r.served_by!r}, reason={r.reason!r}")
    finally:
        serving(client, stack)  # leave the breaker closed for the next tests


# --- the cloud goes away (last: these stop Triton) --------------------------------------------------------------


class RankStream:
    """A client thread sending Rank calls back to back with a deadline, recording (sent at, request, answer, error)."""

    def __init__(self, stack: RouterStack, budget_s: float):
        self.stack, self.budget_s = stack, budget_s
        self.results: list[tuple[float, RankRequest, RankResponse | None, Exception | None]] = []
        self.sent = 0
        self.done = threading.Event()
        self.worker = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with RouterClient(self.stack.grpc_target) as c:
            while not self.done.is_set():
                req = self.stack.request()
                t0 = time.monotonic()
                self.sent += 1
                try:
                    self.results.append((t0, req, c.rank(req, timeout_s=self.budget_s), None))
                except grpc.RpcError as e:  # DEADLINE_EXCEEDED if an answer came too late
                    self.results.append((t0, req, None, e))

    def served(self, by: str, after: float = 0.0) -> int:
        return sum(1 for t0, _, r, _ in self.results if t0 > after and r is not None and r.served_by == by)

    def __enter__(self) -> RankStream:
        self.worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.worker.join(10)
        assert not self.worker.is_alive()

    def check_all_answered_in_time(self) -> None:
        errors = [(req.request_id, e.code(), e.details()) for _, req, _, e in self.results if e is not None]
        assert errors == [], errors  # every answer came within its deadline (else DEADLINE_EXCEEDED)
        assert len(self.results) == self.sent, "every request sent got an answer"
        for _, req, r, _ in self.results:
            assert r.request_id == req.request_id and len(r.items) == 5


def test_a_hung_triton_sigstop_every_request_is_answered_in_time_and_the_cloud_comes_back(
        stack: RouterStack, client: RouterClient) -> None:
    """Triton frozen (SIGSTOP: its sockets stay open, nothing answers): the calls time out, the breaker opens,
    the edge answers within each deadline; after SIGCONT the router goes back to the cloud by itself."""
    import os
    import signal

    serving(client, stack)
    pid = stack.triton.process.pid
    with RankStream(stack, 0.2) as stream:
        wait_until(lambda: stream.served("cloud") >= 20, 30, what="20 cloud answers before the hang")
        os.kill(pid, signal.SIGSTOP)
        hung = time.monotonic()
        try:
            wait_until(lambda: time.monotonic() - hung > 2.5 and stream.served("edge", hung) >= 40, 60,
                       what="40 edge answers while Triton hangs")
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        wait_until(lambda: stream.served("cloud", resumed) >= 5, 30, what="cloud answers after SIGCONT")
    stream.check_all_answered_in_time()
    during = [r for t0, _, r, _ in stream.results if hung < t0 < resumed - 0.5]
    assert {r.served_by for r in during} <= {"edge", "fallback"} and during
    assert stack.metric("recserve_router_cloud_failures_total", kind="timeout") >= 1


def test_triton_stopped_mid_run_every_request_is_answered_in_time(stack: RouterStack, client: RouterClient) -> None:
    serving(client, stack)
    with RankStream(stack, 0.2) as stream:
        results = stream.results
        wait_until(lambda: stream.served("cloud") >= 20, 30, what="20 cloud answers before the stop")
        stack.triton.stop()  # from this thread while the client thread keeps sending; returns once it has exited
        stopped = time.monotonic()
        wait_until(lambda: time.monotonic() - stopped > 2.5 and sum(1 for t0, *_ in results if t0 > stopped) >= 40,
                   60, what="40 requests after the stop")
    stream.check_all_answered_in_time()
    assert any(r.served_by == "cloud" for t0, _, r, _ in results if t0 < stopped)
    after = [r for t0, _, r, _ in results if t0 > stopped]
    assert {r.served_by for r in after} == {"edge"}
    assert {r.version for r in after} == {"edge"}
    reasons = [r.reason for r in after]
    assert set(reasons) <= {"cloud failed: answered from edge", "circuit open", "circuit half-open"}, set(reasons)
    # the breaker kept the dead cloud out of the path: a few failures (then one probe per cooldown), the rest skipped
    assert sum(reason.startswith("circuit") for reason in reasons) > len(after) / 2, reasons
    assert stack.metric("recserve_router_cloud_failures_total") >= stack.config.breaker_failures
    # the gauge follows the breaker of the version served: 2 open (or 1 while a probe is out)
    wait_until(lambda: rank(client, stack.request()).served_by == "edge"
               and stack.metric("recserve_router_circuit_state", model="ranker", version="1") == 2, 10,
               what="recserve_router_circuit_state 2")


def test_router_goes_back_to_the_cloud_when_triton_restarts_on_the_same_ports(stack: RouterStack,
                                                                               client: RouterClient) -> None:
    from recserve.triton.server import EmbeddedTriton

    if stack.triton.process is not None:  # still running (the test above did not run)
        serving(client, stack)
        stack.triton.stop()
    wait_until(lambda: rank(client, stack.request()).served_by == "edge", 15, what="the router answering from edge")
    # whether the stop left TIME_WAIT on Triton's own ports depends on who closed each connection first; make sure
    # it did, as it does when Triton stops with requests in flight
    leave_server_side_time_wait(stack.triton.settings.grpc_port)
    stack.triton = EmbeddedTriton(stack.triton.settings).start()
    # after a cooldown the breaker's probe succeeds and the cloud serves again
    serving(client, stack, timeout=60)
    assert stack.metric("recserve_router_circuit_state", model="ranker", version="1") == 0
