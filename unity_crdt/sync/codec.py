"""Sans-IO wire codec: message types and strict, table-driven encode/decode.

The byte grammar is in docs/protocol.md. Each message type has one row in `_ENCODERS` and one
in `_DECODERS` (its tag, its encoder, its decoder); adding a message type means adding a
dataclass and its rows. The inventory messages of anti-entropy live in `inventory`, the
limits, the strict reader and the shared fields in `wire`. Every decoder checks a length or
count against the bytes that remain before it allocates anything, so hostile input costs
memory in proportion to its own size only. No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeAlias

from ..errors import ConfigError, DecodeError, LimitExceeded
from . import inventory
from .inventory import Advert, Buckets, Check, Inventory, InventoryRequest, Summary
from .lib0 import put_varbytes, put_varuint
from .wire import DEFAULT_LIMITS, Limits, Reader, put_doc, put_entries, read_entries
from .yjs import DIGEST_SIZE, check_state_vector

PROTOCOL_VERSION = 2


class MsgType(IntEnum):
    """First byte of every message (5 and 6, once BYE and ERROR, are retired)."""

    HELLO = 1
    DOC = 2
    PING = 3
    PONG = 4
    BATCH = 7
    SUMMARY = 8
    INVENTORY_REQUEST = 9
    INVENTORY = 10
    ADVERT = 11
    PART = 12
    BUCKETS = 13
    NOTICE = 14
    MEMBERS = 15  # 16-19 left free for membership
    CHECK = 20


@dataclass(frozen=True, slots=True)
class Hello:
    """Opening message: the protocol version (its layout is frozen for every version).

    Version 1 carried the whole inventory here; version 2 sends none (`inventory` is empty)
    and pages it with INVENTORY messages instead, so a v1 peer reads a v2 HELLO and reports
    the version mismatch by name.
    """

    version: int
    inventory: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class Part:
    """A piece of a SyncStep2 payload too big for one message; `final` ends the payload."""

    doc: str
    data: bytes
    final: bool


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
class Notice:
    """A commit notice: `device` checkpointed `doc` (write `generation`) at this state."""

    doc: str
    device: str
    generation: str
    state_vector: bytes
    digest: bytes


@dataclass(frozen=True, slots=True)
class Members:
    """Signed roster ops (opaque here: `members.ops` reads them); `want_all` asks the
    receiver for every op it holds (the sender lacks some op's deps)."""

    ops: tuple[bytes, ...]
    want_all: bool = False


@dataclass(frozen=True, slots=True)
class Batch:
    """Several messages in one; never nested."""

    messages: tuple[Message, ...]


Message: TypeAlias = (
    Hello
    | Summary
    | InventoryRequest
    | Buckets
    | Inventory
    | Advert
    | Part
    | SyncStep1
    | SyncStep2
    | Update
    | Awareness
    | Ping
    | Pong
    | Batch
    | Notice
    | Members
    | Check
)


# --------------------------------------------------------------------------- per type


def _enc_hello(out: bytearray, msg: Hello) -> None:
    put_varuint(out, msg.version)
    put_entries(out, msg.inventory.items(), len(msg.inventory))


def _dec_hello(r: Reader) -> Hello:
    version = r.varuint()
    return Hello(version, read_entries(r))


def _enc_part(out: bytearray, msg: Part) -> None:
    put_doc(out, msg.doc)
    out.append(1 if msg.final else 0)
    put_varbytes(out, msg.data)


def _dec_part(r: Reader) -> Part:
    doc = r.doc_id()
    final = r.flag("final")
    return Part(doc, r.varbytes(), final)


# After its doc id, a DOC message is exactly a y-websocket message: (kind, sync step) bytes.
_DOC_KINDS: dict[type[Any], bytes] = {
    SyncStep1: b"\x00\x00",
    SyncStep2: b"\x00\x01",
    Update: b"\x00\x02",
    Awareness: b"\x01",
}


def _enc_doc(out: bytearray, msg: SyncStep1 | SyncStep2 | Update | Awareness) -> None:
    put_doc(out, msg.doc)
    out += _DOC_KINDS[type(msg)]
    if isinstance(msg, SyncStep1):
        put_varbytes(out, msg.state_vector)
    elif isinstance(msg, Awareness):
        put_varbytes(out, msg.payload)
    else:
        put_varbytes(out, msg.update)


def _dec_doc(r: Reader) -> Message:
    doc = r.doc_id()
    kind = r.byte()
    if kind == 0x01:
        return Awareness(doc, r.varbytes())
    if kind != 0x00:
        raise DecodeError(f"unknown y-protocols message type {kind}")
    step = r.byte()
    payload = r.varbytes()
    # The Yjs payloads are guarded where they meet pycrdt (the session checks a state vector
    # as it arrives, the replica every update it applies), once, not here as well.
    if step == 0x00:
        return SyncStep1(doc, payload)
    if step in (0x01, 0x02):
        return SyncStep2(doc, payload) if step == 0x01 else Update(doc, payload)
    raise DecodeError(f"unknown sync message type {step}")


def _enc_nonce(out: bytearray, msg: Ping | Pong) -> None:
    put_varuint(out, msg.nonce)


def _enc_batch(out: bytearray, msg: Batch) -> None:
    put_varuint(out, len(msg.messages))
    for inner in msg.messages:
        if isinstance(inner, Batch):
            raise ConfigError("a Batch cannot contain another Batch")
        put_varbytes(out, encode(inner))


def _dec_batch(r: Reader) -> Batch:
    # Each inner message is at least a length byte and a tag byte.
    n = r.count(r.limits.max_batch, 2, "batch")
    messages = []
    for _ in range(n):
        inner = Reader(r.varbytes(), r.limits)
        if inner.data[:1] == bytes((MsgType.BATCH,)):
            raise DecodeError("nested batch")
        messages.append(_decode_one(inner))
        inner.end()
    return Batch(tuple(messages))


_MAX_NOTICE_FIELD = 64  # device ids are 26 characters, generations 16 hex digits


def _enc_notice(out: bytearray, msg: Notice) -> None:
    if len(msg.digest) != DIGEST_SIZE:
        raise ConfigError(f"digest must be {DIGEST_SIZE} bytes, got {len(msg.digest)}")
    for field in (msg.device, msg.generation):
        if not 0 < len(field.encode()) <= _MAX_NOTICE_FIELD or not field.isascii():
            raise ConfigError("notice device and generation must be 1-64 ASCII characters")
    put_doc(out, msg.doc)
    put_varbytes(out, msg.device.encode())
    put_varbytes(out, msg.generation.encode())
    put_varbytes(out, msg.state_vector)
    out += msg.digest


def _dec_notice(r: Reader) -> Notice:
    doc = r.doc_id()
    fields = []
    for _ in range(2):
        raw = r.varbytes()
        if not 0 < len(raw) <= _MAX_NOTICE_FIELD or not raw.isascii():
            raise DecodeError("notice device or generation is malformed")
        fields.append(raw.decode("ascii"))
    state_vector = r.varbytes()
    check_state_vector(state_vector)
    return Notice(doc, fields[0], fields[1], state_vector, r.take(DIGEST_SIZE))


MAX_MEMBER_OPS = 4096
_MIN_OP = 130  # the smallest roster op: header, no deps, a REVOKE body, the signature


def _enc_members(out: bytearray, msg: Members) -> None:
    if len(msg.ops) > MAX_MEMBER_OPS:
        raise ConfigError(f"a MEMBERS message carries at most {MAX_MEMBER_OPS} ops")
    out.append(1 if msg.want_all else 0)
    put_varuint(out, len(msg.ops))
    for op in msg.ops:
        put_varbytes(out, op)


def _dec_members(r: Reader) -> Members:
    want_all = r.flag("want_all")
    n = r.count(MAX_MEMBER_OPS, _MIN_OP, "roster op")
    return Members(tuple(r.varbytes() for _ in range(n)), want_all)


_Encoder = Callable[[bytearray, Any], None]
_Decoder = Callable[[Reader], Message]
_ENCODERS: dict[type[Any], tuple[MsgType, _Encoder]] = {
    Hello: (MsgType.HELLO, _enc_hello),
    Summary: (MsgType.SUMMARY, inventory.put_summary),
    InventoryRequest: (MsgType.INVENTORY_REQUEST, inventory.put_inventory_request),
    Buckets: (MsgType.BUCKETS, inventory.put_buckets),
    Inventory: (MsgType.INVENTORY, inventory.put_inventory),
    Advert: (MsgType.ADVERT, inventory.put_advert),
    Part: (MsgType.PART, _enc_part),
    Check: (MsgType.CHECK, inventory.put_check),
    SyncStep1: (MsgType.DOC, _enc_doc),
    SyncStep2: (MsgType.DOC, _enc_doc),
    Update: (MsgType.DOC, _enc_doc),
    Awareness: (MsgType.DOC, _enc_doc),
    Ping: (MsgType.PING, _enc_nonce),
    Pong: (MsgType.PONG, _enc_nonce),
    Batch: (MsgType.BATCH, _enc_batch),
    Notice: (MsgType.NOTICE, _enc_notice),
    Members: (MsgType.MEMBERS, _enc_members),
}
_DECODERS: dict[int, _Decoder] = {
    MsgType.HELLO: _dec_hello,
    MsgType.SUMMARY: inventory.read_summary,
    MsgType.INVENTORY_REQUEST: inventory.read_inventory_request,
    MsgType.BUCKETS: inventory.read_buckets,
    MsgType.INVENTORY: inventory.read_inventory,
    MsgType.ADVERT: inventory.read_advert,
    MsgType.PART: _dec_part,
    MsgType.CHECK: inventory.read_check,
    MsgType.DOC: _dec_doc,
    MsgType.PING: lambda r: Ping(r.varuint()),
    MsgType.PONG: lambda r: Pong(r.varuint()),
    MsgType.BATCH: _dec_batch,
    MsgType.NOTICE: _dec_notice,
    MsgType.MEMBERS: _dec_members,
}


# --------------------------------------------------------------------------- entry points


def encode(msg: Message) -> bytes:
    """Serialize a message; raises ConfigError for values a peer could not decode."""
    row = _ENCODERS.get(type(msg))
    if row is None:
        raise ConfigError(f"not a message: {type(msg).__name__}")
    tag, enc = row
    out = bytearray((tag,))
    enc(out, msg)
    return bytes(out)


def encode_batch(encoded: list[bytes]) -> bytes:
    """A BATCH of already-encoded (non-batch) messages, so queues encode each message once."""
    out = bytearray((MsgType.BATCH,))
    put_varuint(out, len(encoded))
    for part in encoded:
        if part[:1] == bytes((MsgType.BATCH,)):
            raise ConfigError("a Batch cannot contain another Batch")
        put_varbytes(out, part)
    return bytes(out)


def _decode_one(r: Reader) -> Message:
    tag = r.byte()
    dec = _DECODERS.get(tag)
    if dec is None:
        raise DecodeError(f"unknown message tag {tag}")
    return dec(r)


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse one message strictly; raises only DecodeError or LimitExceeded."""
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > limits.max_message:
        raise LimitExceeded(f"message of {len(data)} bytes exceeds {limits.max_message}")
    r = Reader(data, limits)
    msg = _decode_one(r)
    r.end()
    return msg


def flatten(messages: list[Message]) -> list[Message]:
    """Expand BATCH messages into their parts (for drivers and tests)."""
    out: list[Message] = []
    for msg in messages:
        if isinstance(msg, Batch):
            out.extend(msg.messages)
        else:
            out.append(msg)
    return out
