"""The part of HTTP/2 (RFC 9113) that unary gRPC calls need, both sides, as a small sans-I/O state machine.

The router's gRPC server (``grpc_server.py``) and its Triton client (``grpc_channel.py``) used the ``h2``
package for this; profiled under load
(``bench/profile_router.py``), h2's general state machine (an event object, a stream state machine and
header validation per frame, an HPACK encoder per response) was the largest share of a replica's CPU
after the router itself: 0.11-0.25 ms per call against 0.013 ms for this one with its own HPACK decoder
(``bench/router.py``'s ``http2`` part measures both on the same requests). What it does, and no more:

- frames in: SETTINGS (acknowledged; the peer's initial window and frame size applied), PING
  (answered), WINDOW_UPDATE, HEADERS and CONTINUATION (decoded by ``hpack_decoder``, whose dynamic
  table must see every block in order), DATA (padding stripped),
  RST_STREAM, GOAWAY, PRIORITY and unknown types (ignored, as the RFC says); receive windows are
  given back when half used (not per frame: a WINDOW_UPDATE per call was a socket write per call);
- frames out: header blocks encoded without the dynamic table (``:status 200`` from the static table,
  every other field a literal: a constant block per call shape), DATA within both flow-control windows,
  RST_STREAM and GOAWAY;
- limits: frames up to the default 16,384 bytes, header blocks up to ``max_header_bytes``, a stream
  past ``max_streams`` refused (REFUSED_STREAM, so a client retries it), a protocol error closes the
  connection with GOAWAY (:class:`ConnectionError` raised to the caller, who flushes and closes).

Streams are the client's (odd ids, increasing); a server never opens one (no push). A client's stream closes
when the answer has ended (its own side ends with the request's last DATA); a server's when it sends the end
of its answer (with RST_STREAM NO_ERROR if the request had not ended: RFC 9113 8.1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from recserve.serving.hpack_decoder import HeaderDecoder, HeaderError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = (
    0x0, 0x1, 0x3, 0x5, 0x6, 0x7, 0x8)
COMPRESSION_ERROR = 0x9
ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x2, 0x3, 0x4, 0x5, 0x6
DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
FRAME_SIZE = 16_384
"""Largest frame accepted and sent (the protocol's default; never raised by this server)."""

_HEAD = struct.Struct(">I B I")  # 24-bit length in the first word's top bytes, flags, stream id
_SETTING = struct.Struct(">HI")


class ConnectionError(Exception):  # noqa: A001 - HTTP/2's own term; local to this module
    """A connection error (RFC 9113 5.4.1): a GOAWAY with ``code`` is queued; the caller closes the connection."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Headers:
    """A header block: a server's request (the stream opens), a client's answer headers or trailers."""

    stream_id: int
    headers: list[tuple[bytes, bytes]]
    ended: bool


@dataclass(slots=True)
class Data:
    stream_id: int
    data: bytes
    ended: bool


@dataclass(slots=True)
class Reset:
    """The client reset the stream (or it was refused here): forget it."""

    stream_id: int


class WindowOpened:
    """A WINDOW_UPDATE or a larger initial window: responses waiting for room may go on."""


class GoingAway:
    """The peer sent GOAWAY: the connection is ending."""


WINDOW_OPENED, GOING_AWAY = WindowOpened(), GoingAway()


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def _int(value: int, prefix: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with a ``prefix``-bit first byte whose high bits are zero."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([value])
    out, value = bytearray([limit]), value - limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def header_block(headers) -> bytes:
    """Headers as an HPACK block that leaves both dynamic tables alone: ``:status: 200`` from the static table,
    every other field a literal without indexing (RFC 7541 6.2.2), no Huffman coding."""
    out = bytearray()
    for name, value in headers:
        if name == b":status" and value == b"200":
            out.append(0x88)
        else:
            out += b"\x00" + _int(len(name), 7) + name + _int(len(value), 7) + value
    return bytes(out)


class Connection:
    """One HTTP/2 connection's state. ``receive(data)`` returns the events it completed; ``open`` (a client),
    ``send_*`` and ``reset`` queue frames; ``data_to_send()`` takes what is queued."""

    def __init__(self, *, client: bool, max_streams: int, initial_window: int, max_header_bytes: int,
                 connection_window: int):
        self.client = client
        self.max_streams = max_streams
        self.initial_window = initial_window
        self.max_header_bytes = max_header_bytes
        self.decoder = HeaderDecoder(max_header_bytes)
        self._in = bytearray()
        self._preface = client  # a server reads the client's preface first
        self._out: list[bytes] = [PREFACE] if client else []
        self._peer_streams = MAX_WINDOW
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS (a client's limit)."""
        self._peer_window = DEFAULT_WINDOW
        """The peer's initial window for the streams (its SETTINGS_INITIAL_WINDOW_SIZE)."""
        self._window = DEFAULT_WINDOW
        """Connection send window."""
        self.streams: dict[int, int] = {}
        """Open streams -> their send window."""
        self._remote_ended: set[int] = set()
        self._local_ended: set[int] = set()
        self.connection_window = max(connection_window, DEFAULT_WINDOW)
        self._consumed = 0
        """Bytes of DATA received since the connection's receive window was last given back."""
        self._stream_consumed: dict[int, int] = {}
        self._highest = 0
        """The highest stream id opened, by the client."""
        self._block: tuple[int, bool, bytearray] | None = None
        """A header block waiting for its CONTINUATION frames: stream, END_STREAM, bytes so far."""
        settings = ((ENABLE_PUSH, 0),) if client else ((MAX_CONCURRENT_STREAMS, max_streams),)
        self._out.append(frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in (
            *settings, (INITIAL_WINDOW_SIZE, initial_window), (MAX_HEADER_LIST_SIZE, max_header_bytes)))))
        if connection_window > DEFAULT_WINDOW:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", connection_window - DEFAULT_WINDOW)))

    # -- in ------------------------------------------------------------------------------------------
    def receive(self, data: bytes) -> list:
        """Events of the frames ``data`` completes; raises :class:`ConnectionError` (GOAWAY queued)."""
        buf = self._in
        buf += data
        if not self._preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise self._error(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                return []
            if buf[:len(PREFACE)] != PREFACE:
                raise self._error(PROTOCOL_ERROR, "not an HTTP/2 client preface")
            del buf[:len(PREFACE)]
            self._preface = True
        events: list = []
        pos, end = 0, len(buf)
        while end - pos >= 9:
            word, flags, stream_id = _HEAD.unpack_from(buf, pos)
            length, kind, stream_id = word >> 8, word & 0xFF, stream_id & 0x7FFFFFFF
            if length > FRAME_SIZE:
                raise self._error(FRAME_SIZE_ERROR, f"a frame of {length} bytes (at most {FRAME_SIZE})")
            if end - pos < 9 + length:
                break
            payload = bytes(buf[pos + 9:pos + 9 + length])
            pos += 9 + length
            self._frame(kind, flags, stream_id, payload, events)
        del buf[:pos]
        return events

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if self._block is not None and kind != CONTINUATION:
            raise self._error(PROTOCOL_ERROR, "a header block interrupted before its END_HEADERS")
        if kind == DATA:
            self._data(flags, stream_id, payload, events)
        elif kind == HEADERS:
            if stream_id == 0:
                raise self._error(PROTOCOL_ERROR, "HEADERS on stream 0")
            payload = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._block = (stream_id, bool(flags & END_STREAM), bytearray(payload))
            self._header_fragment(flags, events)
        elif kind == CONTINUATION:
            if self._block is None or self._block[0] != stream_id:
                raise self._error(PROTOCOL_ERROR, "CONTINUATION without the HEADERS it continues")
            self._block[2].extend(payload)
            self._header_fragment(flags, events)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload, events)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload, events)
        elif kind == PING:
            if stream_id != 0 or len(payload) != 8:
                raise self._error(PROTOCOL_ERROR if stream_id else FRAME_SIZE_ERROR, "a malformed PING")
            if not flags & ACK:
                self._out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if stream_id == 0 or len(payload) != 4:
                raise self._error(PROTOCOL_ERROR, "a malformed RST_STREAM")
            if stream_id > self._highest:
                raise self._error(PROTOCOL_ERROR, "RST_STREAM on a stream never opened")
            if stream_id in self.streams:
                self._close(stream_id)
                events.append(Reset(stream_id))
        elif kind == GOAWAY:
            events.append(GOING_AWAY)
        elif kind == PUSH_PROMISE:
            raise self._error(PROTOCOL_ERROR, "a push, which neither side of a gRPC call makes")
        # PRIORITY and unknown frame types are ignored (RFC 9113 5.5)

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1:len(payload) - payload[0]]

    def _header_fragment(self, flags: int, events: list) -> None:
        stream_id, ended, block = self._block
        if len(block) > 2 * self.max_header_bytes:
            raise self._error(PROTOCOL_ERROR, f"a header block over {2 * self.max_header_bytes} bytes")
        if not flags & END_HEADERS:
            return
        self._block = None
        try:
            headers = self.decoder.decode(bytes(block))
        except HeaderError as e:
            raise self._error(COMPRESSION_ERROR, f"headers that do not decode: {e}") from None
        if stream_id in self.streams:
            if stream_id in self._remote_ended:
                raise self._error(PROTOCOL_ERROR, f"HEADERS on stream {stream_id} after its END_STREAM")
            if not self.client:  # trailers from a client: only their END_STREAM matters to a unary call
                if not ended:
                    raise self._error(PROTOCOL_ERROR, "a client's second HEADERS without END_STREAM")
                self._remote_end(stream_id)
                events.append(Data(stream_id, b"", True))
                return
            events.append(Headers(stream_id, headers, ended))
            if ended:
                self._remote_end(stream_id)
            return
        if self.client:
            if stream_id % 2 == 0 or stream_id > self._highest:
                raise self._error(PROTOCOL_ERROR, f"HEADERS on stream {stream_id}, which this client never opened")
            return  # a call given up (reset) here: its late answer is dropped
        if stream_id % 2 == 0 or stream_id <= self._highest:
            raise self._error(PROTOCOL_ERROR, f"a client opened stream {stream_id} out of order")
        self._highest = stream_id
        if len(self.streams) >= self.max_streams:
            self._out.append(frame(RST_STREAM, 0, stream_id, struct.pack(">I", REFUSED_STREAM)))
            return
        self.streams[stream_id] = self._peer_window
        if ended:
            self._remote_ended.add(stream_id)
        events.append(Headers(stream_id, headers, ended))

    def _data(self, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if stream_id == 0:
            raise self._error(PROTOCOL_ERROR, "DATA on stream 0")
        self._consumed += len(payload)
        if self._consumed >= self.connection_window // 2:  # given back in halves: no frame (and write) per call
            self._out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._consumed)))
            self._consumed = 0
        data = self._unpad(flags, payload)
        if stream_id > self._highest:
            raise self._error(PROTOCOL_ERROR, f"DATA on stream {stream_id}, never opened")
        if stream_id not in self.streams:
            return  # a stream closed here (answered, or given up) while the peer was still sending: ignored
        if stream_id in self._remote_ended:
            self.reset(stream_id, STREAM_CLOSED)
            events.append(Reset(stream_id))
            return
        ended = bool(flags & END_STREAM)
        if not ended and payload:
            consumed = self._stream_consumed.get(stream_id, 0) + len(payload)
            if consumed >= self.initial_window // 2:
                self._out.append(frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", consumed)))
                consumed = 0
            self._stream_consumed[stream_id] = consumed
        events.append(Data(stream_id, data, ended))
        if ended:
            self._remote_end(stream_id)

    def _remote_end(self, stream_id: int) -> None:
        """The peer ended its side: a client's call is over (stopping a request still being sent)."""
        self._remote_ended.add(stream_id)
        if self.client:
            if stream_id not in self._local_ended:
                self._out.append(frame(RST_STREAM, 0, stream_id, struct.pack(">I", CANCEL)))
            self._close(stream_id)

    def _settings(self, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if stream_id != 0:
            raise self._error(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise self._error(FRAME_SIZE_ERROR, "a SETTINGS acknowledgement with a payload")
            return
        if len(payload) % 6:
            raise self._error(FRAME_SIZE_ERROR, "a SETTINGS frame not a multiple of 6 bytes")
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise self._error(FLOW_CONTROL_ERROR, "an initial window over 2^31-1")
                delta, self._peer_window = value - self._peer_window, value
                for sid in self.streams:
                    self.streams[sid] += delta
                if delta > 0:
                    events.append(WINDOW_OPENED)
            elif key == MAX_CONCURRENT_STREAMS:
                self._peer_streams = value
            elif key == MAX_FRAME_SIZE and not FRAME_SIZE <= value <= 2**24 - 1:
                raise self._error(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
            # HEADER_TABLE_SIZE sizes the peer's decoder for our blocks, which never use the dynamic table.
        self._out.append(frame(SETTINGS, ACK, 0))

    def _window_update(self, stream_id: int, payload: bytes, events: list) -> None:
        if len(payload) != 4:
            raise self._error(FRAME_SIZE_ERROR, "a WINDOW_UPDATE not of 4 bytes")
        increment = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0 or self._window + increment > MAX_WINDOW:
                raise self._error(PROTOCOL_ERROR if increment == 0 else FLOW_CONTROL_ERROR,
                                  "a connection WINDOW_UPDATE of 0 or past 2^31-1")
            self._window += increment
        elif stream_id in self.streams:
            if increment == 0 or self.streams[stream_id] + increment > MAX_WINDOW:
                self.reset(stream_id, PROTOCOL_ERROR if increment == 0 else FLOW_CONTROL_ERROR)
                events.append(Reset(stream_id))
                return
            self.streams[stream_id] += increment
        else:
            return  # a stream already closed here: allowed, and nothing to do
        events.append(WINDOW_OPENED)

    # -- out -----------------------------------------------------------------------------------------
    def open(self, block: bytes) -> int | None:
        """A client's new stream with its request headers (:func:`header_block`); None when the server's limit on
        concurrent streams is reached."""
        if len(self.streams) >= self._peer_streams:
            return None
        stream_id = self._highest = self._highest + 2 if self._highest else 1
        self.streams[stream_id] = self._peer_window
        self._out.append(frame(HEADERS, END_HEADERS, stream_id, block))
        return stream_id

    def send_headers(self, stream_id: int, block: bytes, end_stream: bool = False) -> None:
        """A server's header block (:func:`header_block`) on an open stream; ``end_stream`` ends the answer."""
        if stream_id not in self.streams:
            return
        self._out.append(frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id, block))
        if end_stream:
            self._local_end(stream_id)

    def _local_end(self, stream_id: int) -> None:
        self._local_ended.add(stream_id)
        if not self.client:  # the answer is complete
            if stream_id not in self._remote_ended:  # answered before the request ended: stop its sending
                self._out.append(frame(RST_STREAM, 0, stream_id, struct.pack(">I", NO_ERROR)))
            self._close(stream_id)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> bytes:
        """Send what both flow-control windows allow of ``data``; return the rest (to send after a window opens).
        ``end_stream``: the last frame ends our side, once all of ``data`` is out. A stream closed meanwhile takes
        nothing (and nothing is left)."""
        if stream_id not in self.streams or not (data or end_stream):
            return b""
        while True:
            room = min(self._window, self.streams[stream_id], FRAME_SIZE)
            if data and room <= 0:
                return data
            chunk, data = data[:room], data[room:]
            self._window -= len(chunk)
            self.streams[stream_id] -= len(chunk)
            last = end_stream and not data
            self._out.append(frame(DATA, END_STREAM if last else 0, stream_id, chunk))
            if last:
                self._local_end(stream_id)
            if not data:
                return b""

    def reset(self, stream_id: int, code: int) -> None:
        if stream_id in self.streams:
            self._close(stream_id)
            self._out.append(frame(RST_STREAM, 0, stream_id, struct.pack(">I", code)))

    def _close(self, stream_id: int) -> None:
        del self.streams[stream_id]
        self._remote_ended.discard(stream_id)
        self._local_ended.discard(stream_id)
        self._stream_consumed.pop(stream_id, None)

    def close(self, code: int = NO_ERROR) -> None:
        """Queue a GOAWAY: the caller flushes and closes the transport."""
        last = 0 if self.client else self._highest  # the last stream the peer opened that this side took
        self._out.append(frame(GOAWAY, 0, 0, struct.pack(">II", last, code)))

    def _error(self, code: int, message: str) -> ConnectionError:
        self.close(code)
        return ConnectionError(code, message)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out


def server(max_streams: int, initial_window: int, max_header_bytes: int, connection_window: int) -> Connection:
    return Connection(client=False, max_streams=max_streams, initial_window=initial_window,
                      max_header_bytes=max_header_bytes, connection_window=connection_window)


def client(initial_window: int, max_header_bytes: int, connection_window: int) -> Connection:
    return Connection(client=True, max_streams=0, initial_window=initial_window, max_header_bytes=max_header_bytes,
                      connection_window=connection_window)
