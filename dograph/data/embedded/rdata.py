"""Reading R data without R: compressed lazy-load records and the XDR serialization format."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from typing import Any

from dograph.data.embedded.text import _decode
from dograph.errors import DataError


def _decompress_any(data: bytes) -> bytes:
    """gzip, bzip2 or xz by magic number (R's saveRDS may use any of them)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def _rdb_record(record: bytes) -> bytes:
    """One lazy-load record: 4-byte big-endian length, then zlib data, or a type byte
    ('Z' xz, '2' bzip2, '0' none) and the data (R's src/main/serialize.c, R_decompress1/2/3)."""
    body, kind = record[4:], record[4:5]
    if kind == b"Z":
        return lzma.decompress(body[1:])
    if kind == b"2":
        return bz2.decompress(body[1:])
    if kind == b"0":
        return body[1:]
    return zlib.decompress(body)


class _RXdr:
    """Reader of R's XDR serialization, enough for vectors, lists and pairlists.

    Format: R Internals manual, 'Serialization Formats'; each item starts with a flags int whose low
    byte is the SEXP type, bit 9 'has attributes', bit 10 'has tag'.
    """

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise DataError("not an R XDR serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # R version that wrote it, minimal R version to read it
        if version == 3:
            length = self.int()  # native encoding name: length, then bytes
            self.pos += length

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        if kind in (254, 242, 251, 253):  # NILVALUE, EMPTYENV, MISSINGARG, GLOBALENV: none carry data
            return None
        if kind == 255:  # REFSXP: index packed in the flags, or in the next int when zero
            return self.refs[((flags >> 8) or self.int()) - 1]
        if kind == 1:  # SYMSXP: a CHARSXP follows
            symbol = self.item()
            self.refs.append(symbol)
            return symbol
        if kind == 9:  # CHARSXP
            return self.chars()
        if kind in (2, 6):  # LISTSXP, LANGSXP
            return self.pairlist(flags)
        return self.vector(kind, flags)

    def chars(self) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_STRING
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        return _decode(raw)

    def pairlist(self, flags: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            if flags & (1 << 9):
                self.item()  # attributes of the cell: unused
            tag = self.item() if flags & (1 << 10) else None
            out[str(tag) if tag is not None else str(len(out))] = self.item()
            flags = self.int()
            if flags & 0xFF != 2:
                self.pos -= 4
                rest = self.item()
                if isinstance(rest, dict):
                    out.update(rest)
                return out

    def vector(self, kind: int, flags: int) -> Any:
        n = self.int()
        if n == -1:  # long vector: two more ints
            n = (self.int() << 32) + self.int()
        if kind in (10, 13):  # LGLSXP, INTSXP
            values: list[Any] = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # REALSXP
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            values = [self.item() for _ in range(n)]
        else:
            raise DataError(f"R serialization: unsupported SEXP type {kind}")
        if flags & (1 << 9):
            attributes = self.item()
            names = attributes.get("names") if isinstance(attributes, dict) else None
            if isinstance(names, list) and len(names) == len(values):
                return dict(zip(names, values, strict=True))
        return values
