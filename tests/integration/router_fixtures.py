"""Shared helpers and fixtures of the router integration tests (``tests/integration/test_router*.py``).

Import what a module needs (``from router_fixtures import ...``). The models are the tiny ones of
``triton_fixtures`` (trained once per session and memoized there): the ranker is served by the real embedded
Triton as version 1 and a second ranker (same signature, other weights) as version 2; the two-tower gives the
router's retriever (user tower + item index with embeddings, not loaded in Triton). The router runs in real Ray
Serve (``recserve.serving.app.start``); clients talk to it over gRPC (RouterClient, the generated stub) and HTTP.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from triton_fixtures import TrainedModels, trained_models

from recserve.serving.config import RouterConfig
from recserve.serving.policy import RoutingPolicy, write_policy
from recserve.serving.protos.recommender_pb2 import RankRequest
from recserve.triton.server import EmbeddedTriton, ServerSettings, free_port

CANDIDATES = ["151", "114", "49", "401", "69", "221", "312", "316", "410", "417"]
"""Raw item ids of the synthetic catalog (``synthetic:6000,users=300,items=500``)."""


def policy(versions: dict[str, float], **extra: Any) -> RoutingPolicy:
    return RoutingPolicy.model_validate({"models": {"ranker": {"versions": versions, **extra}}})


@dataclass
class RouterRepo:
    """What the router serves: a Triton repository (ranker v1 + v2) and the router-side files."""

    models: TrainedModels
    triton_repo: Path
    retrieval_repo: Path
    policy_file: Path
    workdir: Path

    @property
    def catalog(self) -> Path:
        return self.retrieval_repo / "item_index" / "1"

    def catalog_items(self) -> set[str]:
        return set(json.loads((self.catalog / "items.json").read_text()))


def build_router_repo(base: Path, models: TrainedModels) -> RouterRepo:
    from recserve.converters.build import build
    from recserve.converters.triton_config import BuildProfile
    from recserve.triton.retrieval import build_retrieval

    profile = BuildProfile(version_policy="all", max_batch_size=64)
    triton_repo = base / "triton"
    build(models.ranker, "ranker", "onnxruntime", triton_repo, profile, version=1)
    build(models.ranker_b, "ranker", "onnxruntime", triton_repo, profile, version=2)
    # the retriever and its catalog live outside Triton's repository: the router runs them in process
    build_retrieval(models.two_tower, models.ranker, None, base / "retrieval")
    policy_file = base / "policy.json"
    write_policy(policy({"1": 100, "2": 0}), policy_file)
    return RouterRepo(models, triton_repo, base / "retrieval", policy_file, base)


def router_config(repo: RouterRepo, triton_url: str, **over: Any) -> RouterConfig:
    tower = repo.retrieval_repo / "user_tower" / "1"
    raw: dict[str, Any] = {
        "triton_url": triton_url,
        "grpc_port": free_port(),
        "http_port": free_port(),
        "models": {"ranker": {
            "rankers": [{"triton_model": "ranker", "edge_model": str(repo.models.ranker / "model.onnx")}],
            "catalog": str(repo.catalog),
            "preprocessing": str(repo.models.ranker / "preprocessing.json")}},
        "retriever": {"user_tower": str(tower / "model.onnx"), "preprocessing": str(tower / "preprocessing.json"),
                      "catalog": str(repo.catalog), "candidates": 30},
        "policy_file": str(repo.policy_file),
        "max_candidates": 50,
        "breaker_cooldown_s": 1.0,
    }
    raw.update(over)
    return RouterConfig.model_validate(raw)


def triton_settings(repository: Path, nice: int = 0) -> ServerSettings:
    return ServerSettings.on_free_ports(Path(repository), nice=nice)


@dataclass
class RouterStack:
    """A running embedded Triton and the Ray Serve router in front of it."""

    repo: RouterRepo
    triton: EmbeddedTriton
    config: RouterConfig
    _ids: Iterator[int] = field(default_factory=lambda: count(1))

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.config.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.config.http_port}"

    def request(self, *, candidates: list[str] | None = None, top_k: int = 5, unique: bool = True,
                **kw: Any) -> RankRequest:
        """A Rank request; ``unique`` gives it a fresh user id so that the router's result cache never answers."""
        n = next(self._ids)
        kw.setdefault("user", {"user_id": str(n % 300 + 1) if unique else "17"})
        if unique:
            kw.setdefault("numeric", {"query_category_match": n * 1e-4})
        return RankRequest(request_id=f"req-{n}", candidate_item_ids=CANDIDATES if candidates is None else candidates,
                           top_k=top_k, query="3", **kw)

    def http(self, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.http_base + path, data=body, method="POST" if body is not None else "GET",
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metrics(self) -> str:
        status, body = self.http("/metrics")
        assert status == 200, body[:300]
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there is none)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def triton_inferences(self, version: str) -> int:
        """How many inferences Triton's ranker ``version`` has run (its own statistics)."""
        from recserve.triton.client import TritonClient

        with TritonClient(self.triton.grpc_url) as c:
            stats = c.statistics("ranker", version)["model_stats"]
        return sum(int(s.get("inference_count", 0)) for s in stats)


def raw_rank(target: str, payload: bytes, timeout: float = 5.0, metadata=()):
    """``recserve.Recommender/Rank`` with ``payload`` as the message's bytes (anything, decodable or not): the
    answer's bytes, or the grpc.RpcError raised."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/recserve.Recommender/Rank", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        try:
            return call(payload, timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            return e


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s (last value {value!r})")
        time.sleep(interval)


def leave_server_side_time_wait(port: int) -> None:
    """Leave a TIME_WAIT connection whose local end is ``port``, as a server that closed a client's connection
    does (the server closes first). Needs ``port`` free of listeners."""
    import socket

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(1)
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = server.accept()
            conn.close()  # the server side closes first: TIME_WAIT stays on 127.0.0.1:port
            client.recv(1)  # read the FIN, then close the client side
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the client's close completes the handshake asynchronously
        if _time_wait_on(port):
            return
        time.sleep(0.01)
    raise AssertionError(f"no TIME_WAIT on port {port}")


def listener_of(port: int) -> str:
    """The command line (Ray sets it to the actor's name) of the process listening on a local TCP port."""
    return listener(port)[1]


def listener(port: int) -> tuple[int, str]:
    """(pid, command line) of the process listening on a local TCP port."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd).removeprefix("socket:[").rstrip("]") in inodes for fd in (proc / "fd").iterdir()):
                return int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
    raise AssertionError(f"nothing listens on port {port}")


def _time_wait_on(port: int) -> bool:
    local = f"{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(":" + local) and fields[3] == "06":  # 06: TIME_WAIT
            return True
    return False


_REPOS: dict[str, RouterRepo] = {}


@pytest.fixture(scope="session")
def router_repo(tmp_path_factory: pytest.TempPathFactory) -> RouterRepo:
    """Built once per session; a module that changes the policy file writes its own before use."""
    if "repo" not in _REPOS:
        _REPOS["repo"] = build_router_repo(tmp_path_factory.mktemp("router"), trained_models(tmp_path_factory))
    return _REPOS["repo"]


def start_stack(repo: RouterRepo, triton_nice: int = 0, **config: Any) -> RouterStack:
    """Start Triton (``triton_nice``: its niceness), then Ray + Serve with the router app; wait until a Rank is
    served by the cloud."""
    from recserve.serving import app
    from recserve.serving.client import RouterClient

    triton = EmbeddedTriton(triton_settings(repo.triton_repo, triton_nice)).start()
    try:
        cfg = router_config(repo, triton.grpc_url, **config)
        app.start(cfg)
        stack = RouterStack(repo, triton, cfg)
        with RouterClient(stack.grpc_target) as c:
            wait_until(lambda: _served_by_cloud(c, stack), 60, 0.2, "the router serving from the cloud")
        return stack
    except BaseException:
        try:
            app.stop()
        finally:
            triton.stop()
        raise


def stop_stack(stack: RouterStack) -> None:
    from recserve.serving import app

    try:
        app.stop()
    finally:
        stack.triton.stop()


def _served_by_cloud(client, stack: RouterStack) -> bool:
    import grpc

    try:
        return client.rank(stack.request(), timeout_s=5.0).served_by == "cloud"
    except grpc.RpcError:
        return False
