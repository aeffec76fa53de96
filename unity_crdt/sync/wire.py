"""Sans-IO primitives of the wire grammar: decoder limits, the strict reading cursor, and the
fields several messages share (doc ids, inventory entries).

The messages themselves are in `codec` (and `inventory`); the grammar is in docs/protocol.md.
Every read checks a length or count against the bytes that remain before it allocates
anything, so hostile input costs memory in proportion to its own size only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ConfigError, DecodeError, LimitExceeded
from ..ids import check_doc_id
from .lib0 import put_varbytes, put_varuint, read_varuint
from .yjs import DIGEST_SIZE

# Smallest encoded inventory entry: doc-id length byte, one doc-id byte, the digest.
_MIN_INVENTORY_ENTRY = 2 + DIGEST_SIZE


@dataclass(frozen=True)
class Limits:
    """Decoder limits: sizes in bytes, counts in entries."""

    max_message: int = 64 * 2**20
    max_doc_id: int = 255
    max_inventory: int = 100_000
    max_batch: int = 10_000


DEFAULT_LIMITS = Limits()


class Reader:
    """Strict cursor over one message; every read checks the bytes that remain."""

    __slots__ = ("data", "limits", "pos")

    def __init__(self, data: bytes, limits: Limits) -> None:
        self.data = data
        self.limits = limits
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise DecodeError("message truncated")
        self.pos += 1
        return self.data[self.pos - 1]

    def varuint(self) -> int:
        value, self.pos = read_varuint(self.data, self.pos, minimal=True)
        return value

    def take(self, size: int) -> bytes:
        if size > self.remaining():
            raise DecodeError("length field exceeds the message")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def varbytes(self) -> bytes:
        return self.take(self.varuint())

    def flag(self, what: str) -> bool:
        value = self.byte()
        if value not in (0, 1):
            raise DecodeError(f"{what} flag must be 0 or 1, got {value}")
        return value == 1

    def doc_id(self, allow_empty: bool = False) -> str:
        size = self.varuint()
        if allow_empty and size == 0:
            return ""
        if size > self.limits.max_doc_id:
            raise LimitExceeded(f"doc id of {size} bytes exceeds the limit")
        try:
            return check_doc_id(self.take(size).decode("utf-8"))
        except UnicodeDecodeError:
            raise DecodeError("doc id is not valid UTF-8") from None
        except ConfigError as exc:
            raise DecodeError(f"invalid doc id: {exc}") from None

    def count(self, limit: int, min_entry: int, what: str) -> int:
        n = self.varuint()
        if n > limit:
            raise LimitExceeded(f"{what} count {n} exceeds the limit of {limit}")
        if n * min_entry > self.remaining():
            raise DecodeError(f"{what} count {n} exceeds the message")
        return n

    def end(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(f"{self.remaining()} trailing bytes after the message")


def put_doc(out: bytearray, doc: str) -> None:
    """Write a doc id as a varstring; raises ConfigError for an id a peer would refuse."""
    put_varbytes(out, check_doc_id(doc).encode("utf-8"))


def put_entries(out: bytearray, entries: Iterable[tuple[str, bytes]], n: int) -> None:
    """Write `n` (doc id, digest) entries, count first."""
    put_varuint(out, n)
    for doc, digest in entries:
        if len(digest) != DIGEST_SIZE:
            raise ConfigError(f"digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
        put_doc(out, doc)
        out += digest


def read_entries(r: Reader) -> dict[str, bytes]:
    """Read (doc id, digest) entries: within `max_inventory`, no doc id twice."""
    n = r.count(r.limits.max_inventory, _MIN_INVENTORY_ENTRY, "inventory")
    entries: dict[str, bytes] = {}
    for _ in range(n):
        doc = r.doc_id()
        if doc in entries:
            raise DecodeError("duplicate doc id in inventory")
        entries[doc] = r.take(DIGEST_SIZE)
    return entries
