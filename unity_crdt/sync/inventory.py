"""Sans-IO inventory messages: how two peers find the docs on which they differ.

Each side keeps an order-free fingerprint of its inventory (every doc id and digest); SUMMARY
compares the whole, BUCKETS the 256 buckets, INVENTORY pages one bucket, ADVERT announces one
changed doc and CHECK one doc's content digest (docs/protocol.md, "Exchange"). This module
holds those messages and their bodies; `codec` gives them their tags and frames them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, DecodeError
from .lib0 import put_varuint
from .wire import Reader, put_doc, put_entries, read_entries
from .yjs import DIGEST_SIZE

FINGERPRINT_SIZE = 16
BUCKETS = 256  # inventory buckets: a doc's bucket is the first byte of blake2b(doc id)


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


# --------------------------------------------------------------------------- bodies


def put_summary(out: bytearray, msg: Summary) -> None:
    """Write the body of a SUMMARY message."""
    if len(msg.fingerprint) != FINGERPRINT_SIZE:
        raise ConfigError(f"fingerprint must be {FINGERPRINT_SIZE} bytes")
    out += msg.fingerprint
    put_varuint(out, msg.count)


def read_summary(r: Reader) -> Summary:
    """Read the body of a SUMMARY message."""
    return Summary(r.take(FINGERPRINT_SIZE), r.varuint())


def _put_bucket(out: bytearray, bucket: int) -> None:
    if not 0 <= bucket < BUCKETS:
        raise ConfigError(f"bucket must be 0-{BUCKETS - 1}, got {bucket}")
    out.append(bucket)


def _bucket(r: Reader) -> int:
    return r.byte()  # every byte value names a bucket


def put_inventory_request(out: bytearray, msg: InventoryRequest) -> None:
    """Write the body of a INVENTORY_REQUEST message."""
    if msg.bucket is None:
        if msg.after:
            raise ConfigError("a bucket-fingerprint request has no `after`")
        out.append(0)
        return
    out.append(1)
    _put_bucket(out, msg.bucket)
    if msg.after:
        put_doc(out, msg.after)
    else:
        out.append(0)


def read_inventory_request(r: Reader) -> InventoryRequest:
    """Read the body of a INVENTORY_REQUEST message."""
    if not r.flag("bucket"):
        return InventoryRequest(None)
    bucket = _bucket(r)
    return InventoryRequest(bucket, r.doc_id(allow_empty=True))


def put_buckets(out: bytearray, msg: Buckets) -> None:
    """Write the body of a BUCKETS message."""
    if len(msg.fingerprints) != BUCKETS or any(
        len(f) != FINGERPRINT_SIZE for f in msg.fingerprints
    ):
        raise ConfigError(f"buckets carry {BUCKETS} fingerprints of {FINGERPRINT_SIZE} bytes")
    for fingerprint in msg.fingerprints:
        out += fingerprint


def read_buckets(r: Reader) -> Buckets:
    """Read the body of a BUCKETS message."""
    raw = r.take(BUCKETS * FINGERPRINT_SIZE)
    step = FINGERPRINT_SIZE
    return Buckets(tuple(raw[i : i + step] for i in range(0, len(raw), step)))


def put_inventory(out: bytearray, msg: Inventory) -> None:
    """Write the body of a INVENTORY message."""
    _put_bucket(out, msg.bucket)
    put_entries(out, msg.entries, len(msg.entries))
    out.append(1 if msg.more else 0)


def read_inventory(r: Reader) -> Inventory:
    """Read the body of a INVENTORY message."""
    bucket = _bucket(r)
    entries = read_entries(r)
    names = list(entries)
    if names != sorted(names):
        raise DecodeError("inventory page is not sorted by doc id")
    return Inventory(bucket, tuple(entries.items()), r.flag("more"))


def put_advert(out: bytearray, msg: Advert) -> None:
    """Write the body of a ADVERT message."""
    put_entries(out, [(msg.doc, msg.digest)], 1)


def read_advert(r: Reader) -> Advert:
    """Read the body of a ADVERT message."""
    entries = read_entries(r)
    if len(entries) != 1:
        raise DecodeError("an advert names exactly one doc")
    ((doc, digest),) = entries.items()
    return Advert(doc, digest)


def put_check(out: bytearray, msg: Check) -> None:
    """Write the body of a CHECK message."""
    if len(msg.content) != DIGEST_SIZE:
        raise ConfigError(f"content digest must be {DIGEST_SIZE} bytes")
    put_entries(out, [(msg.doc, msg.digest)], 1)
    out += msg.content


def read_check(r: Reader) -> Check:
    """Read the body of a CHECK message."""
    entries = read_entries(r)
    if len(entries) != 1:
        raise DecodeError("a check names exactly one doc")
    ((doc, digest),) = entries.items()
    return Check(doc, digest, r.take(DIGEST_SIZE))
