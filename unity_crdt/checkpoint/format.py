"""Sans-IO checkpoint records: manifests, passages, the sink contract, header/AAD encoding, ids.

What a `Checkpointer` writes and a `CheckpointSink` stores, and the byte encodings both sides
must agree on. Stdlib only: no I/O, no clock, no keys (callers seal and open the bytes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from ..errors import CheckpointError, SecurityError

__all__ = [
    "PUT_BUDGET",
    "CheckpointSink",
    "DocHit",
    "Header",
    "Manifest",
    "Passage",
    "SearchHit",
    "SearchMode",
    "SearchQuery",
    "SinkRecord",
    "check_tenant",
    "chunk_id",
    "decode_header",
    "encode_header",
    "passage_hash",
    "passage_id",
    "record_aad",
    "snippet_of",
    "split_passages",
]

# Upper bound of sealed bytes handed to one `put` or fetched by one `chunks` call; keeps each
# store request well under Weaviate's ~100 MiB gRPC cap even after base64.
PUT_BUDGET = 48 * 1024 * 1024
_AAD = b"unity-crdt/v1/checkpoint"
_CHUNK_NS = uuid.UUID("5b0f4bb4-6c55-4c36-9d0e-3f3c6a1b2d90")
_PASSAGE_NS = uuid.UUID("0d6c1f7e-3b9a-4f1e-a0c2-7c5e9b8d4a61")
_TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")

SearchMode = Literal["keyword", "vector", "hybrid"]


@dataclass(frozen=True)
class Manifest:
    """The clear, indexable part of one stored checkpoint object (immutable once written)."""

    object_id: str  # uuid text, from keys.object_key(doc, device, generation)
    doc_key: str  # hex keyed hash of the doc name (restore filters on it)
    device: str  # hex keyed tag of the writing device
    generation: str  # random hex naming this write
    parts: int
    nbytes: int  # total sealed chunk bytes (lets sinks batch fetches)
    header: bytes  # sealed JSON: doc, device, size, SHA-256, sv + ds, write counter, chunk


@dataclass(frozen=True)
class SinkRecord:
    """What a sink stores for one object: the manifest and its sealed chunks."""

    manifest: Manifest
    chunks: tuple[bytes, ...]


@dataclass(frozen=True)
class Header:
    """An opened manifest header. `sv`/`ds` (Yjs state vector, delete-set update) say exactly
    which items and deletions the state holds; None in headers written before compaction."""

    doc: str
    device: str
    size: int
    sha256: str
    sv: bytes | None = None
    ds: bytes | None = None
    seq: int = 0  # the device's write counter for this doc (F10); 0 in v1 headers
    chunk: int | None = None  # the chunk size the state was cut with; None in v1 headers

    def expected_parts(self) -> int | None:
        """How many chunks this header implies, or None when it cannot say (v1)."""
        if self.chunk is None:
            return None
        return max(1, -(-self.size // self.chunk))


@dataclass(frozen=True)
class Passage:
    """One paragraph of a searchable doc, stored in clear with its vector (if any)."""

    doc_key: str
    pid: str  # passage_hash(text): the same text has the same id in a doc
    text: str
    vector: tuple[float, ...] | None = None


@dataclass(frozen=True)
class SearchQuery:
    """What a sink searches for: words, a query vector, how to mix them, how many hits."""

    text: str
    mode: SearchMode = "keyword"
    vector: tuple[float, ...] | None = None
    alpha: float = 0.5  # hybrid: 0 = keyword only, 1 = vector only
    limit: int = 10


@dataclass(frozen=True)
class SearchHit:
    """One passage as the store returns it (keys, not names); higher scores are better."""

    doc_key: str
    text: str
    score: float


@dataclass(frozen=True)
class DocHit:
    """One search result: the doc, its best passage, the score, a short excerpt."""

    doc: str
    passage: str
    score: float
    snippet: str


def chunk_id(object_id: str, generation: str, index: int) -> str:
    """The deterministic id of chunk `index` of one write (not secret: derived from ids)."""
    return str(uuid.uuid5(_CHUNK_NS, f"{object_id}/{generation}/{index}"))


def passage_hash(text: str) -> str:
    """The content hash naming a passage (and its cached vector)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def passage_id(doc_key: str, pid: str) -> str:
    """The store id of one passage of one doc."""
    return str(uuid.uuid5(_PASSAGE_NS, f"{doc_key}/{pid}"))


def split_passages(text: str) -> list[str]:
    """The blank-line separated paragraphs of `text`, stripped, empty and repeated ones dropped."""
    seen: dict[str, None] = {}
    for part in _PARAGRAPH_BREAK.split(text):
        part = part.strip()
        if part:
            seen.setdefault(part, None)
    return list(seen)


def snippet_of(text: str, query: str, width: int = 160) -> str:
    """A short excerpt of `text` around the first word of `query` it contains."""
    low = text.lower()
    pos = min((p for w in query.lower().split() if (p := low.find(w)) >= 0), default=0)
    start = max(0, pos - width // 4)
    return text[start : start + width]


class CheckpointSink(Protocol):
    """Storage adapter contract. Every method raises only CheckpointError on failure.

    Objects are immutable: a write never replaces an object, and `delete` removes whole
    objects (manifest first, then its chunks). Passages are a separate, mutable index.
    """

    async def put(self, tenant: str, records: Sequence[SinkRecord]) -> None:
        """Store new objects durably: all chunks first, then the manifests."""
        ...

    async def manifests(self, tenant: str, doc_keys: Sequence[str] | None = None) -> list[Manifest]:
        """Every manifest of the tenant, or only those of the given doc keys."""
        ...

    async def chunks(self, tenant: str, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        """object_id -> its chunks in index order (missing chunks are simply absent)."""
        ...

    async def confirm(self, tenant: str, manifests: Sequence[Manifest]) -> set[str]:
        """The object ids among `manifests` that are durably stored (re-read, not cached)."""
        ...

    async def delete(self, tenant: str, manifests: Sequence[Manifest]) -> None:
        """Remove these objects (manifest first, then chunks); absent ones are no error."""
        ...

    async def passage_ids(self, tenant: str, doc_keys: Sequence[str]) -> dict[str, set[str]]:
        """doc_key -> the pids of its stored passages (docs without passages are absent)."""
        ...

    async def put_passages(
        self, tenant: str, add: Sequence[Passage], remove: Mapping[str, Sequence[str]]
    ) -> None:
        """Store `add` (upsert by doc key + pid), then drop `remove` (doc_key -> pids)."""
        ...

    async def search(self, tenant: str, query: SearchQuery) -> list[SearchHit]:
        """The best passages for `query`, best first, at most `query.limit`."""
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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_header(
    doc: str,
    device_id: str,
    state: bytes,
    sv: bytes | None = None,
    ds: bytes | None = None,
    *,
    seq: int = 0,
    chunk: int | None = None,
) -> bytes:
    """The JSON header sealed into a manifest (v2): doc name, device id, size, SHA-256, the
    state vector and delete set saying which items the state holds, the device's write
    counter for the doc, and the chunk size the state was cut with."""
    head: dict[str, object] = {
        "v": 2,
        "doc": doc,
        "device": device_id,
        "size": len(state),
        "sha256": hashlib.sha256(state).hexdigest(),
        "seq": seq,
        "chunk": chunk,
    }
    if sv is not None and ds is not None:
        head["sv"], head["ds"] = _b64(sv), _b64(ds)
    return json.dumps(head).encode()


def decode_header(raw: bytes) -> Header:
    """Parse an opened header (v1 or v2); SecurityError if malformed."""
    try:
        h = json.loads(raw)
        head = Header(
            str(h["doc"]),
            str(h["device"]),
            int(h["size"]),
            str(h["sha256"]),
            base64.b64decode(h["sv"], validate=True) if "sv" in h else None,
            base64.b64decode(h["ds"], validate=True) if "ds" in h else None,
            int(h.get("seq", 0)),
            int(h["chunk"]) if h.get("chunk") is not None else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SecurityError("header is not valid checkpoint JSON") from None
    if head.size < 0 or head.seq < 0 or (head.chunk is not None and head.chunk < 1):
        raise SecurityError("header holds a negative size, counter or chunk size")
    return head
