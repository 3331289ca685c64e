"""Several router replicas: behind Ray Serve's own proxies (``ingress: proxy``, one port), and with a
port per replica (``ingress: replica``, the replica's own gRPC server, and ``ingress: direct``, Serve's
direct ingress), shared by a round-robin client.

test_router_serve.py covers one direct-ingress replica in depth; each test here starts its own stack
(after that module's has stopped).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import urllib.request

import pytest
import router_fixtures
from google.protobuf import json_format
from router_fixtures import CANDIDATES, listener_of, policy, raw_rank, start_stack, stop_stack, wait_until

from recserve.serving.client import RouterClient
from recserve.serving.policy import write_policy
from recserve.triton.server import free_ports, port_free

pytestmark = pytest.mark.slow

router_repo = router_fixtures.router_repo


def test_two_replicas_behind_serve_proxies_answer_grpc_and_http(router_repo) -> None:
    from ray import serve

    write_policy(policy({"1": 100, "2": 0}), router_repo.policy_file)
    stack = start_stack(router_repo, ingress="proxy", num_replicas=2)
    try:
        for port in (stack.config.grpc_port, stack.config.http_port):
            assert "ProxyActor" in listener_of(port)

        def running() -> int:
            deployment = serve.status().applications["recserve"].deployments["RouterDeployment"]
            return deployment.replica_states.get("RUNNING", 0)

        wait_until(lambda: running() == 2, 30, what="two router replicas running")
        with RouterClient(stack.grpc_target) as client:
            for _ in range(10):
                r = client.rank(stack.request(top_k=3), timeout_s=5.0)
                assert r.served_by == "cloud" and r.version == "1"
                assert len(r.items) == 3 and set(r.items) <= set(CANDIDATES)
        req = stack.request(top_k=4)
        status, body = stack.http("/v1/rank", json_format.MessageToJson(req).encode())
        assert status == 200, body
        doc = json.loads(body)
        assert (doc["served_by"], doc["request_id"], len(doc["items"])) == ("cloud", req.request_id, 4)
        _bad_bytes_are_invalid_argument(stack.grpc_target)
    finally:
        stop_stack(stack)


@pytest.mark.parametrize("ingress", ["replica", "direct"])
def test_two_replicas_on_their_own_ports_share_a_round_robin_client(router_repo, ingress: str) -> None:
    write_policy(policy({"1": 100, "2": 0}), router_repo.policy_file)
    stack = start_stack(router_repo, num_replicas=2, grpc_port=free_ports(2), ingress=ingress,
                        http_port=free_ports(2))
    try:
        cfg = stack.config
        ports = [int(t.rsplit(":", 1)[1]) for t in cfg.grpc_targets()] + [int(b.rsplit(":", 1)[1]) for b in cfg.http_bases()]
        assert len(ports) == 4
        for port in ports:
            assert "ServeReplica:recserve:RouterDeployment" in listener_of(port)
        with RouterClient(cfg.grpc_targets()) as client:
            for _ in range(40):
                r = client.rank(stack.request(top_k=3), timeout_s=5.0)
                assert (r.served_by, r.version, len(r.items)) == ("cloud", "1", 3)

        def served(base: str) -> float:
            with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
                text = resp.read().decode()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("recserve_router_requests_total{"))

        counts = [served(b) for b in cfg.http_bases()]
        # both replicas answered (round robin), every request counted once
        assert min(counts) >= 10 and sum(counts) >= 40, counts
        _bad_bytes_are_invalid_argument(cfg.grpc_targets()[0])
    finally:
        stop_stack(stack)


def _bad_bytes_are_invalid_argument(target: str) -> None:
    """Undecodable bytes are the caller's mistake on every ingress (Serve's own decoder answered UNKNOWN), and a
    message over the bound is refused (Serve's ingress took up to 2 GiB)."""
    import grpc

    for payload in (b"\xff\xff\xff", b"\x0a\xff", bytes(range(256))):
        answer = raw_rank(target, payload)
        assert isinstance(answer, grpc.RpcError) and answer.code() == grpc.StatusCode.INVALID_ARGUMENT, payload
    big = raw_rank(target, b"\x0a\x80\x80\x80\x02" + b"x" * (4 << 20))  # request_id of 4 MiB
    assert isinstance(big, grpc.RpcError) and big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_router_that_cannot_start_says_why(router_repo, tmp_path) -> None:
    from recserve.errors import ServerError
    from recserve.serving import app

    missing = tmp_path / "nope" / "model.onnx"
    cfg = router_fixtures.router_config(router_repo, "127.0.0.1:1", models={"ranker": {
        "rankers": [{"triton_model": "ranker", "edge_model": str(missing)}],
        "catalog": str(router_repo.catalog), "preprocessing": str(router_repo.models.ranker / "preprocessing.json")}})
    try:
        with pytest.raises(ServerError, match=f"failed to deploy: RouterDeployment: .*{missing}"):
            app.start(cfg)
    finally:
        app.stop()


def test_route_command_starts_triton_and_the_router_and_stops_both_on_sigterm(router_repo, tmp_path) -> None:
    """``recserve route --triton-repo``: one command, the router in front of its own embedded Triton
    (the config's triton_url points nowhere, so a cloud answer proves the router uses the new Triton).
    After SIGTERM it keeps answering for ``--drain-s``, then stops both, with exit code 0."""
    import signal
    import subprocess
    import sys

    import yaml

    cfg = router_fixtures.router_config(router_repo, "127.0.0.1:1")
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-c", "from recserve.cli import main; main()", "route",
                             f"--config={config}", f"--triton-repo={router_repo.triton_repo}", "--drain-s=5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "300"})
    lines: queue.Queue[str] = queue.Queue()  # its output, read by a thread: a hung start fails, not blocks
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        triton = _line_starting(lines, "Triton ready", 60)
        _line_starting(lines, "router ready", 120)
        triton_grpc = triton.split("gRPC ")[1].split(",")[0]
        with RouterClient(cfg.grpc_targets()) as client:
            r = wait_until(lambda: _rank_or_none(client), 30, 0.2, "a cloud answer through `recserve route`")
            assert (r.served_by, r.version) == ("cloud", "1")
            proc.send_signal(signal.SIGTERM)
            _line_starting(lines, "SIGTERM: still answering for 5 s", 10)
            assert _rank_or_none(client, user="6") is not None  # draining: still served, by the cloud (not the cache)
        assert proc.wait(timeout=90) == 0
        _line_starting(lines, "stopping the router", 10)
        assert port_free(int(triton_grpc.rsplit(":", 1)[1]))  # Triton stopped with the router
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _rank_or_none(client: RouterClient, user: str = "5"):
    import grpc

    from recserve.serving.protos.recommender_pb2 import RankRequest

    try:
        r = client.rank(RankRequest(request_id="cli", user={"user_id": user}, candidate_item_ids=CANDIDATES, top_k=3),
                        timeout_s=5.0)
    except grpc.RpcError:
        return None
    return r if r.served_by == "cloud" else None


def _line_starting(lines: queue.Queue, prefix: str, timeout: float) -> str:
    """The next output line that starts with ``prefix`` (the ones before it are skipped)."""
    deadline, seen = time.monotonic() + timeout, []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line.startswith(prefix):
            return line
        seen.append(line)
    raise AssertionError(f"no line starting {prefix!r} within {timeout:.0f} s; output:\n{''.join(seen)[-3000:]}")

