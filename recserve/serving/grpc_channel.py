"""A gRPC client channel on the event loop: unary calls over one HTTP/2 connection (``http2.py``), for the router's
calls to Triton's KServe API.

Like the router's own server (``grpc_server.py``), every byte is handled on the event loop's thread:
grpcio's client hands each response across its I/O and poller threads to the loop, a thread wake-up
per hand-off, which on a small machine cost more than the call's own work. The connection opens on
the first call and again on the next call after it breaks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from recserve.serving import http2
from recserve.serving.grpc_wire import STATUS, grpc_timeout, message_frame, status_of, unframe

CONNECT_TIMEOUT_S = 1.0
"""How long one connection attempt may take. An attempt to a host that drops packets (a pod gone, a hung
machine) would otherwise wait out the kernel's SYN retries (a minute or more), and every call meanwhile shares
it: bounded, a new attempt starts at the next call, so the cloud is reached within about a second of its return."""
_WINDOW = 16 << 20
"""Receive window of the connection and of each stream: answers never wait for a window update."""
MAX_HEADER_BYTES = 64 << 10
"""Headers (or trailers) of one answer, decoded: more closes the connection."""


class CallError(Exception):
    """A call that did not return a message: ``code`` is the gRPC status (UNAVAILABLE when the connection failed,
    DEADLINE_EXCEEDED when no answer came in time)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class _Call:
    future: asyncio.Future
    body: bytearray = field(default_factory=bytearray)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    unsent: bytes = b""


class _Protocol(asyncio.Protocol):
    def __init__(self, authority: bytes):
        self.authority = authority
        self.conn = http2.client(initial_window=_WINDOW, max_header_bytes=MAX_HEADER_BYTES, connection_window=_WINDOW)
        self.calls: dict[int, _Call] = {}
        self.blocks: dict[bytes, bytes] = {}
        """Method path -> the request headers' block but the timeout (the same bytes for every call)."""
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._flush()

    def connection_lost(self, exc) -> None:
        self._fail_all(f"the connection closed{f': {exc}' if exc else ''}")

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive(data)
        except http2.ConnectionError as e:
            self._fail_all(f"HTTP/2 error: {e}")
            self._flush()
            self.transport.close()
            return
        for event in events:
            kind = type(event)
            if kind is http2.Data or kind is http2.Headers:
                call = self.calls.get(event.stream_id)
                if call is not None:
                    if kind is http2.Data:
                        call.body += event.data
                    else:
                        call.headers.update(event.headers)
                    if event.ended:
                        self._finish(event.stream_id, call)
            elif kind is http2.Reset:
                call = self.calls.pop(event.stream_id, None)
                if call is not None:
                    _set(call.future, CallError(STATUS["UNAVAILABLE"], "the server reset the call"))
            elif event is http2.WINDOW_OPENED:
                for stream_id, c in list(self.calls.items()):
                    if c.unsent:
                        self._send(stream_id, c)
            elif event is http2.GOING_AWAY:
                self._fail_all("the server closed the connection (GOAWAY)")
        self._flush()

    def call(self, path: bytes, payload: bytes, timeout_s: float) -> tuple[int, asyncio.Future]:
        block = self.blocks.get(path)
        if block is None:
            block = self.blocks[path] = http2.header_block((
                (b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", self.authority),
                (b"content-type", b"application/grpc"), (b"te", b"trailers")))
        stream_id = self.conn.open(block + http2.header_block(((b"grpc-timeout", grpc_timeout(timeout_s)),)))
        if stream_id is None:
            raise CallError(STATUS["UNAVAILABLE"], "the server's limit on concurrent calls is reached")
        call = self.calls[stream_id] = _Call(asyncio.get_running_loop().create_future(), unsent=message_frame(payload))
        self._send(stream_id, call)
        self._flush()
        return stream_id, call.future

    def cancel(self, stream_id: int) -> None:
        if self.calls.pop(stream_id, None) is not None and not self.closed:
            self.conn.reset(stream_id, http2.CANCEL)
            self._flush()

    def _send(self, stream_id: int, call: _Call) -> None:
        """What the flow-control windows allow of the request; the rest waits for a window update."""
        call.unsent = self.conn.send_data(stream_id, call.unsent, end_stream=True)

    def _finish(self, stream_id: int, call: _Call) -> None:
        self.calls.pop(stream_id, None)
        status = status_of(call.headers)
        if call.headers.get(b":status", b"200") != b"200":
            _set(call.future, CallError(STATUS["UNAVAILABLE"], f"HTTP status {call.headers[b':status'].decode()}"))
        elif status is None:
            _set(call.future, CallError(STATUS["INTERNAL"], "the answer carried no grpc-status"))
        elif status[0] != 0:
            _set(call.future, CallError(*status))
        elif (message := unframe(bytes(call.body))) is None:
            _set(call.future, CallError(STATUS["INTERNAL"], "the answer is not one gRPC message"))
        else:
            _set(call.future, message)

    def _fail_all(self, why: str) -> None:
        self.closed = True
        for call in self.calls.values():
            _set(call.future, CallError(STATUS["UNAVAILABLE"], why))
        self.calls.clear()

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)


def _set(future: asyncio.Future, result) -> None:
    if not future.done():
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


class GrpcChannel:
    """Unary gRPC calls to ``host:port``; ``await unary(path, payload, timeout_s)`` returns the answer's bytes."""

    def __init__(self, target: str, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        host, _, port = target.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.connect_timeout_s = connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future | None = None

    async def _connection(self, timeout_s: float) -> _Protocol:
        if self._protocol is not None and not self._protocol.closed:
            return self._protocol
        if self._connecting is None:  # one connection attempt, shared by the calls that wait for it
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, if unawaited
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting), timeout_s)
        except TimeoutError as e:
            raise CallError(STATUS["DEADLINE_EXCEEDED"], f"no connection to {self.host}:{self.port} in time") from e
        except OSError as e:
            raise CallError(STATUS["UNAVAILABLE"], f"cannot connect to {self.host}:{self.port}: {e}") from e

    async def _connect(self) -> _Protocol:
        try:
            loop = asyncio.get_running_loop()
            try:
                _, protocol = await asyncio.wait_for(
                    loop.create_connection(lambda: _Protocol(f"{self.host}:{self.port}".encode()), self.host, self.port),
                    self.connect_timeout_s)
            except TimeoutError as e:
                raise ConnectionError(f"no answer to the connection attempt in {self.connect_timeout_s:g} s") from e
            self._protocol = protocol
            return protocol
        finally:
            self._connecting = None

    async def unary(self, path: str, payload: bytes, timeout_s: float) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        protocol = await self._connection(timeout_s)
        stream_id, future = protocol.call(path.encode(), payload, max(deadline - loop.time(), 1e-3))
        timer = loop.call_later(max(deadline - loop.time(), 0.0), _set, future,
                                CallError(STATUS["DEADLINE_EXCEEDED"], f"no answer in {timeout_s * 1e3:.1f} ms"))
        try:
            return await future
        except CallError as e:
            if e.code == STATUS["DEADLINE_EXCEEDED"]:
                protocol.cancel(stream_id)
            raise
        except asyncio.CancelledError:
            protocol.cancel(stream_id)
            raise
        finally:
            timer.cancel()

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
