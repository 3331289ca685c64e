"""The router's server side of HTTP/2 (recserve.serving.http2), driven by the ``h2`` package's client as the peer:
what a conforming client sends is understood, what the server sends a conforming client accepts."""

from __future__ import annotations

import struct

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes

from recserve.serving import http2

REQUEST_HEADERS = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/recserve.Recommender/Rank"),
                   (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]
RESPONSE = http2.header_block(((b":status", b"200"), (b"content-type", b"application/grpc")))
TRAILERS = http2.header_block(((b"grpc-status", b"0"), (b"grpc-message", b"fine")))


def pair(max_streams: int = 100, client_settings: dict | None = None):
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    if client_settings:
        client.update_settings(client_settings)
    server = http2.server(max_streams=max_streams, initial_window=1 << 20, max_header_bytes=64 << 10,
                                    connection_window=4 << 20)
    return client, server


def exchange(client: H2Connection, server: http2.Connection, chunk: int | None = None) -> tuple[list, list]:
    """Client bytes to the server (in ``chunk``-byte pieces when given), the server's answer back: both sides' events."""
    raw, events = client.data_to_send(), []
    for i in range(0, len(raw), chunk or max(len(raw), 1)):
        events += server.receive(raw[i:i + (chunk or len(raw))])
    return events, client.receive_data(server.data_to_send())


def answer(server: http2.Connection, stream_id: int, body: bytes) -> bytes:
    server.send_headers(stream_id, RESPONSE)
    left = server.send_data(stream_id, body)
    if not left:
        server.send_headers(stream_id, TRAILERS, end_stream=True)
    return left


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_a_call_round_trips_however_the_bytes_are_cut(chunk) -> None:
    client, server = pair()
    exchange(client, server, chunk)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [*REQUEST_HEADERS, (b"grpc-timeout", b"100m")])
    client.send_data(sid, b"\x00\x00\x00\x00\x03abc", end_stream=True)
    events, _ = exchange(client, server, chunk)
    assert [type(e) for e in events] == [http2.Headers, http2.Data]
    assert events[0].stream_id == sid and (b"grpc-timeout", b"100m") in events[0].headers and not events[0].ended
    assert events[1].data == b"\x00\x00\x00\x00\x03abc" and events[1].ended
    assert answer(server, sid, b"response") == b""
    got = client.receive_data(server.data_to_send())
    kinds = [type(e) for e in got]
    assert kinds == [ResponseReceived, DataReceived, TrailersReceived, StreamEnded], kinds
    assert dict(got[0].headers)[b":status"] == b"200" and got[1].data == b"response"
    assert dict(got[2].headers) == {b"grpc-status": b"0", b"grpc-message": b"fine"}
    assert sid not in server.streams


def test_a_response_waits_for_the_clients_flow_control_window() -> None:
    client, server = pair(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 10})
    exchange(client, server)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQUEST_HEADERS, end_stream=True)
    exchange(client, server)
    left = answer(server, sid, b"0123456789abcdef")
    assert left == b"abcdef"
    got = client.receive_data(server.data_to_send())
    assert [e.data for e in got if isinstance(e, DataReceived)] == [b"0123456789"]
    client.increment_flow_control_window(6, stream_id=sid)
    events, _ = exchange(client, server)
    assert events == [http2.WINDOW_OPENED]
    assert server.send_data(sid, left) == b""
    server.send_headers(sid, TRAILERS, end_stream=True)
    got = client.receive_data(server.data_to_send())
    assert [e.data for e in got if isinstance(e, DataReceived)] == [b"abcdef"]
    assert any(isinstance(e, StreamEnded) for e in got)


def test_continuation_padding_and_ping() -> None:
    client, server = pair()
    exchange(client, server)
    sid = client.get_next_available_stream_id()
    big = b"v" * 20_000  # more than one frame: h2 sends HEADERS then CONTINUATION
    client.send_headers(sid, [*REQUEST_HEADERS, (b"x-big", big)])
    client.send_data(sid, b"payload", end_stream=True, pad_length=20)
    client.ping(b"12345678")
    events, got = exchange(client, server)
    assert (b"x-big", big) in events[0].headers
    assert events[1].data == b"payload" and events[1].ended
    assert any(isinstance(e, PingAckReceived) and e.ping_data == b"12345678" for e in got)


def test_streams_past_the_limit_are_refused_and_a_reset_is_reported() -> None:
    client, server = pair(max_streams=1)
    exchange(client, server)
    first = client.get_next_available_stream_id()
    client.send_headers(first, REQUEST_HEADERS)
    events, _ = exchange(client, server)
    assert [e.stream_id for e in events] == [first]
    # h2 keeps to the advertised limit itself: a client that does not, as raw frames
    second = http2.frame(http2.HEADERS, http2.END_HEADERS, first + 2, http2.header_block(REQUEST_HEADERS))
    assert server.receive(second) == []
    assert server.data_to_send() == http2.frame(http2.RST_STREAM, 0, first + 2,
                                                struct.pack(">I", http2.REFUSED_STREAM))
    client.reset_stream(first)
    events, _ = exchange(client, server)
    assert events == [http2.Reset(first)] and not server.streams


def test_an_answer_before_the_request_ends_stops_the_client_and_later_data_is_dropped() -> None:
    client, server = pair()
    exchange(client, server)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQUEST_HEADERS)
    client.send_data(sid, b"part")
    exchange(client, server)
    server.send_headers(sid, http2.header_block(((b":status", b"200"), (b"grpc-status", b"8"))), end_stream=True)
    got = client.receive_data(server.data_to_send())
    assert any(isinstance(e, StreamReset) and e.error_code == ErrorCodes.NO_ERROR for e in got)
    # a client that had already sent more before it saw the reset: its frames are ignored, the connection lives
    late = http2.frame(http2.DATA, http2.END_STREAM, sid, b"more")
    assert server.receive(late) == [] and server.data_to_send() == b""


def test_a_request_larger_than_the_windows_streams_through_as_they_are_given_back() -> None:
    """3 MiB against a 1 MiB stream window and a 4 MiB connection window: the server gives each back when half
    used (not a frame per DATA frame), and the client, keeping to them, gets it all through."""
    client, server = pair()
    exchange(client, server)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQUEST_HEADERS)
    body, received, updates = bytes(range(256)) * 12288, bytearray(), 0
    left = body
    for _ in range(1000):
        if not left:
            break
        room = min(client.local_flow_control_window(sid), client.max_outbound_frame_size, len(left))
        if room:
            client.send_data(sid, left[:room], end_stream=room == len(left))
            left = left[room:]
        raw = client.data_to_send()
        for e in server.receive(raw):
            received += e.data if isinstance(e, http2.Data) else b""
        out = server.data_to_send()
        updates += out.count(b"\x00\x00\x04" + bytes([http2.WINDOW_UPDATE, 0]))
        client.receive_data(out)
    assert bytes(received) == body
    assert 0 < updates < 20, updates


@pytest.mark.parametrize("raw, code", [
    (http2.frame(http2.HEADERS, http2.END_HEADERS, 2, b"\x82"), http2.PROTOCOL_ERROR),  # an even stream id
    (http2.frame(http2.HEADERS, http2.END_HEADERS, 1, b"\xff\xff\xff\xff"), http2.COMPRESSION_ERROR),
    (http2.frame(http2.DATA, 0, 0, b"x"), http2.PROTOCOL_ERROR),
    (http2.frame(http2.DATA, 0, 9, b"x"), http2.PROTOCOL_ERROR),  # a stream never opened
    (http2.frame(http2.SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"), http2.FLOW_CONTROL_ERROR),
    (http2.frame(http2.SETTINGS, 0, 0, b"\x00\x04"), http2.FRAME_SIZE_ERROR),
    (http2.frame(http2.PING, 0, 0, b"short"), http2.FRAME_SIZE_ERROR),
    (http2.frame(http2.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), http2.PROTOCOL_ERROR),
    (b"\x00\x40\x01" + bytes([http2.DATA, 0]) + b"\x00\x00\x00\x01", http2.FRAME_SIZE_ERROR),  # 16,385 bytes
    (http2.frame(http2.HEADERS, 0, 1, b"\x82") + http2.frame(http2.PING, 0, 0, b"8 bytes!"), http2.PROTOCOL_ERROR),
])
def test_protocol_errors_close_the_connection_with_goaway(raw: bytes, code: int) -> None:
    client, server = pair()
    exchange(client, server)
    server.data_to_send()
    with pytest.raises(http2.ConnectionError) as e:
        server.receive(raw)
    assert e.value.code == code
    got = client.receive_data(server.data_to_send())
    assert any(isinstance(ev, ConnectionTerminated) and ev.error_code == code for ev in got), got


def test_a_bad_preface_is_refused() -> None:
    server = http2.server(max_streams=1, initial_window=1 << 16, max_header_bytes=1 << 12,
                                    connection_window=1 << 16)
    with pytest.raises(http2.ConnectionError):
        server.receive(b"GET / HTTP/1.1\r\n")


def test_header_blocks_leave_the_dynamic_table_alone() -> None:
    """Every block decodes the same whatever came before: no state is shared with the peer's decoder."""
    from hpack import Decoder

    block = http2.header_block(((b":status", b"200"), (b"grpc-message", b"x" * 300)))
    decoder = Decoder()
    for _ in range(3):
        assert decoder.decode(block, raw=True) == [(b":status", b"200"), (b"grpc-message", b"x" * 300)]
    assert len(decoder.header_table.dynamic_entries) == 0


def test_the_client_side_against_h2s_server() -> None:
    from h2.events import RequestReceived

    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    server.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    client = http2.client(initial_window=1 << 20, max_header_bytes=64 << 10, connection_window=1 << 20)

    def to_server() -> list:
        return server.receive_data(client.data_to_send())

    def to_client() -> list:
        return client.receive(server.data_to_send())

    to_server()
    to_client()
    first = client.open(http2.header_block(REQUEST_HEADERS))
    assert client.send_data(first, b"request", end_stream=True) == b""
    second = client.open(http2.header_block(REQUEST_HEADERS))
    assert (first, second) == (1, 3)
    assert client.open(http2.header_block(REQUEST_HEADERS)) is None  # the server's limit of 2
    got = to_server()
    assert [e.stream_id for e in got if isinstance(e, RequestReceived)] == [1, 3]
    assert dict(next(e for e in got if isinstance(e, RequestReceived)).headers)[b":path"] == REQUEST_HEADERS[2][1]
    assert any(isinstance(e, DataReceived) and e.data == b"request" for e in got)
    assert any(isinstance(e, StreamEnded) and e.stream_id == 1 for e in got)
    server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_data(1, b"answer")
    server.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    server.send_headers(3, [(b":status", b"200"), (b"grpc-status", b"5")], end_stream=True)  # trailers only
    events = to_client()
    assert [(type(e).__name__, e.stream_id, getattr(e, "ended", None)) for e in events] == [
        ("Headers", 1, False), ("Data", 1, False), ("Headers", 1, True), ("Headers", 3, True)]
    assert events[1].data == b"answer" and (b"grpc-status", b"5") in events[3].headers
    assert not client.streams  # both calls over: their streams closed (3 had not ended its request: cancelled)
    assert any(isinstance(e, StreamReset) and e.stream_id == 3 for e in to_server())
    third = client.open(http2.header_block(REQUEST_HEADERS))
    to_server()
    server.reset_stream(third)
    assert to_client() == [http2.Reset(third)]
    server.close_connection()
    assert to_client() == [http2.GOING_AWAY]
