"""Sans-IO checkpoint records: manifests, the sink contract, header/AAD encoding, ids, tenants.

What a `Checkpointer` writes and a `CheckpointSink` stores, and the byte encodings both sides
must agree on. Stdlib only: no I/O, no clock, no keys (callers seal and open the bytes).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import CheckpointError, SecurityError

__all__ = [
    "PUT_BUDGET",
    "CheckpointSink",
    "DocHit",
    "Header",
    "Manifest",
    "SearchHit",
    "SinkRecord",
    "check_tenant",
    "chunk_id",
    "decode_header",
    "encode_header",
    "record_aad",
    "snippet_of",
]

# Upper bound of sealed bytes handed to one `put` or fetched by one `chunks` call; keeps each
# store request well under Weaviate's ~100 MiB gRPC cap even after base64.
PUT_BUDGET = 48 * 1024 * 1024
_AAD = b"unity-crdt/v1/checkpoint"
_CHUNK_NS = uuid.UUID("5b0f4bb4-6c55-4c36-9d0e-3f3c6a1b2d90")
_TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Manifest:
    """The clear, indexable part of one stored checkpoint object."""

    object_id: str  # uuid text, from keys.object_key(doc, device)
    doc_key: str  # hex keyed hash of the doc name (restore filters on it)
    device: str  # hex keyed tag of the writing device
    generation: str  # random hex naming this write's chunks
    parts: int
    nbytes: int  # total sealed chunk bytes (lets sinks batch fetches)
    header: bytes  # sealed JSON: doc name, device id, size, sha256, write counter, chunk size


@dataclass(frozen=True)
class SinkRecord:
    """What a sink stores for one object: the manifest, its sealed chunks, optional text."""

    manifest: Manifest
    chunks: tuple[bytes, ...]
    text: str | None = None


@dataclass(frozen=True)
class SearchHit:
    """One keyword-search result as the store returns it (keys, not names)."""

    doc_key: str
    device: str
    score: float
    snippet: str


@dataclass(frozen=True)
class DocHit:
    """One keyword-search result mapped back to a doc name."""

    doc: str
    score: float
    snippet: str


def chunk_id(object_id: str, generation: str, index: int) -> str:
    """The deterministic id of chunk `index` of one write (not secret: derived from ids)."""
    return str(uuid.uuid5(_CHUNK_NS, f"{object_id}/{generation}/{index}"))


def snippet_of(text: str, query: str, width: int = 160) -> str:
    """A short excerpt of `text` around the first word of `query` it contains."""
    low = text.lower()
    pos = min((p for w in query.lower().split() if (p := low.find(w)) >= 0), default=0)
    start = max(0, pos - width // 4)
    return text[start : start + width]


class CheckpointSink(Protocol):
    """Storage adapter contract. Every method raises only CheckpointError on failure."""

    async def put(self, tenant: str, records: Sequence[SinkRecord]) -> None:
        """Store records: all chunks first, then the manifests, then drop stale chunks."""
        ...

    async def manifests(self, tenant: str, doc_keys: Sequence[str] | None = None) -> list[Manifest]:
        """Every manifest of the tenant, or only those of the given doc keys."""
        ...

    async def chunks(self, tenant: str, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        """object_id -> its chunks in index order (missing chunks are simply absent)."""
        ...

    async def search(self, tenant: str, query: str, limit: int) -> list[SearchHit]:
        """Keyword search over the plain-text projections of searchable docs."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def check_tenant(tenant: str) -> str:
    """Return `tenant` if it is a safe store name (also a safe directory name)."""
    if not _TENANT.match(tenant):
        raise CheckpointError("tenant must be 1-64 characters of [A-Za-z0-9_-]")
    return tenant


def record_aad(
    tenant: str, kind: bytes, doc_key: str, device: str, gen: str, index: int, n: int
) -> bytes:
    """The AEAD associated data binding a sealed part (b"H" header, b"C" chunk) to its place."""
    fields = (tenant, doc_key, device, gen, str(index), str(n))
    return b"\x00".join([_AAD, kind, *(f.encode() for f in fields)])


@dataclass(frozen=True)
class Header:
    """The sealed part of a manifest, opened: what the object holds and which write it is."""

    doc: str
    device: str  # the writing device's id
    size: int  # state bytes
    sha256: str
    seq: int = 0  # the device's write counter for this object; 0 in v1 headers
    chunk: int | None = None  # the chunk size the state was cut with (None in v1 headers)

    def expected_parts(self) -> int | None:
        """How many chunks this header implies, or None when it cannot say (v1)."""
        if self.chunk is None:
            return None
        return max(1, -(-self.size // self.chunk))


def encode_header(
    doc: str, device_id: str, state: bytes, *, seq: int = 0, chunk: int | None = None
) -> bytes:
    """The JSON header sealed into a manifest (v2): doc, device, size, SHA-256, seq, chunk."""
    digest = hashlib.sha256(state).hexdigest()
    fields = {"v": 2, "doc": doc, "device": device_id, "size": len(state), "sha256": digest}
    fields.update(seq=seq, chunk=chunk)
    return json.dumps(fields).encode()


def decode_header(raw: bytes) -> Header:
    """Parse an opened header (v1 or v2); SecurityError if malformed."""
    try:
        h = json.loads(raw)
        version = int(h.get("v", 1))
        header = Header(
            str(h["doc"]),
            str(h["device"]),
            int(h["size"]),
            str(h["sha256"]),
            int(h["seq"]) if version >= 2 else 0,
            int(h["chunk"]) if version >= 2 and h.get("chunk") is not None else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SecurityError("header is not valid checkpoint JSON") from None
    if header.size < 0 or header.seq < 0 or (header.chunk is not None and header.chunk < 1):
        raise SecurityError("header holds a negative size, counter or chunk size")
    return header
