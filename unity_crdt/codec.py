"""Sans-IO wire codec: message types, strict encode/decode, the Yjs guard and doc digests.

The byte grammar is in docs/protocol.md. Every decoder here checks a length or count against
the bytes that remain before it allocates anything, so hostile input costs memory in proportion
to its own size only. Stdlib only: no pycrdt, no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

from .errors import ConfigError, DecodeError, ErrorCode, LimitExceeded
from .ids import check_doc_id

PROTOCOL_VERSION = 1
DIGEST_SIZE = 16
_DIGEST_LABEL = b"unity-crdt/v1/digest"
_U64 = 1 << 64
# Smallest encoded inventory entry: doc-id length byte, one doc-id byte, the digest.
_MIN_INVENTORY_ENTRY = 2 + DIGEST_SIZE


@dataclass(frozen=True)
class Limits:
    """Decoder limits: sizes in bytes, counts in entries."""

    max_message: int = 64 * 2**20
    max_doc_id: int = 255
    max_inventory: int = 100_000
    max_reason: int = 1024
    max_batch: int = 10_000


DEFAULT_LIMITS = Limits()


class MsgType(IntEnum):
    """First byte of every message."""

    HELLO = 1
    DOC = 2
    PING = 3
    PONG = 4
    BYE = 5
    ERROR = 6
    BATCH = 7


@dataclass(frozen=True, slots=True)
class Hello:
    """Opening message: protocol version and the sender's inventory (doc id -> digest)."""

    version: int
    inventory: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class SyncStep1:
    """y-protocols SyncStep1: the sender's state vector of one doc."""

    doc: str
    state_vector: bytes


@dataclass(frozen=True, slots=True)
class SyncStep2:
    """y-protocols SyncStep2: the update the receiver is missing."""

    doc: str
    update: bytes


@dataclass(frozen=True, slots=True)
class Update:
    """y-protocols Update: a live incremental update."""

    doc: str
    update: bytes


@dataclass(frozen=True, slots=True)
class Awareness:
    """y-protocols awareness payload, passed through opaque."""

    doc: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """Keepalive probe."""

    nonce: int


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a Ping, echoing its nonce."""

    nonce: int


@dataclass(frozen=True, slots=True)
class Bye:
    """Orderly end of a session."""

    code: ErrorCode
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Error:
    """A problem report, about one doc or (doc=None) the whole link."""

    code: ErrorCode
    doc: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Batch:
    """Several messages in one; never nested."""

    messages: tuple[Message, ...]


Message: TypeAlias = (
    Hello | SyncStep1 | SyncStep2 | Update | Awareness | Ping | Pong | Bye | Error | Batch
)

# --------------------------------------------------------------------------- encoding


def _put_varuint(out: bytearray, value: int) -> None:
    if not 0 <= value < _U64:
        raise ConfigError(f"integer out of varuint range: {value}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_varbytes(out: bytearray, data: bytes) -> None:
    _put_varuint(out, len(data))
    out += data


def _put_doc(out: bytearray, doc: str) -> None:
    _put_varbytes(out, check_doc_id(doc).encode("utf-8"))


def _put_reason(out: bytearray, reason: str) -> None:
    # Truncate at a character boundary so a long reason never makes the peer drop the link.
    raw = reason.encode("utf-8", "replace")[: DEFAULT_LIMITS.max_reason]
    _put_varbytes(out, raw.decode("utf-8", "ignore").encode("utf-8"))


def _encode_into(out: bytearray, msg: Message, nested: bool) -> None:
    if isinstance(msg, Hello):
        out.append(MsgType.HELLO)
        _put_varuint(out, msg.version)
        _put_varuint(out, len(msg.inventory))
        for doc, digest in msg.inventory.items():
            if len(digest) != DIGEST_SIZE:
                raise ConfigError(f"digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
            _put_doc(out, doc)
            out += digest
    elif isinstance(msg, SyncStep1 | SyncStep2 | Update | Awareness):
        out.append(MsgType.DOC)
        _put_doc(out, msg.doc)
        if isinstance(msg, SyncStep1):
            out += b"\x00\x00"
            _put_varbytes(out, msg.state_vector)
        elif isinstance(msg, SyncStep2):
            out += b"\x00\x01"
            _put_varbytes(out, msg.update)
        elif isinstance(msg, Update):
            out += b"\x00\x02"
            _put_varbytes(out, msg.update)
        else:
            out.append(0x01)
            _put_varbytes(out, msg.payload)
    elif isinstance(msg, Ping | Pong):
        out.append(MsgType.PING if isinstance(msg, Ping) else MsgType.PONG)
        _put_varuint(out, msg.nonce)
    elif isinstance(msg, Bye):
        out.append(MsgType.BYE)
        _put_varuint(out, int(msg.code))
        _put_reason(out, msg.reason)
    elif isinstance(msg, Error):
        out.append(MsgType.ERROR)
        _put_varuint(out, int(msg.code))
        if msg.doc is None:
            out.append(0)
        else:
            out.append(1)
            _put_doc(out, msg.doc)
        _put_reason(out, msg.reason)
    elif isinstance(msg, Batch):
        if nested:
            raise ConfigError("a Batch cannot contain another Batch")
        out.append(MsgType.BATCH)
        _put_varuint(out, len(msg.messages))
        for inner in msg.messages:
            buf = bytearray()
            _encode_into(buf, inner, True)
            _put_varbytes(out, bytes(buf))
    else:
        raise ConfigError(f"not a message: {type(msg).__name__}")


def encode(msg: Message) -> bytes:
    """Serialize a message; raises ConfigError for values a peer could not decode."""
    out = bytearray()
    _encode_into(out, msg, False)
    return bytes(out)


def encode_batch(encoded: list[bytes]) -> bytes:
    """A BATCH of already-encoded (non-batch) messages, so queues encode each message once."""
    out = bytearray((MsgType.BATCH,))
    _put_varuint(out, len(encoded))
    for part in encoded:
        if part[:1] == bytes((MsgType.BATCH,)):
            raise ConfigError("a Batch cannot contain another Batch")
        _put_varbytes(out, part)
    return bytes(out)


# --------------------------------------------------------------------------- decoding


class _Reader:
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
        value = shift = 0
        for i in range(10):
            b = self.byte()
            value |= (b & 0x7F) << shift
            if b < 0x80:
                if i and b == 0:
                    raise DecodeError("non-minimal varuint")
                if value >= _U64:
                    raise DecodeError("varuint exceeds 64 bits")
                return value
            shift += 7
        raise DecodeError("varuint longer than 10 bytes")

    def take(self, size: int) -> bytes:
        if size > self.remaining():
            raise DecodeError("length field exceeds the message")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def varbytes(self) -> bytes:
        return self.take(self.varuint())

    def varstring(self, limit: int, what: str) -> str:
        size = self.varuint()
        if size > limit:
            raise LimitExceeded(f"{what} of {size} bytes exceeds the limit of {limit}")
        try:
            return self.take(size).decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"{what} is not valid UTF-8") from None

    def doc_id(self) -> str:
        name = self.varstring(self.limits.max_doc_id, "doc id")
        try:
            return check_doc_id(name)
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


def _decode_doc(r: _Reader) -> Message:
    doc = r.doc_id()
    kind = r.byte()
    if kind == 0x00:
        step = r.byte()
        payload = r.varbytes()
        if step == 0x00:
            check_state_vector(payload)
            return SyncStep1(doc, payload)
        if step in (0x01, 0x02):
            check_update(payload)
            return SyncStep2(doc, payload) if step == 0x01 else Update(doc, payload)
        raise DecodeError(f"unknown sync message type {step}")
    if kind == 0x01:
        return Awareness(doc, r.varbytes())
    raise DecodeError(f"unknown y-protocols message type {kind}")


def _decode_one(r: _Reader, nested: bool) -> Message:
    tag = r.byte()
    if tag == MsgType.HELLO:
        version = r.varuint()
        n = r.count(r.limits.max_inventory, _MIN_INVENTORY_ENTRY, "inventory")
        inventory: dict[str, bytes] = {}
        for _ in range(n):
            doc = r.doc_id()
            if doc in inventory:
                raise DecodeError("duplicate doc id in inventory")
            inventory[doc] = r.take(DIGEST_SIZE)
        return Hello(version, inventory)
    if tag == MsgType.DOC:
        return _decode_doc(r)
    if tag in (MsgType.PING, MsgType.PONG):
        nonce = r.varuint()
        return Ping(nonce) if tag == MsgType.PING else Pong(nonce)
    if tag == MsgType.BYE:
        code = ErrorCode.parse(r.varuint())
        return Bye(code, r.varstring(r.limits.max_reason, "reason"))
    if tag == MsgType.ERROR:
        code = ErrorCode.parse(r.varuint())
        has_doc = r.byte()
        if has_doc not in (0, 1):
            raise DecodeError(f"invalid has_doc flag {has_doc}")
        about = r.doc_id() if has_doc else None
        return Error(code, about, r.varstring(r.limits.max_reason, "reason"))
    if tag == MsgType.BATCH:
        if nested:
            raise DecodeError("nested batch")
        # Each inner message is at least a length byte and a tag byte.
        n = r.count(r.limits.max_batch, 2, "batch")
        messages = []
        for _ in range(n):
            inner = _Reader(r.varbytes(), r.limits)
            messages.append(_decode_one(inner, True))
            inner.end()
        return Batch(tuple(messages))
    raise DecodeError(f"unknown message tag {tag}")


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse one message strictly; raises only DecodeError or LimitExceeded."""
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > limits.max_message:
        raise LimitExceeded(f"message of {len(data)} bytes exceeds {limits.max_message}")
    r = _Reader(data, limits)
    msg = _decode_one(r, False)
    r.end()
    return msg


# --------------------------------------------------------------------------- Yjs guard
#
# A walk over Yjs update v1 that mirrors the decoder of yrs 0.28 (pycrdt 0.14.13) step by
# step, including where yrs departs from Yjs (JSON content holds count+1 strings, XmlHook has
# no name), so that both read the same bytes as the same fields. It rejects every count that
# cannot fit in the bytes left, nesting deeper than _MAX_DEPTH, and invalid UTF-8. Without it:
# an 8-byte update commits 512 MB (client-count HashMap), a 30-byte one 256 MB (a nested Any
# map) and a 200 KB one of nested Any arrays overflows the stack (SIGSEGV).

_MAX_DEPTH = 128  # serde_json's default, which yrs already applies to embeds and formats


class _Bad(Exception):
    """Internal: a Yjs blob failed the walk (turned into DecodeError at the API edge)."""


def _yvar(data: bytes, pos: int) -> tuple[int, int]:
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    value = b & 0x7F
    shift = 7
    while True:
        pos += 1
        b = data[pos]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if value >= _U64:
                raise _Bad("varuint exceeds 64 bits")
            return value, pos + 1
        shift += 7
        if shift >= 70:
            raise _Bad("varuint longer than 10 bytes")


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


def _ystruct(data: bytes, pos: int) -> int:
    info = data[pos]
    pos += 1
    if info in (0, 10):  # GC, Skip
        return _yvar(data, pos)[1]
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
            pos = _yid(data, pos)
        else:
            raise _Bad("invalid parent info")
        if info & 0x20:
            pos = _yskip(data, pos, True)
    if ref == 1:  # Deleted
        return _yvar(data, pos)[1]
    if ref == 2:  # JSON: yrs reads count + 1 strings
        n, pos = _ycount(data, pos, 1)
        for _ in range(n + 1):
            pos = _yskip(data, pos, True)
        return pos
    if ref in (3, 4, 5):  # Binary, String, Embed
        return _yskip(data, pos, ref != 3)
    if ref == 6:  # Format
        return _yskip(data, _yskip(data, pos, True), True)
    if ref == 7:  # Type
        type_ref = data[pos]
        pos += 1
        if type_ref == 3:  # XmlElement carries its tag name
            return _yskip(data, pos, True)
        if type_ref in (0, 1, 2, 4, 5, 6, 9, 15):
            return pos
        raise _Bad(f"unknown type ref {type_ref}")
    if ref == 8:  # Any
        n, pos = _ycount(data, pos, 1)
        return _yany(data, pos, n)
    return _yany(data, _yskip(data, pos, True), 1)  # Doc: guid, options


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
    for _ in range(clients):
        structs, pos = _yvar(data, pos)
        pos = _yid(data, pos)
        if structs * 2 > len(data) - pos:  # a struct is at least 2 bytes
            raise _Bad("struct count exceeds the bytes left")
        for _ in range(structs):
            pos = _ystruct(data, pos)
    if _ydelete_set(data, pos, None) != len(data):
        raise _Bad("trailing bytes")


def _guarded(what: str, data: bytes, fn: Callable[[bytes], object]) -> None:
    """Run a walker, mapping every failure to DecodeError(BAD_UPDATE)."""
    try:
        fn(data)
    except _Bad as exc:
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
    out = bytearray()
    clocks = sorted((c, k) for c, k in read_state_vector(state_vector).items() if k)
    _put_varuint(out, len(clocks))
    for client, clock in clocks:
        _put_varuint(out, client)
        _put_varuint(out, clock)
    deletes = read_delete_set(delete_set_update)
    _put_varuint(out, len(deletes))
    for client, ranges in deletes.items():
        _put_varuint(out, client)
        _put_varuint(out, len(ranges))
        for clock, length in ranges:
            _put_varuint(out, clock)
            _put_varuint(out, length)
    return hashlib.sha256(_DIGEST_LABEL + bytes(out)).digest()[:DIGEST_SIZE]


def is_empty_update(update: bytes) -> bool:
    """Whether an update carries nothing: no structs and no deletions."""
    return bytes(update) == b"\x00\x00"
