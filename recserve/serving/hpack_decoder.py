"""HPACK decoding (RFC 7541) for ``http2.Connection``: the header blocks a peer sends, into (name, value) bytes.

The ``hpack`` package's decoder did this before; profiled, it took 12-17 us to decode the eight one-byte
indexed fields a gRPC client sends on every call after its first (a generic loop of memoryview slices, a
debug log and a named tuple per field), about a third of the server's HTTP/2 handling per call. This one
keeps the same table in a list and decodes the common case, a field from the table, with one lookup.
It still takes ``hpack``'s static table and Huffman code, which are data, not logic.

Limits: the dynamic table is at most ``max_table_size`` (the default SETTINGS_HEADER_TABLE_SIZE, 4,096,
as neither side here sends another); a block's header list at most ``max_list_size`` bytes (RFC 7541
sizes: 32 + name + value per field). Anything malformed raises :class:`HeaderError` (a COMPRESSION_ERROR).
"""

from __future__ import annotations

from hpack.exceptions import HPACKError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

STATIC = [(n, v) for n, v in HeaderTable.STATIC_TABLE]
"""The static table (RFC 7541 Appendix A); index 1 is ``STATIC[0]``."""
ENTRY_OVERHEAD = 32


class HeaderError(Exception):
    """A header block that does not decode (the connection's COMPRESSION_ERROR)."""


class HeaderDecoder:
    """Decodes a connection's header blocks in order (they share the dynamic table)."""

    def __init__(self, max_list_size: int, max_table_size: int = 4096):
        self.max_list_size = max_list_size
        self.max_table_size = max_table_size
        self.table_size = max_table_size
        """The size the peer last set (at most ``max_table_size``)."""
        self.dynamic: list[tuple[bytes, bytes]] = []
        """Newest first: index 62 is ``dynamic[0]``."""
        self._used = 0

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = []
        size, i, n = 0, 0, len(block)
        while i < n:
            b = block[i]
            if b & 0x80:  # an indexed field
                index, i = self._integer(block, i, 7)
                header = self._field(index)
            elif b & 0x40:  # a literal, added to the dynamic table
                header, i = self._literal(block, i, 6)
                self._add(header)
            elif b & 0x20:  # a dynamic table size update: only before the first field
                if headers:
                    raise HeaderError("a table size update after a header field")
                new_size, i = self._integer(block, i, 5)
                if new_size > self.max_table_size:
                    raise HeaderError(f"a table size of {new_size}, over the {self.max_table_size} allowed")
                self.table_size = new_size
                self._evict(0)
                continue
            else:  # a literal not indexed (0x00) or never indexed (0x10)
                header, i = self._literal(block, i, 4)
            headers.append(header)
            size += ENTRY_OVERHEAD + len(header[0]) + len(header[1])
            if size > self.max_list_size:
                raise HeaderError(f"a header list larger than {self.max_list_size} bytes")
        return headers

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= len(STATIC):
            return STATIC[index - 1]
        if len(STATIC) < index <= len(STATIC) + len(self.dynamic):
            return self.dynamic[index - len(STATIC) - 1]
        raise HeaderError(f"header index {index} is not in the table")

    @staticmethod
    def _integer(block: bytes, i: int, prefix: int) -> tuple[int, int]:
        """(value, next position) of the integer at ``i`` with an N-bit prefix (RFC 7541 5.1)."""
        mask = (1 << prefix) - 1
        value = block[i] & mask
        i += 1
        if value < mask:
            return value, i
        shift = 0
        while True:
            if i >= len(block):
                raise HeaderError("a header block that ends inside an integer")
            b = block[i]
            i += 1
            value += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value, i
            if shift > 28:
                raise HeaderError("an integer over 2^28 in a header block")

    def _string(self, block: bytes, i: int) -> tuple[bytes, int]:
        huffman = block[i] & 0x80
        length, i = self._integer(block, i, 7)
        if i + length > len(block):
            raise HeaderError("a header block that ends inside a string")
        raw = block[i:i + length]
        if huffman:
            try:
                raw = decode_huffman(raw)
            except HPACKError as e:
                raise HeaderError(f"a Huffman string that does not decode: {e}") from None
        return raw, i + length

    def _literal(self, block: bytes, i: int, prefix: int) -> tuple[tuple[bytes, bytes], int]:
        index, i = self._integer(block, i, prefix)
        if index:
            name = self._field(index)[0]
        else:
            name, i = self._string(block, i)
        value, i = self._string(block, i)
        return (name, value), i

    def _add(self, header: tuple[bytes, bytes]) -> None:
        """RFC 7541 4.4: evict the oldest until it fits; a field larger than the whole table empties it."""
        entry = ENTRY_OVERHEAD + len(header[0]) + len(header[1])
        if entry > self.table_size:
            self.dynamic.clear()
            self._used = 0
        else:
            self._evict(entry)
            self.dynamic.insert(0, header)
            self._used += entry

    def _evict(self, room: int) -> None:
        """Drop the oldest entries until ``room`` more bytes fit in ``table_size``."""
        while self.dynamic and self._used + room > self.table_size:
            name, value = self.dynamic.pop()
            self._used -= ENTRY_OVERHEAD + len(name) + len(value)
