"""A client for the router's gRPC API: the call's deadline is the latency budget, sent twice (gRPC timeout
and ``x-budget-ms`` metadata, because Ray Serve's gRPC ingress does not forward deadlines). The target is
one address, or the list of a direct-ingress router's replica addresses (round robin)."""

from __future__ import annotations

import re

import grpc

from recserve.serving.protos.recommender_pb2 import RankRequest, RankResponse
from recserve.serving.protos.recommender_pb2_grpc import RecommenderStub

BUDGET_HEADER = "x-budget-ms"


def channel_args(target: str | list[str]) -> tuple[str, list[tuple[str, str]]]:
    """A gRPC target and channel options: a list of ``ip:port`` addresses (the replicas of a router with
    direct ingress) becomes one channel that spreads calls round robin and skips unreachable ones."""
    if isinstance(target, str):
        return target, []
    if not target:
        raise ValueError("no router address given")
    bad = [t for t in target if not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}:\d{1,5}", t)]
    if bad:
        raise ValueError(f"a list of addresses must be IPv4 ip:port entries (got {bad}); for a host name give one "
                         "address, which DNS may resolve to several")
    return "ipv4:" + ",".join(target), [("grpc.lb_policy_name", "round_robin")]


def aio_channel(target: str | list[str]) -> grpc.aio.Channel:
    """An asyncio channel to one address, or round robin over a list of ip:port (see :func:`channel_args`)."""
    address, options = channel_args(target)
    return grpc.aio.insecure_channel(address, options=options)


def budget_metadata(timeout_s: float | None) -> tuple[tuple[str, str], ...]:
    return ((BUDGET_HEADER, f"{timeout_s * 1e3:.3f}"),) if timeout_s is not None else ()


class RouterClient:
    def __init__(self, target: str | list[str] = "127.0.0.1:9000"):
        address, options = channel_args(target)
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = RecommenderStub(self.channel)

    def rank(self, request: RankRequest, timeout_s: float | None = 1.0) -> RankResponse:
        """Raises ``grpc.RpcError`` with the router's status code on refusal."""
        return self.stub.Rank(request, timeout=timeout_s, metadata=budget_metadata(timeout_s))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRouterClient:
    def __init__(self, target: str | list[str] = "127.0.0.1:9000"):
        self.channel = aio_channel(target)
        self.stub = RecommenderStub(self.channel)

    async def rank(self, request: RankRequest, timeout_s: float | None = 1.0) -> RankResponse:
        return await self.stub.Rank(request, timeout=timeout_s, metadata=budget_metadata(timeout_s))

    async def close(self) -> None:
        await self.channel.close()
