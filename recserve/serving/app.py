"""The Ray Serve application: a Router deployment (gRPC ``Rank`` and HTTP JSON, served by the replica itself
(direct ingress) or through Ray Serve's proxies) composed with a Retriever deployment for requests that
bring no candidates.

Routing-policy changes reach the replicas without a restart, two ways: the policy file is re-read
when it changes (a mounted ConfigMap in a cluster), and ``reconfigure`` takes a ``policy`` in the
deployment's ``user_config``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from recserve.errors import ServerError
from recserve.serving.client import BUDGET_HEADER
from recserve.serving.config import RetrieverRoute, RouterConfig
from recserve.serving.policy import RoutingPolicy, write_policy
from recserve.serving.protos.recommender_pb2 import RankRequest, RankResponse
from recserve.serving.router import HTTP_STATUS, MAX_REQUEST_BYTES, RankError, Retriever, Router
from recserve.triton.server import free_port, free_ports

SERVICER = "recserve.serving.app.add_servicer"


@dataclass(frozen=True)
class Undecodable:
    """What Serve's gRPC ingress hands the replica for bytes that are not a RankRequest: answered with
    INVALID_ARGUMENT by ``Rank`` (Serve's own deserializer raised, and the client got UNKNOWN)."""

    why: str


def _rank_request(raw: bytes) -> RankRequest | Undecodable:
    try:
        return RankRequest.FromString(raw)
    except DecodeError as e:
        return Undecodable(f"the body is not a RankRequest: {e}")


def add_servicer(servicer, server) -> None:
    """``recserve.Recommender`` for Serve's gRPC ingress (direct and proxy), like the generated
    ``add_RecommenderServicer_to_server`` but with a request deserializer that cannot raise."""
    handlers = {"Rank": grpc.unary_unary_rpc_method_handler(servicer.Rank, request_deserializer=_rank_request,
                                                            response_serializer=RankResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("recserve.Recommender", handlers),))
    server.add_registered_method_handlers("recserve.Recommender", handlers)
log = logging.getLogger(__name__)


def _budget(value: str | None) -> float | None:
    """The ``x-budget-ms`` header of a call through Serve (no deadline of its own), parsed as the replica's
    own server parses it."""
    from recserve.serving.grpc_server import budget_ms

    return budget_ms([(BUDGET_HEADER, value)] if value not in (None, "") else [], None)


def freeze_startup_objects() -> None:
    """Move everything alive after start-up (Ray, protobuf descriptors, catalogs: ~120,000 objects) out of the
    garbage collector's reach. A full collection over them took ~80 ms in a router replica, a stall every
    request in flight waited out; after the freeze, collections scan only what requests allocate."""
    import gc

    gc.collect()
    gc.freeze()


REPLICA_NICENESS = "0"
"""The niceness of the Ray workers that the router starts (``RAY_worker_niceness``). Ray's default, 15, is
for batch tasks that must not starve its own control plane; a router replica answers within deadlines, and at
15 anything on its host at the default 0 (or at 10: a Triton started beside it) takes its cores first. On this
project's 2-core CI machine, a Triton restarting at niceness 10 held a replica at 15 off the cores for 0.2 s."""


def warn_if_niced() -> None:
    """A warning from a replica that runs below the default priority (a Ray started elsewhere, without
    ``RAY_worker_niceness=0``): its answers then wait for every busier process on the host."""
    import os

    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if niceness > 0:
        log.warning("this router replica runs at niceness %d: every process on the host at a lower one takes the "
                    "cores first; start Ray with RAY_worker_niceness=0", niceness)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class RetrieverDeployment:
    def __init__(self, route: dict, threads: int = 1):
        self.retriever = Retriever(RetrieverRoute.model_validate(route), threads)

    async def candidates(self, user: dict[str, str]) -> list[str]:
        return self.retriever.candidates(user)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class RouterDeployment:
    async def __init__(self, config: dict, retriever=None):
        cfg = RouterConfig.model_validate(config)
        retrieve_fn = (lambda user: retriever.candidates.remote(user)) if retriever is not None else None
        self.router = Router(cfg, retrieve_fn=retrieve_fn)
        freeze_startup_objects()
        warn_if_niced()
        self.grpc_server, self.grpc_port = None, None
        if cfg.ingress == "replica":  # the replica's own gRPC server: Serve deploys and watches, not in the path
            from recserve.serving.grpc_server import start_server

            self.grpc_server, self.grpc_port = await start_server(self.router, list(cfg._ports(cfg.grpc_port)),
                                                                  cfg.http_host)
            log.info("router replica serves gRPC on port %d", self.grpc_port)

    async def check_health(self) -> None:
        """Serve's health check: a replica whose own gRPC server stopped is unhealthy (Serve replaces it)."""
        if self.grpc_server is not None and self.grpc_port is not None:
            from recserve.triton.server import port_listening

            if not port_listening(self.grpc_port):
                raise RuntimeError(f"the router's gRPC server on port {self.grpc_port} stopped listening")

    async def __del__(self):
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1.0)

    def reconfigure(self, user_config: dict) -> None:
        if user_config and user_config.get("policy") is not None:
            self.router.policy.set(RoutingPolicy.model_validate(user_config["policy"]))

    async def Rank(self, request: RankRequest | Undecodable, grpc_context: RayServegRPCContext) -> RankResponse:  # noqa: N802
        try:
            if isinstance(request, Undecodable):
                raise RankError("INVALID_ARGUMENT", request.why)
            budget = _budget(dict(grpc_context.invocation_metadata()).get(BUDGET_HEADER))
            return await self.router.rank(request, budget)
        except RankError as e:
            grpc_context.set_code(getattr(grpc.StatusCode, e.code))
            grpc_context.set_details(str(e))
        except Exception as e:  # never let one request take the replica down
            log.exception("Rank failed")
            grpc_context.set_code(grpc.StatusCode.INTERNAL)
            grpc_context.set_details(f"internal error: {type(e).__name__}: {e}")
        return RankResponse()

    async def __call__(self, http_request):
        from starlette.responses import JSONResponse, PlainTextResponse, Response

        path = http_request.url.path.rstrip("/")
        if path.endswith("/metrics"):
            return Response(self.router.metrics.exposition(), media_type="text/plain; version=0.0.4")
        if path.endswith("/healthz"):  # 200 while it answers; "degraded" while a cloud version's circuit is not closed
            degraded = self.router.degraded()
            return PlainTextResponse("degraded: " + "; ".join(degraded) if degraded else "ok")
        if not path.endswith("/v1/rank") or http_request.method != "POST":
            return JSONResponse({"error": "NOT_FOUND", "message": "POST /v1/rank, GET /metrics, GET /healthz"}, 404)
        try:
            body = await _bounded_body(http_request)
            try:
                request = json_format.Parse(body or b"{}", RankRequest())
            except (json_format.ParseError, UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
                raise RankError("INVALID_ARGUMENT", f"the body is not a RankRequest in JSON: {e}") from e
            response = await self.router.rank(request, _budget(http_request.headers.get(BUDGET_HEADER)))
            return JSONResponse(json_format.MessageToDict(response, preserving_proto_field_name=True))
        except RankError as e:
            return JSONResponse({"error": e.code, "message": str(e)}, HTTP_STATUS.get(e.code, 500))
        except Exception as e:
            log.exception("rank failed")
            return JSONResponse({"error": "INTERNAL", "message": f"{type(e).__name__}: {e}"}, 500)


async def _bounded_body(http_request) -> bytes:
    """The request's body, read no further than ``MAX_REQUEST_BYTES`` (RESOURCE_EXHAUSTED beyond it)."""
    declared = http_request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise RankError("RESOURCE_EXHAUSTED", f"the body is larger than the {MAX_REQUEST_BYTES} bytes allowed")
    body = bytearray()
    async for chunk in http_request.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise RankError("RESOURCE_EXHAUSTED", f"the body is larger than the {MAX_REQUEST_BYTES} bytes allowed")
    return bytes(body)


def build_app(config: RouterConfig):
    """The deployment graph; the policy arrives in ``user_config`` (see :func:`deploy_config`)."""
    retriever = None
    if config.retriever is not None:
        retriever = RetrieverDeployment.options(logging_config={"enable_access_log": config.access_log}).bind(
            config.retriever.model_dump(mode="json"), config.edge_threads)
    scale = ({"autoscaling_config": config.autoscaling.model_dump()} if config.autoscaling is not None
             else {"num_replicas": config.num_replicas})
    return RouterDeployment.options(**scale, user_config={"policy": None},
                                    logging_config={"enable_access_log": config.access_log}).bind(
        config.model_dump(mode="json", exclude={"retriever"}), retriever)


APP_NAME, IMPORT_PATH = "recserve", "recserve.serving.app:app"


def app(args: dict):
    """Ray Serve application builder (``import_path: recserve.serving.app:app``, e.g. in a KubeRay
    RayService): ``args`` holds ``config``, the path of the router's YAML config, or ``router_config``,
    the config itself (what :func:`start` deploys)."""
    from pathlib import Path

    from recserve.serving.config import load_router_config

    if args.get("router_config") is not None:
        return build_app(RouterConfig.model_validate(args["router_config"]))
    return build_app(load_router_config(Path(args.get("config", "/etc/recserve/router.yaml"))))


def deploy_config(config: RouterConfig, policy: RoutingPolicy | None = None) -> dict:
    """The application as a declarative Serve config: the router's config in the builder's ``args``, the
    policy in the router deployment's ``user_config``. Deployed again with only the policy changed,
    Serve reconfigures the running replicas in place instead of replacing them."""
    return {"applications": [{
        "name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
        "args": {"router_config": config.model_dump(mode="json")},
        "deployments": [{"name": "RouterDeployment",
                         "user_config": {"policy": policy.model_dump() if policy is not None else None}}],
    }]}


def _deploy(config: RouterConfig, policy: RoutingPolicy | None, timeout_s: float = 120.0) -> None:
    import time

    from ray.serve.context import _get_global_client
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(deploy_config(config, policy)))
    deadline = time.monotonic() + timeout_s
    while True:
        state = serve.status().applications.get(APP_NAME)
        if state is not None and state.status == ApplicationStatus.RUNNING:
            return
        if state is not None and state.status == ApplicationStatus.DEPLOY_FAILED:
            raise ServerError(f"the router application failed to deploy: {_failure(state)}")
        if time.monotonic() > deadline:
            raise ServerError(f"the router application was not running after {timeout_s:.0f} s "
                              f"({_progress(state) if state else 'not deployed'})")
        time.sleep(0.1)


def _progress(state) -> str:
    """Where a deployment that is taking long stands: the application's status and each deployment's status with
    the last line of its message (Serve says there how many replicas run and why one would not start)."""
    parts = [str(state.status).rsplit(".", 1)[-1]]
    for name, d in state.deployments.items():
        lines = [ln.strip() for ln in (d.message or "").splitlines() if ln.strip()]
        parts.append(f"{name} {str(d.status).rsplit('.', 1)[-1]}" + (f": {lines[-1][:500]}" if lines else ""))
    return "; ".join(parts)


def _failure(state) -> str:
    """The reason a deployment failed: the last line of each failed deployment's traceback (a replica's
    constructor error, e.g. a missing edge model), else the application's own message."""
    reasons = [f"{name}: {lines[-1]}" for name, d in state.deployments.items()
               if (lines := [ln.strip() for ln in (d.message or "").splitlines() if ln.strip()])
               and str(d.status).rsplit(".", 1)[-1] in ("DEPLOY_FAILED", "UNHEALTHY")]
    return "; ".join(reasons) or state.message.strip()[-2000:]


def start(config: RouterConfig, policy: RoutingPolicy | None = None, *, num_cpus: int = 2) -> None:
    """Start Ray (locally, if not connected), Serve and the application.

    With ``ingress: direct`` the router replica serves gRPC and HTTP on the configured ports itself
    (Ray Serve direct ingress); Serve's own proxy, which it keeps as a fallback, gets spare ports.
    With ``ingress: proxy`` Serve's HTTP and gRPC proxies listen on them and call the replicas.
    """
    import os

    import ray

    # Ray Serve's latency knobs: user code and the request router on the replica's own event loop,
    # buffered access logs, and gRPC between proxy and replicas. The Serve processes that ray.init
    # starts read them. (RAY_SERVE_THROUGHPUT_OPTIMIZED would set most of these too, but it also
    # silences stderr logging, with which serve.shutdown() hangs for 30 s here.)
    for key, value in (("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0"), ("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "0"),
                       ("RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE", "1000"), ("RAY_SERVE_PROXY_USE_GRPC", "1"),
                       # Serve's gRPC ingress takes up to 2 GiB by default: bound it (requests and answers)
                       ("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(2 * MAX_REQUEST_BYTES)),
                       # the replicas at the default priority, not Ray's 15 for batch workers
                       ("RAY_worker_niceness", REPLICA_NICENESS)):
        os.environ.setdefault(key, value)
    grpc_port, http_port = config.grpc_port, config.http_port
    direct = direct_ingress_env(config)
    if config.ingress in ("direct", "replica"):
        os.environ.update(direct)
        grpc_port, http_port = free_port(), free_port()
    else:
        for key in direct:
            os.environ.pop(key, None)
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    elif config.ingress in ("direct", "replica"):
        log.warning("Ray was already running: direct ingress works only if its processes were started with %s",
                    " ".join(f"{k}={v}" for k, v in direct.items()))
    serve.start(http_options={"host": config.http_host, "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER]})
    _deploy(config, policy)


def direct_ingress_env(config: RouterConfig) -> dict[str, str]:
    """The environment of Ray's processes for direct ingress on exactly the configured ports, one pair
    per replica (the ranges' upper bounds are exclusive). With ``ingress: replica`` the replicas' own
    servers take the gRPC ports and Serve's unused direct gRPC servers get spare ones. Draining is left
    to the orchestrator (the pod's termination grace period), not held for Serve's 30 s default."""
    n = config.num_replicas
    grpc_first = config.grpc_port if config.ingress == "direct" else free_ports(n)
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_first),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_first + n),
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(config.http_port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(config.http_port + n),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
            "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def update_policy(policy: RoutingPolicy, config: RouterConfig) -> None:
    """Push a new policy to the running replicas, without restarting them.

    With a policy file: rewrite it; every replica re-reads it within a second. Without one: deploy
    the application again with the policy in ``user_config``; its config and code are unchanged, so
    Serve calls ``reconfigure`` on the running replicas (as ``serve deploy`` or a KubeRay RayService
    does with a changed ``user_config``).
    """
    if config.policy_file is not None:
        write_policy(policy, config.policy_file)
        return
    _deploy(config, policy)


def stop() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()
