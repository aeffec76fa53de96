"""Sans-IO Yjs binary readers: the plausibility guard, state vectors, delete sets, doc digests.

Everything here reads Yjs update v1 / state-vector bytes that pycrdt would otherwise parse
unchecked. Stdlib only: no pycrdt, no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Callable

from ..errors import DecodeError, ErrorCode
from .lib0 import put_varuint, read_varuint

__all__ = [
    "DIGEST_SIZE",
    "bucket_of",
    "check_state_vector",
    "check_update",
    "doc_digest",
    "entry_hash",
    "is_empty_update",
    "read_delete_set",
    "read_state_vector",
]

DIGEST_SIZE = 16
_DIGEST_LABEL = b"unity-crdt/v1/digest"


# --------------------------------------------------------------------------- Yjs guard
#
# A walk over Yjs update v1 that mirrors the decoder of yrs 0.28 (pycrdt 0.14.13) step by
# step, including where yrs departs from Yjs (JSON content holds count+1 strings, XmlHook has
# no name), so that both read the same bytes as the same fields. It rejects every count that
# cannot fit in the bytes left, nesting deeper than _MAX_DEPTH, and invalid UTF-8. Without it:
# an 8-byte update commits 512 MB (client-count HashMap), a 30-byte one 256 MB (a nested Any
# map) and a 200 KB one of nested Any arrays overflows the stack (SIGSEGV).

_MAX_DEPTH = 128  # serde_json's default, which yrs already applies to embeds and formats


class _Bad(DecodeError):
    """Internal: a Yjs blob failed the walk (reported as BAD_UPDATE at the API edge)."""


_yvar = read_varuint  # the guard's hot path: one byte per call, almost always


def _yvarint(data: bytes, pos: int) -> int:
    """Skip a lib0 signed varint (6 bits in the first byte, then 7 per byte)."""
    for _ in range(10):
        b = data[pos]
        pos += 1
        if b < 0x80:
            return pos
    raise _Bad("varint longer than 10 bytes")


def _ycount(data: bytes, pos: int, min_entry: int) -> tuple[int, int]:
    n, pos = _yvar(data, pos)
    if n * min_entry > len(data) - pos:
        raise _Bad("count exceeds the bytes left")
    return n, pos


def _yskip(data: bytes, pos: int, utf8: bool) -> int:
    size, pos = _yvar(data, pos)
    end = pos + size
    if end > len(data):
        raise _Bad("length exceeds the bytes left")
    if utf8 and size:
        chunk = data[pos:end]
        if not chunk.isascii():
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                raise _Bad("invalid UTF-8 string") from None
    return end


def _yany(data: bytes, pos: int, count: int) -> int:
    """Skip `count` lib0 Any values, iteratively, with bounded nesting."""
    stack = [[count, 0]]  # [values left, 1 if a map (each value preceded by a key)]
    while stack:
        top = stack[-1]
        if top[0] == 0:
            stack.pop()
            continue
        top[0] -= 1
        if top[1]:
            pos = _yskip(data, pos, True)
        tag = data[pos]
        pos += 1
        if tag in (127, 126, 121, 120):  # undefined, null, false, true
            continue
        if tag == 125:
            pos = _yvarint(data, pos)
        elif tag == 124:
            pos += 4
        elif tag in (123, 122):
            pos += 8
        elif tag in (119, 116):
            pos = _yskip(data, pos, tag == 119)
        elif tag in (118, 117):
            n, pos = _ycount(data, pos, 2 if tag == 118 else 1)
            if len(stack) > _MAX_DEPTH:
                raise _Bad("Any values nested too deeply")
            stack.append([n, int(tag == 118)])
        else:
            raise _Bad(f"unknown Any tag {tag}")
    if pos > len(data):
        raise _Bad("truncated")
    return pos


def _yid(data: bytes, pos: int) -> int:
    return _yvar(data, _yvar(data, pos)[1])[1]


# Struct kinds a parent id may point at: yrs integrates a child of a Type item, or drops it
# under a Deleted item or a GC struct; any other item as a parent raises InvalidParent after
# the rest of the update was applied (block.rs, Item::repair), which pycrdt turns into a
# RuntimeError. Skip structs are never integrated, so they are not parents either way.
_REF_GC, _REF_DELETED, _REF_JSON, _REF_STRING, _REF_TYPE, _REF_SKIP = 0, 1, 2, 4, 7, 10
_PARENT_OK = frozenset((_REF_GC, _REF_DELETED, _REF_TYPE))


# Every byte but the lead bytes of 4-byte UTF-8 sequences (deleted to count those in one pass).
_NOT_ASTRAL_LEADS = bytes(b for b in range(256) if not 0xF0 <= b <= 0xF4)


def _utf16_len(data: bytes, pos: int) -> tuple[int, int]:
    """Skip a String content and return (its length in UTF-16 units, as clocks count it, end)."""
    start = _yvar(data, pos)[1]
    end = _yskip(data, pos, False)
    chunk = data[start:end]
    if chunk.isascii():
        return end - start, end
    try:
        chars = len(chunk.decode("utf-8"))  # validates, too
    except UnicodeDecodeError:
        raise _Bad("invalid UTF-8 string") from None
    # A character outside the BMP is two UTF-16 units; its UTF-8 form starts with F0-F4.
    return chars + len(chunk.translate(None, _NOT_ASTRAL_LEADS)), end


def _ystruct(data: bytes, pos: int, parents: list[tuple[int, int]]) -> tuple[int, int, int]:
    """Skip one struct -> (end, kind, clock length; -1 if unknown); parent ids go to `parents`."""
    info = data[pos]
    pos += 1
    if info in (0, 10):  # GC, Skip
        length, pos = _yvar(data, pos)
        return pos, info, length
    ref = info & 0x1F
    if not 1 <= ref <= 9:
        raise _Bad(f"unknown struct type {ref}")
    if info & 0x80:
        pos = _yid(data, pos)
    if info & 0x40:
        pos = _yid(data, pos)
    if not info & 0xC0:
        parent, pos = _yvar(data, pos)
        if parent == 1:
            pos = _yskip(data, pos, True)
        elif parent == 0:
            client, pos = _yvar(data, pos)
            clock, pos = _yvar(data, pos)
            parents.append((client, clock))
        else:
            raise _Bad("invalid parent info")
        if info & 0x20:
            pos = _yskip(data, pos, True)
    if ref == 1:  # Deleted
        length, pos = _yvar(data, pos)
        return pos, ref, length
    if ref == 2:  # JSON: yrs reads count + 1 strings (its clock length is not Yjs's)
        n, pos = _ycount(data, pos, 1)
        for _ in range(n + 1):
            pos = _yskip(data, pos, True)
        return pos, ref, -1
    if ref == 4:  # String: clocks count UTF-16 units
        length, pos = _utf16_len(data, pos)
        return pos, ref, length
    if ref in (3, 5):  # Binary, Embed
        return _yskip(data, pos, ref != 3), ref, 1
    if ref == 6:  # Format
        return _yskip(data, _yskip(data, pos, True), True), ref, 1
    if ref == 7:  # Type
        type_ref = data[pos]
        pos += 1
        if type_ref == 3:  # XmlElement carries its tag name
            return _yskip(data, pos, True), ref, 1
        if type_ref in (0, 1, 2, 4, 5, 6, 9, 15):
            return pos, ref, 1
        raise _Bad(f"unknown type ref {type_ref}")
    if ref == 8:  # Any
        n, pos = _ycount(data, pos, 1)
        return _yany(data, pos, n), ref, n
    return _yany(data, _yskip(data, pos, True), 1), ref, 1  # Doc: guid, options


def _ydelete_set(data: bytes, pos: int, out: dict[int, list[tuple[int, int]]] | None) -> int:
    clients, pos = _ycount(data, pos, 2)
    for _ in range(clients):
        client, pos = _yvar(data, pos)
        ranges, pos = _ycount(data, pos, 2)
        found = out.setdefault(client, []) if out is not None else None
        for _ in range(ranges):
            clock, pos = _yvar(data, pos)
            length, pos = _yvar(data, pos)
            if found is not None:
                found.append((clock, length))
    return pos


def _walk_update(data: bytes) -> None:
    # Every client entry is at least 3 bytes (struct count, client, clock).
    clients, pos = _ycount(data, 0, 3)
    parents: list[tuple[int, int]] = []
    # client -> (start clocks, kinds) of its structs in this update, in clock order; None once
    # a clock length is unknown (JSON content), so no verdict is ever based on a guess.
    spans: dict[int, tuple[list[int], list[int]] | None] = {}
    for _ in range(clients):
        structs, pos = _yvar(data, pos)
        client, pos = _yvar(data, pos)
        clock, pos = _yvar(data, pos)
        if structs * 2 > len(data) - pos:  # a struct is at least 2 bytes
            raise _Bad("struct count exceeds the bytes left")
        starts: list[int] = []
        kinds: list[int] = []
        known = client not in spans
        for _ in range(structs):
            pos, kind, length = _ystruct(data, pos, parents)
            starts.append(clock)
            kinds.append(kind)
            if length < 0:
                known = False
            clock += length
        starts.append(clock)  # the end of the last struct
        spans[client] = (starts, kinds) if known else None
    if _ydelete_set(data, pos, None) != len(data):
        raise _Bad("trailing bytes")
    for client, clock in parents:
        _check_parent(spans.get(client), clock)


def _check_parent(span: tuple[list[int], list[int]] | None, clock: int) -> None:
    """Reject a parent id that falls inside an item of this update that is not a type."""
    if span is None:
        return  # not in this update (or unknowable here): the replica catches what yrs raises
    starts, kinds = span
    i = bisect_right(starts, clock) - 1
    if 0 <= i < len(kinds) and kinds[i] not in _PARENT_OK and kinds[i] != _REF_SKIP:
        raise _Bad("an item's parent is an item that is not a shared type")


def _guarded(what: str, data: bytes, fn: Callable[[bytes], object]) -> None:
    """Run a walker, mapping every failure to DecodeError(BAD_UPDATE)."""
    try:
        fn(data)
    except DecodeError as exc:
        raise DecodeError(f"implausible {what}: {exc}", ErrorCode.BAD_UPDATE) from None
    except IndexError:
        raise DecodeError(f"truncated {what}", ErrorCode.BAD_UPDATE) from None


def check_update(update: bytes) -> None:
    """Reject a Yjs v1 update that could make pycrdt over-allocate or crash (DecodeError)."""
    _guarded("Yjs update", bytes(update), _walk_update)


def _walk_state_vector(data: bytes) -> dict[int, int]:
    n, pos = _ycount(data, 0, 2)
    result: dict[int, int] = {}
    for _ in range(n):
        client, pos = _yvar(data, pos)
        clock, pos = _yvar(data, pos)
        if client in result:
            raise _Bad("duplicate client in state vector")
        result[client] = clock
    if pos != len(data):
        raise _Bad("trailing bytes")
    return result


def check_state_vector(sv: bytes) -> None:
    """Reject an implausible Yjs state vector (DecodeError)."""
    _guarded("state vector", bytes(sv), _walk_state_vector)


def read_state_vector(sv: bytes) -> dict[int, int]:
    """Parse a state vector into {client: clock}; DecodeError if malformed."""
    out: list[dict[int, int]] = []
    _guarded("state vector", bytes(sv), lambda d: out.append(_walk_state_vector(d)))
    return out[0]


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for clock, length in sorted(r for r in ranges if r[1] > 0):
        if merged and clock <= merged[-1][0] + merged[-1][1]:
            start, prev = merged[-1]
            merged[-1] = (start, max(prev, clock + length - start))
        else:
            merged.append((clock, length))
    return merged


def read_delete_set(update: bytes) -> dict[int, list[tuple[int, int]]]:
    """The delete set of an update with zero structs: {client: sorted, merged (clock, len)}."""
    raw: dict[int, list[tuple[int, int]]] = {}

    def walk(data: bytes) -> None:
        if data[:1] != b"\x00":
            raise _Bad("expected an update without structs")
        if _ydelete_set(data, 1, raw) != len(data):
            raise _Bad("trailing bytes")

    _guarded("delete set", bytes(update), walk)
    merged = {client: _merge_ranges(ranges) for client, ranges in raw.items()}
    return {client: ranges for client, ranges in sorted(merged.items()) if ranges}


def doc_digest(state_vector: bytes, delete_set_update: bytes) -> bytes:
    """A 16-byte digest of a doc's state, independent of encoding order and history."""
    if (
        delete_set_update == b"\x00\x00"
        and state_vector[:1] == b"\x01"
        and state_vector[-1:] != b"\x00"
    ):
        # One client, no deletions (most docs): yrs's minimal encoding already is the
        # canonical form below (count 1, client, clock > 0, then no delete set).
        return hashlib.sha256(_DIGEST_LABEL + state_vector + b"\x00").digest()[:DIGEST_SIZE]
    out = bytearray()
    clocks = sorted((c, k) for c, k in read_state_vector(state_vector).items() if k)
    put_varuint(out, len(clocks))
    for client, clock in clocks:
        put_varuint(out, client)
        put_varuint(out, clock)
    deletes = read_delete_set(delete_set_update)
    put_varuint(out, len(deletes))
    for client, ranges in deletes.items():
        put_varuint(out, client)
        put_varuint(out, len(ranges))
        for clock, length in ranges:
            put_varuint(out, clock)
            put_varuint(out, length)
    return hashlib.sha256(_DIGEST_LABEL + bytes(out)).digest()[:DIGEST_SIZE]


def bucket_of(doc: str) -> int:
    """The inventory bucket (0-255) of a doc: the first byte of blake2b(doc id)."""
    return hashlib.blake2b(doc.encode("utf-8"), digest_size=1).digest()[0]


def entry_hash(doc: str, digest: bytes) -> bytes:
    """The 16-byte hash of one inventory entry; their XOR is the inventory's fingerprint."""
    return hashlib.blake2b(doc.encode("utf-8") + b"\0" + digest, digest_size=16).digest()


def is_empty_update(update: bytes) -> bool:
    """Whether an update carries nothing: no structs and no deletions."""
    return bytes(update) == b"\x00\x00"
