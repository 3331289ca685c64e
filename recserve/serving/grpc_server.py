"""The router's own gRPC server: ``recserve.Recommender/Rank`` over HTTP/2, in the replica's event loop.

Ray Serve deploys, scales, health-checks and reconfigures the replicas; the per-request path inside a
replica is this server and the Router, with nothing between them (``ingress: replica``). It is gRPC's
wire protocol (HTTP/2, length-prefixed protobuf messages, ``grpc-status`` trailers, ``grpc-timeout``
deadlines) on an asyncio protocol with the server side of HTTP/2 in ``http2.py``: every byte is handled
on the event loop's own thread. Measured on 2 cores (``bench/router.py``), a no-op server built this way spent
0.23-0.28 ms of CPU per call against grpcio's 0.41-0.70 ms, and answered at lower latency: grpcio
hands every event across its own threads (its I/O threads, then a poller thread, then the loop),
and each hand-off is a thread wake-up.

The call's own gRPC deadline is the latency budget (``x-budget-ms`` metadata, when sent, may only
shorten it). Requests are bounded in size; refusals carry the router's status code.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from recserve.errors import ServerError
from recserve.serving import http2
from recserve.serving.client import BUDGET_HEADER
from recserve.serving.grpc_wire import grpc_timeout_s, message_frame, status_trailers, unframe
from recserve.serving.protos.recommender_pb2 import RankRequest
from recserve.serving.router import MAX_REQUEST_BYTES, RankError, Router

log = logging.getLogger(__name__)

RANK_PATH = b"/recserve.Recommender/Rank"
MAX_STREAMS = 1000
"""Calls in flight per connection."""
MAX_HEADER_BYTES = 64 << 10
"""Headers (metadata) of one call, decoded: more closes the connection (an HTTP/2 protocol error)."""

_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_RESPONSE_BLOCK = http2.header_block(_RESPONSE_HEADERS)
_OK_TRAILERS = http2.header_block(((b"grpc-status", b"0"),))


def budget_ms(metadata, time_remaining_s: float | None) -> float | None:
    """The request's latency budget: the gRPC deadline left, shortened by an ``x-budget-ms`` header if one came
    (clients of Serve's proxies send both, since those proxies drop deadlines)."""
    budget = None if time_remaining_s is None else time_remaining_s * 1e3
    for key, value in metadata or ():
        if key == BUDGET_HEADER:
            try:
                header = float(value)
            except ValueError:
                header = math.nan
            if not math.isfinite(header):
                raise RankError("INVALID_ARGUMENT", f"{BUDGET_HEADER} must be a finite number of milliseconds, "
                                f"got {value!r}")
            budget = header if budget is None else min(budget, header)
    return budget


@dataclass
class _Stream:
    path: bytes
    metadata: list[tuple[str, str]]
    timeout_s: float | None
    arrived: float
    """Loop time of the call's headers: its deadline counts from here, also while it waits for the loop."""
    body: bytearray = field(default_factory=bytearray)
    task: asyncio.Task | None = None


class _Connection(asyncio.Protocol):
    def __init__(self, server: RankServer):
        self.server = server
        self.conn = http2.server(max_streams=MAX_STREAMS, initial_window=MAX_REQUEST_BYTES + 16,
                                           max_header_bytes=MAX_HEADER_BYTES,
                                           connection_window=4 * MAX_REQUEST_BYTES)  # several calls at once
        self.streams: dict[int, _Stream] = {}
        self.pending: dict[int, list] = {}
        """Stream -> [bytes not yet sent, trailers]: a response waiting for flow-control window."""
        self.transport: asyncio.Transport | None = None
        self._write_scheduled = False

    # -- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        self._flush()

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive(data)
        except http2.ConnectionError as e:  # a protocol error: a GOAWAY is queued
            log.info("closing a connection after an HTTP/2 error: %s", e)
            self._write()
            self.transport.close()
            return
        for event in events:
            if type(event) is http2.Data:
                self._data(event.stream_id, event.data)
                if event.ended:
                    self._ended(event.stream_id)
            elif type(event) is http2.Headers:
                self._request(event.stream_id, event.headers)
                if event.ended:
                    self._ended(event.stream_id)
            elif type(event) is http2.Reset:
                stream = self.streams.pop(event.stream_id, None)
                self.pending.pop(event.stream_id, None)
                if stream is not None and stream.task is not None:
                    stream.task.cancel()
            elif event is http2.WINDOW_OPENED:
                for stream_id in list(self.pending):
                    self._send_pending(stream_id)
            elif event is http2.GOING_AWAY:
                self.transport.close()
        self._flush()

    # -- one call --------------------------------------------------------------------------------------
    def _request(self, stream_id: int, headers) -> None:
        path, metadata, timeout = b"", [], None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b"grpc-timeout":
                timeout = grpc_timeout_s(value)
            elif not name.startswith(b":"):
                metadata.append((name.decode("latin-1"), value.decode("latin-1")))
        self.streams[stream_id] = _Stream(path, metadata, timeout, asyncio.get_running_loop().time())
        if path != RANK_PATH:
            self._refuse(stream_id, "UNIMPLEMENTED", f"unknown method {path.decode('latin-1')}: this server "
                         "answers /recserve.Recommender/Rank")

    def _data(self, stream_id: int, data: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.body += data
        if len(stream.body) > MAX_REQUEST_BYTES + 5:
            self._refuse(stream_id, "RESOURCE_EXHAUSTED",
                         f"the request is larger than the {MAX_REQUEST_BYTES} bytes allowed")

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        body = bytes(stream.body)
        message = unframe(body)
        if message is None:
            why = "compressed messages are not supported" if body[:1] == b"\x01" else "not one gRPC message"
            self._refuse(stream_id, "UNIMPLEMENTED" if body[:1] == b"\x01" else "INVALID_ARGUMENT", why)
            return
        try:
            request = RankRequest.FromString(message)
        except DecodeError as e:
            self._refuse(stream_id, "INVALID_ARGUMENT", f"the body is not a RankRequest: {e}")
            return
        stream.task = asyncio.get_running_loop().create_task(self._rank(stream_id, stream, request))

    async def _rank(self, stream_id: int, stream: _Stream, request: RankRequest) -> None:
        loop, router = asyncio.get_running_loop(), self.server.router
        budget = None
        try:
            budget = budget_ms(stream.metadata, stream.timeout_s)
            # the budget counts from the call's arrival, also the time it waited for the loop behind others
            response = await router.rank(request, budget, start=router.clock() - (loop.time() - stream.arrived))
        except RankError as e:
            self._trailers_only(stream_id, e.code, str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never let one request take the replica down
            log.exception("Rank failed")
            self._trailers_only(stream_id, "INTERNAL", f"internal error: {type(e).__name__}: {e}")
        else:
            if stream_id in self.streams:
                self.conn.send_headers(stream_id, _RESPONSE_BLOCK)
                self.pending[stream_id] = [message_frame(response.SerializeToString()), _OK_TRAILERS]
                self._send_pending(stream_id)
        finally:
            self.streams.pop(stream_id, None)
        self._flush()
        if budget is not None and (loop.time() - stream.arrived) * 1e3 > budget:
            router.metrics.late.inc()

    # -- writing ---------------------------------------------------------------------------------------
    def _refuse(self, stream_id: int, code: str, message: str) -> None:
        """Answer with an error before the call reached the router; the stream's later frames are dropped."""
        self.streams.pop(stream_id, None)
        self._trailers_only(stream_id, code, message)

    def _trailers_only(self, stream_id: int, code: str, message: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.conn.send_headers(stream_id, http2.header_block([*_RESPONSE_HEADERS, *status_trailers(code, message)]),
                               end_stream=True)  # nothing sent if the client reset the stream meanwhile

    def _send_pending(self, stream_id: int) -> None:
        """Send what the flow-control windows allow of a response; the rest waits for a window update."""
        data, trailers = self.pending[stream_id]
        left = self.conn.send_data(stream_id, data)  # a stream reset meanwhile takes nothing and leaves nothing
        if left:
            self.pending[stream_id][0] = left
            return
        self.conn.send_headers(stream_id, trailers, end_stream=True)
        del self.pending[stream_id]

    def _flush(self) -> None:
        """Write what is queued once the loop has run what is ready: the answers that complete together (a
        coalesced Triton call answers several) leave in one socket write, not one each."""
        if not self._write_scheduled:
            self._write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        self._write_scheduled = False
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.conn.close()
            self._write()
            self.transport.close()


class RankServer:
    """The listening server: ``await stop()`` closes it and every connection."""

    def __init__(self, router: Router):
        self.router = router
        self.connections: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let calls in flight finish for up to ``grace`` seconds, then close every connection."""
        if self._server is not None:
            self._server.close()
        if grace:
            deadline = asyncio.get_running_loop().time() + grace
            while any(c.streams for c in self.connections) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
        for c in list(self.connections):
            c.close()
        if self._server is not None:
            await self._server.wait_closed()


async def start_server(router: Router, ports: list[int], host: str = "0.0.0.0") -> tuple[RankServer, int]:
    """A started server on the first of ``ports`` that is free (replica i of n finds its own port among the
    n configured ones); the server and its port. No SO_REUSEPORT: a taken port is seen as taken."""
    server = RankServer(router)
    loop = asyncio.get_running_loop()
    for port in ports:
        try:
            server._server = await loop.create_server(lambda: _Connection(server), host, port, reuse_port=False)
        except OSError:
            continue
        return server, port
    raise ServerError(f"no free port for the router's gRPC server among {ports}: another server holds them")
