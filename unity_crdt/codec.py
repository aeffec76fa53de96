"""Sans-IO wire codec: message types and strict encode/decode.

The byte grammar is in docs/protocol.md. Every decoder here checks a length or count against
the bytes that remain before it allocates anything, so hostile input costs memory in proportion
to its own size only. Stdlib only: no pycrdt, no I/O, no clock. The Yjs guard and doc digests
live in `unity_crdt.yjs` and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

from .errors import ConfigError, DecodeError, ErrorCode, LimitExceeded
from .ids import check_doc_id

# Re-exported (the `as` form marks them public) so `from unity_crdt.codec import ...` still works.
from .yjs import DIGEST_SIZE as DIGEST_SIZE
from .yjs import check_state_vector as check_state_vector
from .yjs import check_update as check_update
from .yjs import doc_digest as doc_digest
from .yjs import is_empty_update as is_empty_update
from .yjs import put_varuint as _put_varuint
from .yjs import read_delete_set as read_delete_set
from .yjs import read_state_vector as read_state_vector

PROTOCOL_VERSION = 1
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
