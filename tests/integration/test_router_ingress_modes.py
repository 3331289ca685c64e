"""Several router replicas: behind Ray Serve's own proxies (``ingress: proxy``, one port), and with
direct ingress (one port per replica, a round-robin client).

test_router_serve.py covers one direct-ingress replica in depth; each test here starts its own stack
(after that module's has stopped).
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import router_fixtures
from google.protobuf import json_format
from router_fixtures import CANDIDATES, listener_of, policy, start_stack, stop_stack, wait_until

from recserve.serving.client import RouterClient
from recserve.serving.policy import write_policy
from recserve.triton.server import free_ports

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
    finally:
        stop_stack(stack)


def test_two_direct_ingress_replicas_on_their_own_ports_share_a_round_robin_client(router_repo) -> None:
    write_policy(policy({"1": 100, "2": 0}), router_repo.policy_file)
    stack = start_stack(router_repo, num_replicas=2, grpc_port=free_ports(2), http_port=free_ports(2, start=30_000,
                                                                                                   stop=32_000))
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
    finally:
        stop_stack(stack)


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
