"""The router's Triton channel (``grpc_channel.GrpcChannel``) when the other end is not there: refused
connections fail at once, and an attempt to a host that drops packets is given up after CONNECT_TIMEOUT_S, so
the next call starts a fresh one (a returning Triton is reached within about a second)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from recserve.serving.grpc_channel import CallError, GrpcChannel
from recserve.serving.grpc_wire import STATUS


def test_a_refused_connection_is_unavailable_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused

    async def call():
        channel = GrpcChannel(f"127.0.0.1:{port}")
        t0 = time.monotonic()
        with pytest.raises(CallError) as info:
            await channel.unary("/x.Y/Z", b"", 5.0)
        return info.value, time.monotonic() - t0

    error, took = asyncio.run(call())
    assert error.code == STATUS["UNAVAILABLE"] and took < 1.0


def _blackhole() -> tuple[socket.socket, list[socket.socket], int]:
    """A listener whose accept queue is full: the kernel drops further SYNs, as from a host that is gone."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the queue (its length is backlog + 1 on Linux)
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.1)
    return server, fillers, port


def test_a_connection_attempt_that_hangs_is_given_up_and_retried() -> None:
    server, fillers, port = _blackhole()
    try:
        async def calls():
            channel = GrpcChannel(f"127.0.0.1:{port}", connect_timeout_s=0.3)
            outcomes = []
            for _ in range(2):
                t0 = time.monotonic()
                with pytest.raises(CallError) as info:
                    await channel.unary("/x.Y/Z", b"", 5.0)
                outcomes.append((info.value.code, time.monotonic() - t0, str(info.value)))
            return outcomes

        outcomes = asyncio.run(calls())
    finally:
        for c in fillers:
            c.close()
        server.close()
    for code, took, message in outcomes:  # each call: its own attempt, given up after 0.3 s, not the call's 5 s
        assert code == STATUS["UNAVAILABLE"] and 0.25 < took < 2.0, (code, took, message)
        assert "no answer to the connection attempt" in message


@pytest.fixture
def grpc_server():
    """A real gRPC server (grpcio's C core, as Triton's): ``/t.T/Echo`` answers its request, ``/t.T/Fail`` fails
    with INVALID_ARGUMENT, ``/t.T/Slow`` answers after 0.5 s."""
    from concurrent import futures

    import grpc

    def echo(request: bytes, context) -> bytes:
        return request

    def fail(request: bytes, context) -> bytes:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no good: 100% wrong")

    def slow(request: bytes, context) -> bytes:
        time.sleep(0.5)
        return request

    handlers = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in
                {"Echo": echo, "Fail": fail, "Slow": slow}.items()}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_calls_to_a_real_grpc_server_answer_fail_and_time_out_as_grpc_says(grpc_server: str) -> None:
    async def calls():
        channel = GrpcChannel(grpc_server)
        small = [bytes([i]) * (100 + i) for i in range(20)]
        big = bytes(range(256)) * 8192  # 2 MiB: more than the server's initial windows, sent as they open
        answers = await asyncio.gather(*(channel.unary("/t.T/Echo", m, 5.0) for m in [*small, big]))
        with pytest.raises(CallError) as failed:
            await channel.unary("/t.T/Fail", b"x", 5.0)
        with pytest.raises(CallError) as late:
            await channel.unary("/t.T/Slow", b"x", 0.1)
        after = await channel.unary("/t.T/Echo", b"still here", 5.0)  # the connection outlives both
        await channel.close()
        return answers, failed.value, late.value, after, small + [big]

    answers, failed, late, after, sent = asyncio.run(calls())
    assert answers == sent
    assert failed.code == STATUS["INVALID_ARGUMENT"] and str(failed) == "no good: 100% wrong"
    assert late.code == STATUS["DEADLINE_EXCEEDED"]
    assert after == b"still here"
