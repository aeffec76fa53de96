"""Sans-IO wire codec: message types and strict, table-driven encode/decode.

The byte grammar is in docs/protocol.md. Each message type has one row in `_CODECS` (its tag,
its encoder, its decoder); adding a message type means adding a dataclass and a row. Every
decoder checks a length or count against the bytes that remain before it allocates anything,
so hostile input costs memory in proportion to its own size only. No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeAlias

from ..errors import ConfigError, DecodeError, LimitExceeded
from ..ids import check_doc_id
from .lib0 import put_varbytes, put_varuint, read_varuint
from .yjs import DIGEST_SIZE, check_state_vector

PROTOCOL_VERSION = 2
# Smallest encoded inventory entry: doc-id length byte, one doc-id byte, the digest.
_MIN_INVENTORY_ENTRY = 2 + DIGEST_SIZE
FINGERPRINT_SIZE = 16
BUCKETS = 256  # inventory buckets: a doc's bucket is the first byte of blake2b(doc id)


@dataclass(frozen=True)
class Limits:
    """Decoder limits: sizes in bytes, counts in entries."""

    max_message: int = 64 * 2**20
    max_doc_id: int = 255
    max_inventory: int = 100_000
    max_batch: int = 10_000


DEFAULT_LIMITS = Limits()


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
class Summary:
    """The sender's whole inventory in 16 bytes: an order-free fingerprint, and its size."""

    fingerprint: bytes
    count: int


@dataclass(frozen=True, slots=True)
class InventoryRequest:
    """Ask for the receiver's bucket fingerprints (`bucket` None), or for the next page of one
    bucket of its inventory: docs named after `after`."""

    bucket: int | None
    after: str = ""


@dataclass(frozen=True, slots=True)
class Buckets:
    """The fingerprint of each of the sender's BUCKETS inventory buckets, in bucket order."""

    fingerprints: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Inventory:
    """One page of one bucket of the sender's inventory, sorted by doc id; `more` if pages
    of that bucket follow."""

    bucket: int
    entries: tuple[tuple[str, bytes], ...]
    more: bool


@dataclass(frozen=True, slots=True)
class Advert:
    """The sender's digest of one doc it changed, for the receiver to pull if it differs."""

    doc: str
    digest: bytes


@dataclass(frozen=True, slots=True)
class Check:
    """The sender holds `doc` at `digest` (ids and deletions) with this `content` digest."""

    doc: str
    digest: bytes
    content: bytes


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


# --------------------------------------------------------------------------- per type


def _put_doc(out: bytearray, doc: str) -> None:
    put_varbytes(out, check_doc_id(doc).encode("utf-8"))


def _put_entries(out: bytearray, entries: Iterable[tuple[str, bytes]], n: int) -> None:
    put_varuint(out, n)
    for doc, digest in entries:
        if len(digest) != DIGEST_SIZE:
            raise ConfigError(f"digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
        _put_doc(out, doc)
        out += digest


def _read_entries(r: _Reader) -> dict[str, bytes]:
    n = r.count(r.limits.max_inventory, _MIN_INVENTORY_ENTRY, "inventory")
    entries: dict[str, bytes] = {}
    for _ in range(n):
        doc = r.doc_id()
        if doc in entries:
            raise DecodeError("duplicate doc id in inventory")
        entries[doc] = r.take(DIGEST_SIZE)
    return entries


def _enc_hello(out: bytearray, msg: Hello) -> None:
    put_varuint(out, msg.version)
    _put_entries(out, msg.inventory.items(), len(msg.inventory))


def _dec_hello(r: _Reader) -> Hello:
    version = r.varuint()
    return Hello(version, _read_entries(r))


def _enc_summary(out: bytearray, msg: Summary) -> None:
    if len(msg.fingerprint) != FINGERPRINT_SIZE:
        raise ConfigError(f"fingerprint must be {FINGERPRINT_SIZE} bytes")
    out += msg.fingerprint
    put_varuint(out, msg.count)


def _dec_summary(r: _Reader) -> Summary:
    return Summary(r.take(FINGERPRINT_SIZE), r.varuint())


def _put_bucket(out: bytearray, bucket: int) -> None:
    if not 0 <= bucket < BUCKETS:
        raise ConfigError(f"bucket must be 0-{BUCKETS - 1}, got {bucket}")
    out.append(bucket)


def _bucket(r: _Reader) -> int:
    return r.byte()  # every byte value names a bucket


def _enc_inventory_request(out: bytearray, msg: InventoryRequest) -> None:
    if msg.bucket is None:
        if msg.after:
            raise ConfigError("a bucket-fingerprint request has no `after`")
        out.append(0)
        return
    out.append(1)
    _put_bucket(out, msg.bucket)
    if msg.after:
        _put_doc(out, msg.after)
    else:
        out.append(0)


def _dec_inventory_request(r: _Reader) -> InventoryRequest:
    if not r.flag("bucket"):
        return InventoryRequest(None)
    bucket = _bucket(r)
    return InventoryRequest(bucket, r.doc_id(allow_empty=True))


def _enc_buckets(out: bytearray, msg: Buckets) -> None:
    if len(msg.fingerprints) != BUCKETS or any(
        len(f) != FINGERPRINT_SIZE for f in msg.fingerprints
    ):
        raise ConfigError(f"buckets carry {BUCKETS} fingerprints of {FINGERPRINT_SIZE} bytes")
    for fingerprint in msg.fingerprints:
        out += fingerprint


def _dec_buckets(r: _Reader) -> Buckets:
    raw = r.take(BUCKETS * FINGERPRINT_SIZE)
    step = FINGERPRINT_SIZE
    return Buckets(tuple(raw[i : i + step] for i in range(0, len(raw), step)))


def _enc_inventory(out: bytearray, msg: Inventory) -> None:
    _put_bucket(out, msg.bucket)
    _put_entries(out, msg.entries, len(msg.entries))
    out.append(1 if msg.more else 0)


def _dec_inventory(r: _Reader) -> Inventory:
    bucket = _bucket(r)
    entries = _read_entries(r)
    names = list(entries)
    if names != sorted(names):
        raise DecodeError("inventory page is not sorted by doc id")
    return Inventory(bucket, tuple(entries.items()), r.flag("more"))


def _enc_advert(out: bytearray, msg: Advert) -> None:
    _put_entries(out, [(msg.doc, msg.digest)], 1)


def _dec_advert(r: _Reader) -> Advert:
    entries = _read_entries(r)
    if len(entries) != 1:
        raise DecodeError("an advert names exactly one doc")
    ((doc, digest),) = entries.items()
    return Advert(doc, digest)


def _enc_check(out: bytearray, msg: Check) -> None:
    if len(msg.content) != DIGEST_SIZE:
        raise ConfigError(f"content digest must be {DIGEST_SIZE} bytes")
    _put_entries(out, [(msg.doc, msg.digest)], 1)
    out += msg.content


def _dec_check(r: _Reader) -> Check:
    entries = _read_entries(r)
    if len(entries) != 1:
        raise DecodeError("a check names exactly one doc")
    ((doc, digest),) = entries.items()
    return Check(doc, digest, r.take(DIGEST_SIZE))


def _enc_part(out: bytearray, msg: Part) -> None:
    _put_doc(out, msg.doc)
    out.append(1 if msg.final else 0)
    put_varbytes(out, msg.data)


def _dec_part(r: _Reader) -> Part:
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
    _put_doc(out, msg.doc)
    out += _DOC_KINDS[type(msg)]
    if isinstance(msg, SyncStep1):
        put_varbytes(out, msg.state_vector)
    elif isinstance(msg, Awareness):
        put_varbytes(out, msg.payload)
    else:
        put_varbytes(out, msg.update)


def _dec_doc(r: _Reader) -> Message:
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


def _dec_batch(r: _Reader) -> Batch:
    # Each inner message is at least a length byte and a tag byte.
    n = r.count(r.limits.max_batch, 2, "batch")
    messages = []
    for _ in range(n):
        inner = _Reader(r.varbytes(), r.limits)
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
    _put_doc(out, msg.doc)
    put_varbytes(out, msg.device.encode())
    put_varbytes(out, msg.generation.encode())
    put_varbytes(out, msg.state_vector)
    out += msg.digest


def _dec_notice(r: _Reader) -> Notice:
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


def _dec_members(r: _Reader) -> Members:
    want_all = r.flag("want_all")
    n = r.count(MAX_MEMBER_OPS, _MIN_OP, "roster op")
    return Members(tuple(r.varbytes() for _ in range(n)), want_all)


_Encoder = Callable[[bytearray, Any], None]
_Decoder = Callable[[_Reader], Message]
_ENCODERS: dict[type[Any], tuple[MsgType, _Encoder]] = {
    Hello: (MsgType.HELLO, _enc_hello),
    Summary: (MsgType.SUMMARY, _enc_summary),
    InventoryRequest: (MsgType.INVENTORY_REQUEST, _enc_inventory_request),
    Buckets: (MsgType.BUCKETS, _enc_buckets),
    Inventory: (MsgType.INVENTORY, _enc_inventory),
    Advert: (MsgType.ADVERT, _enc_advert),
    Part: (MsgType.PART, _enc_part),
    Check: (MsgType.CHECK, _enc_check),
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
    MsgType.SUMMARY: _dec_summary,
    MsgType.INVENTORY_REQUEST: _dec_inventory_request,
    MsgType.BUCKETS: _dec_buckets,
    MsgType.INVENTORY: _dec_inventory,
    MsgType.ADVERT: _dec_advert,
    MsgType.PART: _dec_part,
    MsgType.CHECK: _dec_check,
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


def _decode_one(r: _Reader) -> Message:
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
    r = _Reader(data, limits)
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
