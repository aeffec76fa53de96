"""The named pycrdt documents of one node, and the capture of every committed change.

A `Replica` owns `pycrdt.Doc`s by name. It subscribes to each doc's transaction events and
hands every committed, non-empty update to `on_update(name, update, origin)`, so the node can
persist it and gossip it. The rules here come from pycrdt 0.14's behaviour (ANCHORS.md):

* Inside an observer the doc is mutably borrowed: nothing may read or edit it, not even the
  transaction's origin through the public API. The observer only copies `event.update` into
  `bytes` and looks up the origin; `on_update` must therefore only queue.
* An exception escaping an observer surfaces from the editing call after the change was
  committed, so the observer catches and logs everything.
* Remote updates are applied inside a transaction whose origin is a `RemoteOrigin`, so an
  application's `UndoManager` (which tracks origin-less transactions) never undoes them, and
  so the node knows not to echo the update back to the peer it came from.
* A re-applied update changes nothing and is not reported: this is what ends gossip.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pycrdt import Doc, TransactionEvent, merge_updates

from ..errors import ConfigError, DecodeError, ErrorCode, ProtocolError, StoreError
from ..ids import check_doc_id
from .content import content_digest
from .inventory import BUCKETS
from .yjs import (
    bucket_of,
    check_state_vector,
    check_update,
    doc_digest,
    entry_hash,
    is_empty_update,
)

log = logging.getLogger(__name__)

EMPTY_STATE_VECTOR = b"\x00"
# Exceptions that are not about the bytes applied, so never turned into a protocol error.
_NOT_OURS = (KeyboardInterrupt, SystemExit, GeneratorExit)

OnUpdate = Callable[[str, bytes, object | None], None]


@dataclass(frozen=True, slots=True)
class RemoteOrigin:
    """Transaction origin of an update applied on behalf of peer `peer`.

    `pulled` marks what this node asked for (a SyncStep2 reply) as opposed to live updates the
    peer pushed: the router pushes only live updates on, and lets the other links pull the
    rest, so a node meeting several peers at once does not receive the same history twice.
    """

    peer: str
    pulled: bool = False


@dataclass(frozen=True, slots=True)
class _LoadOrigin:
    """Transaction origin of updates replayed from the local cache (never reported)."""


_LOADING = _LoadOrigin()


class Replica:
    """The named documents of one node; reports each committed change to `on_update`."""

    def __init__(
        self, on_update: OnUpdate, *, client_id_factory: Callable[[], int] | None = None
    ) -> None:
        self._on_update = on_update
        self._client_id_factory = client_id_factory
        self._docs: dict[str, Doc[Any]] = {}
        self._digests: dict[str, bytes] = {}
        self._contents: dict[str, bytes] = {}  # content digests (#11 F6), dropped on change
        # Inventory fingerprints: the XOR of one 128-bit hash per non-empty doc, overall and per
        # bucket, kept up to date incrementally (a change XORs the doc's old entry out; `_fold`
        # XORs the new one in), so an unchanged inventory of any size costs nothing to summarise
        # and a changed one is narrowed down bucket by bucket.
        self._entries: dict[str, int] = {}
        self._fingerprint = 0
        self._bucket_fp = [0] * BUCKETS
        self._bucket_names: list[list[str]] = [[] for _ in range(BUCKETS)]
        self._stale: set[str] = set()
        # The origin of the transaction this replica itself is running on a doc. pycrdt does
        # not let an observer read the origin, so the replica remembers what it passed in.
        self._origins: dict[str, object] = {}

    # -- documents --------------------------------------------------------------------------

    def doc(self, name: str) -> Doc[Any]:
        """The document `name`, created empty on first use."""
        found = self._docs.get(name)
        if found is not None:
            return found
        check_doc_id(name)
        client_id = self._client_id_factory() if self._client_id_factory is not None else None
        doc: Doc[Any] = Doc(client_id=client_id)
        doc.observe(lambda event: self._observe(name, event))
        self._docs[name] = doc
        bisect.insort(self._bucket_names[bucket_of(name)], name)
        return doc

    def names(self) -> list[str]:
        """The names of every document this replica holds, sorted."""
        return sorted(self._docs)

    def __contains__(self, name: object) -> bool:
        return name in self._docs

    def __len__(self) -> int:
        return len(self._docs)

    def load(self, name: str, updates: Iterable[bytes]) -> Doc[Any]:
        """Replay updates read from the local cache into `name`, without reporting them."""
        doc = self.doc(name)
        self._origins[name] = _LOADING
        try:
            for index, update in enumerate(updates):
                try:
                    with doc.transaction(origin=_LOADING):
                        doc.apply_update(update)
                except _NOT_OURS:
                    raise
                except BaseException as exc:  # ValueError, RuntimeError, a Rust panic
                    raise StoreError(
                        f"cached update #{index} of document {name!r} is not a valid Yjs update"
                    ) from exc
        finally:
            del self._origins[name]
            self._changed(name)
        return doc

    def apply_remote(self, name: str, update: bytes, origin: RemoteOrigin) -> None:
        """Apply an update received from a peer; raise ProtocolError(BAD_UPDATE) if invalid."""
        try:
            check_update(update)
        except DecodeError as exc:
            raise ProtocolError(
                f"invalid update for document {name!r}: {exc}", ErrorCode.BAD_UPDATE
            ) from exc
        created = name not in self._docs
        try:
            doc = self.doc(name)
        except ConfigError as exc:
            raise ProtocolError(f"invalid document name: {exc}", ErrorCode.MALFORMED) from exc
        self._origins[name] = origin
        try:
            with doc.transaction(origin=origin):
                doc.apply_update(update)
        except _NOT_OURS:
            raise
        except BaseException as exc:
            # pycrdt raises ValueError for bytes it cannot decode, and RuntimeError (after
            # committing the rest of the update) for an item it cannot integrate, such as one
            # whose parent is not a shared type. Whatever was committed was reported and is
            # kept; a doc this update created and left empty is forgotten again.
            if created and doc.get_state() == EMPTY_STATE_VECTOR:
                del self._docs[name]
                self._bucket_names[bucket_of(name)].remove(name)
                self._stale.discard(name)
                self._digests.pop(name, None)
            raise ProtocolError(
                f"invalid update for document {name!r}: pycrdt rejected it ({type(exc).__name__})",
                ErrorCode.BAD_UPDATE,
            ) from exc
        finally:
            self._origins.pop(name, None)

    # -- sync state -------------------------------------------------------------------------

    def state_vector(self, name: str) -> bytes:
        """The state vector of `name` (the empty vector if the doc does not exist)."""
        doc = self._docs.get(name)
        return EMPTY_STATE_VECTOR if doc is None else doc.get_state()

    def diff(self, name: str, state_vector: bytes) -> bytes:
        """Everything in `name` that a peer at `state_vector` lacks, plus the full delete set."""
        check_state_vector(state_vector)
        doc = self._docs.get(name)
        if doc is None:
            return Doc().get_update()
        try:
            return doc.get_update(state_vector)
        except ValueError as exc:
            raise ProtocolError(
                f"invalid state vector for document {name!r}", ErrorCode.MALFORMED
            ) from exc

    def is_empty(self, name: str) -> bool:
        """Whether `name` is absent or holds no content at all."""
        return self.state_vector(name) == EMPTY_STATE_VECTOR

    def digest(self, name: str) -> bytes:
        """A 16-byte digest of the state vector and delete set of `name` (cached)."""
        cached = self._digests.get(name)
        if cached is not None:
            return cached
        doc = self._docs.get(name)
        if doc is None:
            state, deletes = EMPTY_STATE_VECTOR, Doc().get_update()
        else:
            state = doc.get_state()
            deletes = doc.get_update(state)
        digest = doc_digest(state, deletes)
        if doc is not None:
            self._digests[name] = digest
        return digest

    def inventory(self) -> dict[str, bytes]:
        """Digest of every non-empty document (empty ones have nothing to sync)."""
        self._fold()
        return {name: self.digest(name) for name in self._entries}

    def fingerprint(self) -> tuple[bytes, int]:
        """(16-byte fingerprint, count) of the inventory; equal inventories, equal fingerprints."""
        self._fold()
        return self._fingerprint.to_bytes(16, "big"), len(self._entries)

    def bucket_fingerprints(self) -> tuple[bytes, ...]:
        """The fingerprint of each inventory bucket (`bucket_of` says which bucket a doc is in)."""
        self._fold()
        return tuple(fp.to_bytes(16, "big") for fp in self._bucket_fp)

    def bucket_page(
        self, bucket: int, after: str, limit: int
    ) -> tuple[list[tuple[str, bytes]], bool]:
        """Up to `limit` (doc, digest) of the bucket's non-empty docs named after `after`,
        sorted; and whether more follow."""
        self._fold()
        names = self._bucket_names[bucket]
        out: list[tuple[str, bytes]] = []
        for i in range(bisect.bisect_right(names, after), len(names)):
            name = names[i]
            if name not in self._entries:
                continue
            if len(out) == limit:
                return out, True
            out.append((name, self.digest(name)))
        return out, False

    def bucket_names(self, bucket: int, after: str, upto: str | None) -> list[str]:
        """The bucket's non-empty docs named in (after, upto] (upto None: to the end)."""
        self._fold()
        names = self._bucket_names[bucket]
        lo = bisect.bisect_right(names, after)
        hi = len(names) if upto is None else bisect.bisect_right(names, upto)
        return [n for n in names[lo:hi] if n in self._entries]

    def content_digest(self, name: str) -> bytes:
        """A 16-byte digest of what `name` holds (`sync.content`), cached until it changes."""
        cached = self._contents.get(name)
        if cached is None:
            cached = self._contents[name] = content_digest(self.diff(name, EMPTY_STATE_VECTOR))
        return cached

    def _changed(self, name: str) -> None:
        self._digests.pop(name, None)
        self._contents.pop(name, None)
        entry = self._entries.pop(name, None)
        if entry is not None:
            self._fingerprint ^= entry
            self._bucket_fp[bucket_of(name)] ^= entry
        self._stale.add(name)

    def _fold(self) -> None:
        for name in self._stale:
            doc = self._docs.get(name)
            if doc is None or doc.get_state() == EMPTY_STATE_VECTOR:
                continue
            entry = int.from_bytes(entry_hash(name, self.digest(name)), "big")
            self._entries[name] = entry
            self._fingerprint ^= entry
            self._bucket_fp[bucket_of(name)] ^= entry
        self._stale.clear()

    # -- observer ---------------------------------------------------------------------------

    def _observe(self, name: str, event: TransactionEvent) -> None:
        # Runs inside the commit: the doc is borrowed, so only copy and look up, then report.
        try:
            self._changed(name)
            update = bytes(event.update)
            origin = (
                self._origins[name] if name in self._origins else _app_origin(self._docs.get(name))
            )
            if origin is _LOADING or is_empty_update(update):
                return
            self._on_update(name, update, origin)
        except Exception:
            log.exception("update observer of document %r failed", name)


def _app_origin(doc: Doc[Any] | None) -> object | None:
    """The origin an application gave its own transaction, read without borrowing the doc."""
    # The public `Transaction.origin` needs a borrow the commit holds; the Python wrapper keeps
    # the origin in a side table until the commit ends. Best effort: anything else is local.
    try:
        txn = getattr(doc, "_txn", None)
        key = getattr(txn, "_origin_hash", None)
        if key is None:
            return None
        origins = getattr(doc, "_origins", {})
        return origins.get(key)
    except Exception:
        return None


MERGE_CHUNK = 64


def merge_small(updates: list[bytes]) -> bytes:
    """One update equivalent to `updates`, merged as a tree of small chunks.

    pycrdt's merge_updates is quadratic in the number of inputs (100k in one call: 70 s;
    in chunks: 0.17 s), so never hand it more than MERGE_CHUNK at once.
    """
    while len(updates) > 1:
        chunks = [updates[i : i + MERGE_CHUNK] for i in range(0, len(updates), MERGE_CHUNK)]
        updates = [merge_updates(*c) if len(c) > 1 else c[0] for c in chunks]
    return updates[0]
