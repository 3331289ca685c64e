"""The router's HPACK decoder against the ``hpack`` package's encoder and decoder: the same headers out of the same
blocks, block after block on one connection (the dynamic table filling, evicting and resized), and a clear
error for each kind of malformed block."""

from __future__ import annotations

import random

import pytest
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple

from recserve.serving.hpack_decoder import HeaderDecoder, HeaderError

GRPC_CALL = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/recserve.Recommender/Rank"),
             (b":authority", b"127.0.0.1:5000"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
             (b"grpc-timeout", b"100m"), (b"user-agent", b"grpc-python/1.76.0")]


def _random_headers(rng: random.Random) -> list:
    names = [b"x-user", b"grpc-timeout", b"content-type", b":path", b"x-" + bytes(rng.choice(b"abcdef") for _ in range(3))]
    out = []
    for _ in range(rng.randint(1, 12)):
        value = bytes(rng.randrange(32, 127) for _ in range(rng.choice([0, 1, 5, 40, 300, 1500])))
        header = (rng.choice(names), value)
        out.append(NeverIndexedHeaderTuple(*header) if rng.random() < 0.1 else header)
    return out


@pytest.mark.parametrize("huffman", [True, False])
def test_blocks_decode_as_hpacks_own_decoder_decodes_them(huffman: bool) -> None:
    rng, encoder, theirs, ours = random.Random(7), Encoder(), Decoder(), HeaderDecoder(max_list_size=1 << 20)
    for n in range(400):
        if n % 97 == 50:  # the encoder shrinks or grows its table: a size update starts the next block
            encoder.header_table_size = rng.choice([0, 100, 1024, 4096])
        headers = GRPC_CALL if n % 3 == 0 else _random_headers(rng)
        block = encoder.encode(headers, huffman=huffman)
        want = [(bytes(k), bytes(v)) for k, v in theirs.decode(block, raw=True)]
        assert ours.decode(block) == want == [(bytes(k), bytes(v)) for k, v in headers]
        assert ours.dynamic == [tuple(e) for e in theirs.header_table.dynamic_entries]


def test_a_repeated_call_is_all_indexed_fields_and_decodes_the_same() -> None:
    encoder, ours = Encoder(), HeaderDecoder(max_list_size=8192)
    first, again = encoder.encode(GRPC_CALL), encoder.encode(GRPC_CALL)
    assert all(b & 0x80 for b in again) and len(again) == len(GRPC_CALL)
    assert ours.decode(first) == ours.decode(again) == GRPC_CALL


def test_a_field_larger_than_the_table_empties_it() -> None:
    ours = HeaderDecoder(max_list_size=1 << 20, max_table_size=100)
    ours.decode(b"\x40\x01a\x01b")  # literal with indexing, new name: (a, b), 34 bytes
    assert ours.dynamic == [(b"a", b"b")]
    big = b"\x40\x01c\x7f\x01" + b"v" * 128  # value of 128 bytes: larger than the table
    assert ours.decode(big) == [(b"c", b"v" * 128)]
    assert ours.dynamic == []


@pytest.mark.parametrize("block, needle", [
    (b"\x80", "index 0 is not in the table"),
    (b"\xff\x00", "index 127 is not in the table"),  # the static table has 61 entries, the dynamic none
    (b"\xbe", "index 62 is not in the table"),
    (b"\x7f", "ends inside an integer"),
    (b"\xff\xff\xff\xff\xff\xff\x01", "over 2\\^28"),
    (b"\x40\x05ab", "ends inside a string"),
    (b"\x00\x01a\x85\xff\xff", "ends inside a string"),
    (b"\x00\x81\xff\x01a", "Huffman string that does not decode"),
    (b"\x82\x20", "size update after a header field"),
    (b"\x3f\xe2\x1f", "a table size of 4097, over the 4096 allowed"),  # 31 + 98 + (31 << 7)
])
def test_malformed_blocks_are_header_errors(block: bytes, needle: str) -> None:
    ours = HeaderDecoder(max_list_size=8192)
    with pytest.raises(HeaderError, match=needle):
        ours.decode(block)


def test_a_header_list_over_the_limit_is_refused() -> None:
    encoder = Encoder()
    block = encoder.encode([(b"x-big", b"v" * 500)])
    with pytest.raises(HeaderError, match="larger than 400 bytes"):
        HeaderDecoder(max_list_size=400).decode(block)
