"""gRPC's wire format over HTTP/2, shared by the router's own server and its Triton client: length-prefixed
messages, ``grpc-timeout`` headers and status codes (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md)."""

from __future__ import annotations

import struct
from urllib.parse import quote, unquote

STATUS = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
          "RESOURCE_EXHAUSTED": 8, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14}
"""gRPC status codes by name (the names RankError carries)."""
STATUS_NAME = {code: name for name, code in STATUS.items()}
TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def message_frame(payload: bytes) -> bytes:
    """One uncompressed gRPC message: flag 0, 4-byte big-endian length, the bytes."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def unframe(body: bytes) -> bytes | None:
    """The message of a body holding exactly one uncompressed gRPC message, else None."""
    if len(body) < 5 or body[0] != 0 or struct.unpack(">I", body[1:5])[0] != len(body) - 5:
        return None
    return body[5:]


def grpc_timeout_s(value: bytes | None) -> float | None:
    """The ``grpc-timeout`` header in seconds (``100m``, ``2S``, ...); None when absent or malformed."""
    if not value or len(value) < 2 or value[-1:] not in TIMEOUT_UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * TIMEOUT_UNITS[value[-1:]]


def grpc_timeout(seconds: float) -> bytes:
    """A ``grpc-timeout`` header value (at most 8 digits, in the finest unit that fits)."""
    for unit in (b"u", b"m", b"S", b"M", b"H"):
        value = max(1, int(seconds / TIMEOUT_UNITS[unit]))
        if value < 100_000_000:
            return str(value).encode() + unit
    return b"99999999H"


def status_trailers(code: str, message: str) -> list[tuple[bytes, bytes]]:
    """``grpc-status`` and the percent-encoded ``grpc-message`` (gRPC's rule: printable ASCII but ``%`` as is)."""
    text = quote(message[:2000], safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
    return [(b"grpc-status", str(STATUS[code]).encode()), (b"grpc-message", text.encode())]


def status_of(headers: dict[bytes, bytes]) -> tuple[int, str] | None:
    """(code, message) from trailers (or a trailers-only response's headers); None without ``grpc-status``."""
    raw = headers.get(b"grpc-status")
    if raw is None:
        return None
    return int(raw) if raw.isdigit() else 2, unquote(headers.get(b"grpc-message", b"").decode("latin-1"))


def bytes_tensor(values: list[bytes]) -> bytes:
    """A KServe v2 BYTES tensor's raw contents: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def read_bytes_tensor(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor's raw contents; ValueError when the lengths do not fit."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ValueError("a BYTES tensor ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise ValueError("a BYTES tensor element runs past its end")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out
