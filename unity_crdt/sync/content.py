"""A digest of what a doc *holds*, not of how it was encoded: equivocation shows in it (#11 F6).

The doc digest (`yjs.doc_digest`) covers the state vector and the delete set: which ids a
replica holds and which are deleted, not what they say. A member that sends two different
items under one Yjs id to two nodes leaves them with equal digests and different content,
forever. This digest reads every live item of a full state and hashes what it holds: its id,
where it was inserted (origin, right origin, parent) and its content.

Two replicas holding the same items must get the same digest whatever their history, and yrs
encodes one state differently depending on how it was built (items split at different
points, merged by the local squash, deleted content kept or garbage-collected). So the hash
is over canonical *runs*, not over items: the live units (one per clock) are joined while each
unit's origin is the unit before it, with the same right origin and kind of content, which is
exactly what splitting and squashing preserve; deleted units contribute only through the
delete set. Sans-IO; it reads Yjs update v1 like the guard does (`yjs`), after the guard.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from .lib0 import put_varbytes, put_varuint, read_varuint
from .yjs import DIGEST_SIZE, read_delete_set

__all__ = ["content_digest"]

_LABEL = b"unity-crdt/v1/content"
_STRING, _ANY = 4, 8
Id = tuple[int, int]


@dataclass
class _Item:
    client: int
    clock: int
    origin: Id | None
    rorigin: Id | None
    parent: bytes  # the explicit parent info, as encoded (empty when an origin implies it)
    kind: int  # the content ref (type ref + 16 for Type content)
    length: int  # clock units
    text: bytes  # a String's UTF-16-LE bytes (2 per unit)
    units: list[bytes]  # otherwise one entry per unit (an Any value; one opaque blob)

    def content(self, offset: int, length: int) -> bytes:
        """Units [offset, offset + length) as bytes, the same however the items were split."""
        if self.kind == _STRING:
            return self.text[2 * offset : 2 * (offset + length)]
        return b"".join(len(u).to_bytes(4, "big") + u for u in self.units[offset : offset + length])


def _id(data: bytes, pos: int) -> tuple[Id, int]:
    client, pos = read_varuint(data, pos)
    clock, pos = read_varuint(data, pos)
    return (client, clock), pos


def _bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = read_varuint(data, pos)
    return data[pos : pos + size], pos + size


def _any_end(data: bytes, pos: int) -> int:
    """The end of one lib0 Any value (the guard has already bounded its nesting)."""
    stack = [1]
    maps = [False]
    while stack:
        if stack[-1] == 0:
            stack.pop()
            maps.pop()
            continue
        stack[-1] -= 1
        if maps[-1]:
            pos = _bytes(data, pos)[1]
        tag = data[pos]
        pos += 1
        if tag == 125:
            while data[pos] & 0x80:
                pos += 1
            pos += 1
        elif tag == 124:
            pos += 4
        elif tag in (123, 122):
            pos += 8
        elif tag in (119, 116):
            pos = _bytes(data, pos)[1]
        elif tag in (118, 117):
            n, pos = read_varuint(data, pos)
            stack.append(n)
            maps.append(tag == 118)
    return pos


def _items(state: bytes) -> Iterator[_Item]:
    clients, pos = read_varuint(state, 0)
    for _ in range(clients):
        structs, pos = read_varuint(state, pos)
        client, pos = read_varuint(state, pos)
        clock, pos = read_varuint(state, pos)
        for _ in range(structs):
            info = state[pos]
            pos += 1
            if info in (0, 10):  # GC, Skip: deleted or absent, nothing live
                length, pos = read_varuint(state, pos)
                clock += length
                continue
            origin = rorigin = None
            if info & 0x80:
                origin, pos = _id(state, pos)
            if info & 0x40:
                rorigin, pos = _id(state, pos)
            start = pos
            if not info & 0xC0:
                kind, pos = read_varuint(state, pos)
                pos = _bytes(state, pos)[1] if kind == 1 else _id(state, pos)[1]
                if info & 0x20:
                    pos = _bytes(state, pos)[1]
            parent = state[start:pos]
            ref = info & 0x1F
            units: list[bytes] = []
            text = b""
            if ref == 1:  # Deleted: only a length
                length, pos = read_varuint(state, pos)
            elif ref == _STRING:
                raw, pos = _bytes(state, pos)
                text = raw.decode("utf-8").encode("utf-16-le")
                length = len(text) // 2
            elif ref == _ANY:
                n, pos = read_varuint(state, pos)
                units = []
                for _ in range(n):
                    end = _any_end(state, pos)
                    units.append(state[pos:end])
                    pos = end
                length = n
            else:  # one unit of opaque content (Binary, Embed, Format, Type, Doc, JSON)
                end = _opaque_end(state, pos, ref)
                if ref == 7:
                    ref = 16 + state[pos]  # a Text and a Map under one id are not the same
                units = [state[pos:end]]
                pos = end
                length = 1
            yield _Item(client, clock, origin, rorigin, parent, ref, length, text, units)
            clock += length


def _opaque_end(data: bytes, pos: int, ref: int) -> int:
    if ref == 2:  # JSON: yrs reads count + 1 strings
        n, pos = read_varuint(data, pos)
        for _ in range(n + 1):
            pos = _bytes(data, pos)[1]
        return pos
    if ref in (3, 5):  # Binary, Embed
        return _bytes(data, pos)[1]
    if ref == 6:  # Format: key, value
        return _bytes(data, _bytes(data, pos)[1])[1]
    if ref == 7:  # Type: type ref (+ the XmlElement tag name)
        return _bytes(data, pos + 1)[1] if data[pos] == 3 else pos + 1
    return _any_end(data, _bytes(data, pos)[1])  # Doc: guid, options


def _live(ranges: list[tuple[int, int]], starts: list[int], clock: int, n: int) -> list[Id]:
    """The (offset, length) stretches of [clock, clock + n) that no delete range covers."""
    out: list[Id] = []
    at, end = clock, clock + n
    i = max(0, bisect.bisect_right(starts, clock) - 1)
    while at < end:
        while i < len(ranges) and ranges[i][0] + ranges[i][1] <= at:
            i += 1
        if i < len(ranges) and ranges[i][0] <= at:
            at = ranges[i][0] + ranges[i][1]
            continue
        stop = min(end, ranges[i][0]) if i < len(ranges) else end
        out.append((at - clock, stop - at))
        at = stop
    return out


def content_digest(state: bytes) -> bytes:
    """A 16-byte digest of the live content of a full doc state (`Doc.get_update()`).

    Equal for replicas holding the same items, whatever order they learnt them in; different
    when the same id holds different content on two replicas. Raises DecodeError (from the
    varuint reader) or IndexError only for bytes the guard would have refused.
    """
    deletes = read_delete_set(_delete_set_of(state))
    h = hashlib.blake2b(_LABEL, digest_size=DIGEST_SIZE)
    head = bytearray()
    body = bytearray()
    run_key: tuple[int, int, Id | None, int] | None = None  # (client, next clock, rorigin, kind)

    def flush() -> None:
        if head:
            put_varbytes(head, bytes(body))
            h.update(bytes(head))
            head.clear()
            body.clear()

    for item in _items(state):
        ranges = deletes.get(item.client, [])
        starts = [r[0] for r in ranges]
        for offset, length in _live(ranges, starts, item.clock, item.length):
            clock = item.clock + offset
            origin = item.origin if offset == 0 else (item.client, clock - 1)
            joins = (
                run_key == (item.client, clock, item.rorigin, item.kind)
                and origin == (item.client, clock - 1)
                and item.kind in (_STRING, _ANY)
            )
            if not joins:
                flush()
                put_varuint(head, item.client)
                put_varuint(head, clock)
                for ref in (origin, item.rorigin):
                    put_varuint(head, 0 if ref is None else 1)
                    if ref is not None:
                        put_varuint(head, ref[0])
                        put_varuint(head, ref[1])
                put_varbytes(head, item.parent if offset == 0 else b"")
                put_varuint(head, item.kind)
            body += item.content(offset, length)
            run_key = (item.client, clock + length, item.rorigin, item.kind)
    flush()
    return h.digest()


def _delete_set_of(state: bytes) -> bytes:
    """The delete set of a full state, as an update with no structs (what read_delete_set reads)."""
    clients, pos = read_varuint(state, 0)
    for _ in range(clients):
        structs, pos = read_varuint(state, pos)
        pos = read_varuint(state, read_varuint(state, pos)[1])[1]
        for _ in range(structs):
            pos = _skip_struct(state, pos)
    return b"\x00" + state[pos:]


def _skip_struct(state: bytes, pos: int) -> int:
    info = state[pos]
    pos += 1
    if info in (0, 10):
        return read_varuint(state, pos)[1]
    if info & 0x80:
        pos = _id(state, pos)[1]
    if info & 0x40:
        pos = _id(state, pos)[1]
    if not info & 0xC0:
        kind, pos = read_varuint(state, pos)
        pos = _bytes(state, pos)[1] if kind == 1 else _id(state, pos)[1]
        if info & 0x20:
            pos = _bytes(state, pos)[1]
    ref = info & 0x1F
    if ref == 1:
        return read_varuint(state, pos)[1]
    if ref == _STRING:
        return _bytes(state, pos)[1]
    if ref == _ANY:
        n, pos = read_varuint(state, pos)
        for _ in range(n):
            pos = _any_end(state, pos)
        return pos
    return _opaque_end(state, pos, ref)
