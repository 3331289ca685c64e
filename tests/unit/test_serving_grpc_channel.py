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
