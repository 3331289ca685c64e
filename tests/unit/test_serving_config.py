"""The router's YAML config: validation and paths relative to the config file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recserve.errors import ConfigError
from recserve.serving.config import RouterConfig, load_router_config


def minimal(**over) -> dict:
    cfg = {
        "models": {"ranker": {"rankers": [{"triton_model": "ranker", "edge_model": "edge/model.onnx"}],
                              "catalog": "catalog", "preprocessing": "ranker/preprocessing.json"}},
    }
    cfg.update(over)
    return cfg


def write(tmp_path: Path, cfg, name: str = "conf/router.yaml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return p


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = minimal(
        retriever={"user_tower": "../tower/model.onnx", "preprocessing": "tower/pre.json", "catalog": "index/1"},
        policy_file="policy.json",
    )
    cfg["models"]["ranker"]["rankers"].append({"triton_model": "b", "edge_model": "/abs/b.onnx", "weight": 0.5})
    path = write(tmp_path, cfg)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    c = load_router_config(path)
    base = (tmp_path / "conf").resolve()
    m = c.models["ranker"]
    assert m.catalog == base / "catalog"
    assert m.preprocessing == base / "ranker" / "preprocessing.json"
    assert m.rankers[0].edge_model == base / "edge" / "model.onnx"
    assert m.rankers[1].edge_model == Path("/abs/b.onnx")  # absolute paths stay
    assert c.retriever.user_tower == tmp_path.resolve() / "tower" / "model.onnx"
    assert c.retriever.preprocessing == base / "tower" / "pre.json"
    assert c.retriever.catalog == base / "index" / "1"
    assert c.policy_file == base / "policy.json"
    for p in (m.catalog, m.preprocessing, m.rankers[0].edge_model, c.retriever.user_tower, c.policy_file):
        assert p.is_absolute()


def test_relative_config_path_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, minimal())
    monkeypatch.chdir(tmp_path)
    c = load_router_config(Path("conf/router.yaml"))
    assert c.models["ranker"].catalog == (tmp_path / "conf" / "catalog").resolve()


def test_defaults() -> None:
    c = RouterConfig.model_validate(minimal())
    assert c.default_model == "ranker"
    assert c.retriever is None and c.policy_file is None and c.default_budget_ms is None
    assert c.models["ranker"].rankers[0].weight == 1.0


@pytest.mark.parametrize("ingress", ["replica", "direct"])
def test_replica_ingress_by_default_one_address_per_replica(ingress: str) -> None:
    assert RouterConfig.model_validate(minimal()).ingress == "replica"
    c = RouterConfig.model_validate(minimal(grpc_port=9100, http_port=8100, ingress=ingress))
    assert (c.grpc_targets(), c.http_bases()) == (["127.0.0.1:9100"], ["http://127.0.0.1:8100"])
    c = RouterConfig.model_validate(minimal(grpc_port=9100, http_port=8100, num_replicas=3, ingress=ingress))
    assert c.grpc_targets("10.0.0.5") == ["10.0.0.5:9100", "10.0.0.5:9101", "10.0.0.5:9102"]
    assert c.http_bases() == ["http://127.0.0.1:8100", "http://127.0.0.1:8101", "http://127.0.0.1:8102"]


def test_proxy_ingress_one_address_for_every_replica() -> None:
    c = RouterConfig.model_validate(minimal(ingress="proxy", num_replicas=3, grpc_port=9100))
    assert c.grpc_targets() == ["127.0.0.1:9100"]


def test_client_spreads_over_a_list_of_replica_addresses() -> None:
    from recserve.serving.client import channel_args

    assert channel_args("router:9000") == ("router:9000", [])
    target, options = channel_args(["127.0.0.1:9100", "127.0.0.1:9101"])
    assert target == "ipv4:127.0.0.1:9100,127.0.0.1:9101"
    assert ("grpc.lb_policy_name", "round_robin") in options
    with pytest.raises(ValueError, match="no router address"):
        channel_args([])


def test_direct_ingress_binds_exactly_the_configured_ports() -> None:
    from recserve.serving.app import direct_ingress_env

    env = direct_ingress_env(RouterConfig.model_validate(minimal(grpc_port=9100, http_port=8100, num_replicas=2,
                                                                 ingress="direct")))
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Serve allocates replica ports from [min, max): one each, from the configured one on
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"]) == ("9100", "9102")
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8100", "8102")
    # a replaced replica (a user_config redeploy) may take the same port again at once
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"


def test_replica_ingress_leaves_the_grpc_ports_to_the_replicas_own_servers() -> None:
    from recserve.serving.app import direct_ingress_env

    env = direct_ingress_env(RouterConfig.model_validate(minimal(grpc_port=9100, http_port=8100, num_replicas=2)))
    first, end = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"])
    assert end - first == 2 and not {9100, 9101} & set(range(first, end)), "Serve's gRPC servers take spare ports"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8100", "8102")


@pytest.mark.parametrize(("niceness", "warned"), [(0, False), (15, True)])
def test_a_replica_below_the_default_priority_says_so(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture, niceness: int,
                                                      warned: bool) -> None:
    import os

    from recserve.serving import app

    monkeypatch.setattr(os, "getpriority", lambda which, who: niceness)
    with caplog.at_level("WARNING", logger="recserve.serving.app"):
        app.warn_if_niced()
    assert ("RAY_worker_niceness=0" in caplog.text) is warned, caplog.text


def test_default_model_must_be_a_configured_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="default_model 'other' is not among models"):
        load_router_config(write(tmp_path, minimal(default_model="other")))
    c = load_router_config(write(tmp_path, minimal(default_model="ranker")))
    assert c.default_model == "ranker"


@pytest.mark.parametrize("text, needle", [
    ("models: [", "not valid YAML"),
    ("models:\n  ranker: {rankers: [}\n", "not valid YAML"),
    ("key: value: other", "not valid YAML"),
])
def test_bad_yaml_is_a_config_error(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=needle) as info:
        load_router_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(unknown_option=1), "unknown_option"),
    (lambda c: c.update(max_candidates=0), "max_candidates"),
    (lambda c: c.update(breaker_failures=0), "breaker_failures"),
    (lambda c: c.update(default_budget_ms=0), "default_budget_ms"),
    (lambda c: c.update(models={}), "models"),
    (lambda c: c["models"]["ranker"].update(rankers=[]), "rankers"),
    (lambda c: c["models"]["ranker"]["rankers"][0].update(weight=0), "weight"),
    (lambda c: c["models"]["ranker"]["rankers"][0].pop("triton_model"), "triton_model"),
    (lambda c: c["models"]["ranker"].pop("catalog"), "catalog"),
    (lambda c: c["models"]["ranker"].update(extra=1), "extra"),
    (lambda c: c.update(retriever={"user_tower": "t.onnx", "preprocessing": "p.json", "catalog": "c", "candidates": 0}),
     "candidates"),
    (lambda c: c.update(grpc_port="nine thousand"), "grpc_port"),
    (lambda c: c.update(ingress="sidecar"), "ingress"),
])
def test_bad_fields_are_config_errors(tmp_path: Path, mutate, needle: str) -> None:
    cfg = minimal()
    mutate(cfg)
    with pytest.raises(ConfigError, match=needle):
        load_router_config(write(tmp_path, cfg))


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_empty_or_non_mapping_config_is_a_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_router_config(write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read router config"):
        load_router_config(tmp_path / "nope.yaml")


def test_autoscaling_needs_serves_proxies_and_replaces_num_replicas() -> None:
    from recserve.serving.app import build_app

    with pytest.raises(ValueError, match="autoscaling needs ingress: proxy"):
        RouterConfig.model_validate(minimal(autoscaling={"max_replicas": 4}))
    with pytest.raises(ValueError, match="min_replicas 5 is more than max_replicas 4"):
        RouterConfig.model_validate(minimal(ingress="proxy", autoscaling={"min_replicas": 5, "max_replicas": 4}))
    cfg = RouterConfig.model_validate(minimal(ingress="proxy", autoscaling={"max_replicas": 4,
                                                                            "target_ongoing_requests": 16}))
    deployment = build_app(cfg)._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 16)
    fixed = build_app(RouterConfig.model_validate(minimal(num_replicas=3, ingress="proxy")))._bound_deployment
    assert fixed._deployment_config.autoscaling_config is None and fixed.num_replicas == 3


# --- the Serve ingress's request decoding and body bound (issue 16) -----------------------------------------------


def test_serve_grpc_ingress_decodes_without_raising() -> None:
    """Serve's generated decoder raised on undecodable bytes and the client got UNKNOWN; ours hands ``Rank`` a
    value it answers with INVALID_ARGUMENT."""
    from recserve.serving.app import Undecodable, _rank_request
    from recserve.serving.protos.recommender_pb2 import RankRequest

    good = RankRequest(request_id="a", candidate_item_ids=["1"])
    assert _rank_request(good.SerializeToString()) == good
    bad = _rank_request(b"\xff\xff\xff")
    assert isinstance(bad, Undecodable) and "not a RankRequest" in bad.why


def test_serve_grpc_ingress_registers_rank_with_the_safe_decoder() -> None:
    from recserve.serving.app import SERVICER, _rank_request, add_servicer

    class Server:
        def __init__(self):
            self.generic, self.registered = [], {}

        def add_generic_rpc_handlers(self, handlers):
            self.generic += handlers

        def add_registered_method_handlers(self, service, handlers):
            self.registered[service] = handlers

    class Servicer:
        async def Rank(self, request, context):  # noqa: N802
            return None

    server = Server()
    add_servicer(Servicer(), server)
    handler = server.registered["recserve.Recommender"]["Rank"]
    assert handler.request_deserializer is _rank_request
    assert len(server.generic) == 1 and SERVICER == "recserve.serving.app.add_servicer"


class _Body:
    def __init__(self, chunks, length=None):
        self.chunks = chunks
        self.headers = {} if length is None else {"content-length": str(length)}

    async def stream(self):
        for c in self.chunks:
            yield c


@pytest.mark.parametrize("declared", [None, 1])
def test_http_bodies_are_read_no_further_than_the_bound(declared) -> None:
    """A body over the bound is refused while it streams in (or from its declared length), not read whole first."""
    import asyncio

    from recserve.serving.app import _bounded_body
    from recserve.serving.router import MAX_REQUEST_BYTES, RankError

    read = []

    async def chunks():
        for i in range(10_000):
            read.append(i)
            yield b"x" * 65536

    body = _Body(None, declared)
    body.stream = chunks
    with pytest.raises(RankError) as info:
        asyncio.run(_bounded_body(body))
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert len(read) <= MAX_REQUEST_BYTES // 65536 + 1
    assert asyncio.run(_bounded_body(_Body([b"{", b"}"]))) == b"{}"
    with pytest.raises(RankError):
        asyncio.run(_bounded_body(_Body([], MAX_REQUEST_BYTES + 1)))


def test_free_ports_are_outside_the_ephemeral_range_and_never_handed_out_twice() -> None:
    from recserve.triton import server

    firsts = [server.free_ports(2) for _ in range(300)]
    taken = [p for first in firsts for p in (first, first + 1)]
    assert len(set(taken)) == len(taken), "a port given twice"
    assert all(server.FREE_PORTS.start <= p < server.FREE_PORTS.stop for p in taken)
    assert server.FREE_PORTS.stop <= 32768  # Linux's ephemeral range starts there: outgoing connections' ports


def test_a_slow_deployment_says_where_it_stands() -> None:
    from types import SimpleNamespace

    from recserve.serving.app import _progress

    state = SimpleNamespace(status="ApplicationStatus.DEPLOYING", deployments={"RouterDeployment": SimpleNamespace(
        status="DeploymentStatus.UPDATING",
        message="Deploying new version.\nDeployment 'RouterDeployment' has 1 replicas that have taken more than 30s "
                "to initialize.")})
    assert _progress(state) == ("DEPLOYING; RouterDeployment UPDATING: Deployment 'RouterDeployment' has 1 replicas "
                                "that have taken more than 30s to initialize.")
