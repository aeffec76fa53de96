"""Encrypted checkpoints of whole doc states: the policy (seal, write, compact, restore, search).

Theory of operation. Every write is a new, immutable *object* named by (group, doc, device,
random *generation*), so concurrent checkpoints never overwrite each other (stores like Weaviate
have no compare-and-swap). An object is a *manifest* plus its *chunks*: the state is split into
`chunk_size` parts, each sealed with ChaCha20-Poly1305 under the group's checkpoint key, and the
manifest carries a sealed header (doc name, device id, size, SHA-256, the state vector and
delete set saying exactly which items the state holds, the device's rising write counter for
the doc, and the chunk size). Chunks are stored first and the
manifest LAST, so a reader never sees a half-written object. The AEAD associated data binds
tenant, doc key, device tag, generation and chunk index, so swapping chunks or objects is
detected.

Compaction (`checkpoint._cover` has the order and the proof): before writing a doc, the
checkpointer lists the doc's objects. If one it has confirmed stored already holds its state,
it writes nothing; otherwise it writes its own. Then it deletes every listed object that the
confirmed one dominates, its own older writes included. A node holding the merged state thus
leaves about one object per doc, however many devices wrote it, and restore reads only the
objects no other listed object dominates.

Restore trusts nothing in clear: it opens every header first and fetches chunks only for
objects whose clear `parts`/`nbytes` are exactly what their header implies (a store cannot make
it allocate by lying). The newest write seen per (doc, device) is kept in a ledger in the local
cache (`checkpoint._ledger`), so an older write served again is refused and a stored state
that vanished is reported (`warnings`); a node that finds its own state gone writes it again.

What a store sees in clear: the tenant (a keyed hash of the group), the object id (keyed hash
of doc name + device + generation), the doc key (keyed hash of the doc name), a device tag
(keyed hash of the device id), the generation, counts and sizes, and - only for docs the app
marks searchable - their passages (paragraphs) in clear with their vectors. Doc names never
leave the sealed header.

The records and the sink contract are in `checkpoint.format` (sans-IO); sinks are opened by URL
scheme through `checkpoint.sinks`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..config import Embedder
from ..crypto.keys import SEAL_OVERHEAD, GroupKeys, open_blob, seal_blob
from ..errors import CheckpointError, ProtocolError, SecurityError
from ._cover import Cover, Listed, maximal, precedes, rank_of, state_cover
from ._ledger import Ledger, LedgerEntry
from ._passages import IndexUpdate, PassageIndex
from ._vectors import VectorCache, embed
from .format import (
    PUT_BUDGET,
    CheckpointSink,
    DocHit,
    Header,
    Manifest,
    SearchMode,
    SearchQuery,
    SinkRecord,
    check_tenant,
    decode_header,
    encode_header,
    record_aad,
    snippet_of,
)

__all__ = [
    "CHUNK_SIZE",
    "CheckpointReport",
    "CheckpointState",
    "Checkpointer",
    "RestoreProgress",
]

log = logging.getLogger(__name__)

CHUNK_SIZE = 4 * 1024 * 1024
MAX_HEADER_BYTES = 4096  # a sealed header is well under 1 KiB plus the doc name (<= 255)
RESTORE_ROUNDS = 4  # list again this often when objects vanish mid-read (pruned meanwhile)
_SEARCH_MODES = ("keyword", "vector", "hybrid")
_T = TypeVar("_T")


@dataclass
class CheckpointState:
    """Checkpoint state of one doc (times come from the Checkpointer's clock)."""

    last_ok: float | None = None
    last_attempt: float | None = None
    last_error: str | None = None
    writes: int = 0


@dataclass(frozen=True)
class CheckpointReport:
    """What one `checkpoint()` call did."""

    written: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0
    seconds: float = 0.0
    already_stored: tuple[str, ...] = ()  # docs whose state a stored object already held
    pruned: int = 0  # objects deleted because a confirmed object dominates them


@dataclass(frozen=True)
class RestoreProgress:
    """How far a restore is: objects listed, objects to read, objects read, bytes read."""

    listed: int
    total: int
    done: int
    nbytes: int


@dataclass
class _Doc:
    """One doc being checkpointed."""

    name: str
    key: str
    state: bytes
    text: str | None
    sv: bytes | None
    ds: bytes | None
    cover: Cover | None


@dataclass
class _Tally:
    """What one checkpoint() call did so far."""

    written: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    nbytes: int = 0
    pruned: int = 0


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class Checkpointer:
    """The checkpoint policy: dirty tracking, sealing, compaction, restore, search, loops.

    `get_state(doc)` returns a doc's full state (pycrdt `doc.get_update()`); `text_of(doc)`
    returns the plain text of a searchable doc and None for every other doc. Both are called
    on the event loop, so they may touch pycrdt docs directly. With an `embedder`, passages
    get vectors (remembered by passage hash in `vector_file`) and search can go by meaning.
    """

    def __init__(
        self,
        keys: GroupKeys,
        device_id: str,
        sink: CheckpointSink,
        get_state: Callable[[str], bytes],
        text_of: Callable[[str], str | None] | None = None,
        *,
        chunk_size: int = CHUNK_SIZE,
        clock: Callable[[], float] = time.time,
        embedder: Embedder | None = None,
        vector_file: str | Path | None = None,
        ledger_path: Path | None = None,
        on_written: Callable[[str, str], None] | None = None,
        admit: Callable[[Header], bool] | None = None,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._keys = keys
        self.device_id = device_id
        self.sink = sink
        self.tenant = check_tenant(keys.tenant)
        self._get_state = get_state
        self._text_of = text_of
        self.chunk_size = chunk_size
        self._clock = clock
        self.embedder = embedder
        self.index = PassageIndex(sink, self.tenant, embedder, VectorCache(vector_file))
        self._dirty: dict[str, int] = {}
        self._seq = 0
        self._names: dict[str, str] = {}  # doc_key -> doc name, for search results
        self._opened: dict[str, Listed] = {}  # object_id -> opened header (objects are immutable)
        self._seen: set[str] = set()  # object ids already returned by restore
        self._known: dict[str, list[Cover]] = {}  # doc_key -> states this node holds
        self._latest: dict[str, str] = {}  # doc_key -> the object holding our latest state
        self._lock = asyncio.Lock()
        self.status: dict[str, CheckpointState] = {}
        self.failures = 0  # consecutive failed rounds of `run()`
        self.last_error: str | None = None
        self.progress: RestoreProgress | None = None  # of the restore under way, if any
        self._ledger = Ledger(ledger_path)
        self._on_written = on_written  # (doc, generation) after each successful write
        # Which opened objects to read at all (an ended epoch's: only its members', and only
        # what they wrote before it ended); None: every object that opens.
        self._admit = admit

    # ---- ids -------------------------------------------------------------------------------
    def doc_key(self, doc: str) -> str:
        """The keyed hash that stands for `doc` in the store."""
        return self._keys.object_key(doc).hex()

    def device_tag(self, device_id: str) -> str:
        """The keyed tag that stands for a device in the store."""
        # "\x01" cannot start a doc name, so a tag never equals a doc key or object id.
        return self._keys.object_key("\x01device", device_id).hex()[:32]

    def object_id(self, doc: str, device_id: str | None = None, generation: str = "") -> str:
        """The store id of one write of (doc, device): a UUID made of the keyed hash."""
        key = self._keys.object_key(doc, device_id or self.device_id, generation)
        return str(uuid.UUID(bytes=key[:16], version=4))

    def _aad(self, kind: bytes, doc_key: str, device: str, gen: str, index: int, n: int) -> bytes:
        return record_aad(self.tenant, kind, doc_key, device, gen, index, n)

    # ---- sealing ---------------------------------------------------------------------------
    def seal(
        self, doc: str, state: bytes, sv: bytes | None = None, ds: bytes | None = None
    ) -> SinkRecord:
        """Encrypt one doc state as a new object of this device (chunked)."""
        key = self._keys.checkpoint_key
        doc_key, device, gen = self.doc_key(doc), self.device_tag(self.device_id), os.urandom(8)
        generation = gen.hex()
        pieces = [state[i : i + self.chunk_size] for i in range(0, len(state), self.chunk_size)]
        pieces = pieces or [b""]
        n = len(pieces)
        chunks = tuple(
            seal_blob(key, p, self._aad(b"C", doc_key, device, generation, i, n))
            for i, p in enumerate(pieces)
        )
        # Above every write seen and above the clock in ms: it rises even if the ledger is lost.
        seq = max(int(self._clock() * 1000), self._ledger.newest(doc_key, device) + 1)
        header = encode_header(doc, self.device_id, state, sv, ds, seq=seq, chunk=self.chunk_size)
        sealed = seal_blob(key, header, self._aad(b"H", doc_key, device, generation, -1, n))
        oid = self.object_id(doc, self.device_id, generation)
        manifest = Manifest(oid, doc_key, device, generation, n, sum(map(len, chunks)), sealed)
        return SinkRecord(manifest, chunks)

    def _header(self, m: Manifest) -> Header:
        """Open and check a manifest's sealed header, and the clear fields sinks fetch by
        against it; SecurityError if it was tampered with or is not this object's."""
        if len(m.header) > MAX_HEADER_BYTES:
            raise SecurityError("sealed header is implausibly large")
        aad = self._aad(b"H", m.doc_key, m.device, m.generation, -1, m.parts)
        head = decode_header(open_blob(self._keys.checkpoint_key, m.header, aad))
        if (
            self.doc_key(head.doc) != m.doc_key
            or self.device_tag(head.device) != m.device
            or self.object_id(head.doc, head.device, m.generation) != m.object_id
        ):
            raise SecurityError("header does not belong to this object (swapped)")
        expected = head.expected_parts()
        if (expected is not None and m.parts != expected) or not 1 <= m.parts <= max(1, head.size):
            raise SecurityError(f"{m.parts} parts do not fit a state of {head.size} bytes")
        if expected is not None and m.nbytes != head.size + m.parts * SEAL_OVERHEAD:
            raise SecurityError("the sealed size does not match the header")
        return head

    def open(self, m: Manifest, chunks: Sequence[bytes]) -> tuple[str, bytes]:
        """Verify and decrypt one object -> (doc name, state); SecurityError if tampered."""
        key = self._keys.checkpoint_key
        head = self._header(m)
        if len(chunks) != m.parts:
            raise CheckpointError(f"incomplete: {len(chunks)} of {m.parts} chunks present")
        state = b"".join(
            open_blob(key, c, self._aad(b"C", m.doc_key, m.device, m.generation, i, m.parts))
            for i, c in enumerate(chunks)
        )
        if len(state) != head.size or hashlib.sha256(state).hexdigest() != head.sha256:
            raise SecurityError("state does not match its header digest")
        return head.doc, state

    def _opened_obj(self, m: Manifest) -> Listed | None:
        """The listed object with its header opened (cached); None, logged, if refused."""
        o = self._opened.get(m.object_id)
        if o is not None and o.m == m:
            return o
        try:
            head = self._header(m)
            cover = None
            if head.sv is not None and head.ds is not None:
                cover = Cover.parse(head.sv, head.ds)
        except (SecurityError, ProtocolError) as exc:
            log.warning("checkpoint: object %s refused: %s", m.object_id, exc)
            return None
        if self._admit is not None and not self._admit(head):
            log.info(
                "checkpoint: object %s skipped (its writer or time is not admitted)", m.object_id
            )
            return None
        o = self._opened[m.object_id] = Listed(m, head, cover, rank_of(m, cover))
        self._names[m.doc_key] = head.doc
        return o

    def _group(
        self, manifests: Sequence[Manifest], scope: Iterable[str] | None = ()
    ) -> dict[str, list[Listed]]:
        """Opened objects per doc key. The listing is complete for the doc keys in `scope`
        (None: every doc), so cached objects of those docs missing from it are forgotten."""
        present = {m.object_id for m in manifests}
        keys = None if scope is None else set(scope)
        gone = [
            oid
            for oid, o in self._opened.items()
            if oid not in present and (keys is None or o.m.doc_key in keys)
        ]
        for oid in gone:
            del self._opened[oid]
            self._seen.discard(oid)
        if keys is None:
            self._seen &= present
        out: dict[str, list[Listed]] = {}
        for m in manifests:
            o = self._opened_obj(m)
            if o is not None:
                out.setdefault(m.doc_key, []).append(o)
        return out

    # ---- dirty tracking --------------------------------------------------------------------
    def mark_dirty(self, doc: str) -> None:
        """Record that `doc` changed since its last checkpoint."""
        self._seq += 1
        self._dirty[doc] = self._seq
        self._names[self.doc_key(doc)] = doc

    @property
    def dirty(self) -> frozenset[str]:
        """Docs changed since their last successful checkpoint."""
        return frozenset(self._dirty)

    def _remember(self, doc_key: str, cover: Cover | None) -> None:
        """Note that this node holds `cover` of a doc (restore then skips what it holds)."""
        if cover is None:
            return
        known = self._known.setdefault(doc_key, [])
        if not any(cover.within(k) for k in known):
            known[:] = [k for k in known if not k.within(cover)] + [cover]

    # ---- store calls -----------------------------------------------------------------------
    async def _sink(self, what: str, call: Awaitable[_T]) -> _T:
        try:
            return await call
        except CheckpointError:
            raise
        except Exception as exc:  # a sink broke its contract; keep the node alive anyway
            raise CheckpointError(f"checkpoint {what} failed: {_reason(exc)}") from exc

    async def _manifests(self, doc_keys: Sequence[str] | None) -> list[Manifest]:
        return await self._sink("store", self.sink.manifests(self.tenant, doc_keys))

    async def _read(self, doc: str) -> _Doc:
        state = self._get_state(doc)
        text = self._text_of(doc) if self._text_of is not None else None
        sv = ds = None
        cover = None
        try:
            if len(state) > 1 << 20:  # big states are parsed off the loop
                sv, ds = await asyncio.to_thread(state_cover, state)
            else:
                sv, ds = state_cover(state)
            cover = Cover.parse(sv, ds)
        except Exception:  # not a Yjs state (tests, other apps): written, never compacted
            sv = ds = None
        return _Doc(doc, self.doc_key(doc), state, text, sv, ds, cover)

    # ---- checkpoint ------------------------------------------------------------------------
    async def checkpoint(
        self, docs: Iterable[str] | None = None, *, force: bool = False
    ) -> CheckpointReport:
        """Write every dirty doc (or the dirty ones among `docs`; all of `docs` if `force`),
        then delete the objects the written (or already stored) states dominate.

        Raises CheckpointError when the store fails; the docs stay dirty and their status
        records the error. A doc whose state cannot be read is reported in `failed` instead.
        """
        async with self._lock:
            if docs is None:
                names = sorted(self._dirty)
            else:
                names = sorted({d for d in docs if force or d in self._dirty})
            started, now = time.perf_counter(), self._clock()
            seqs = {d: self._dirty.get(d) for d in names}
            failed: dict[str, str] = {}
            done: list[str] = []
            tally = _Tally()
            try:
                batch: list[_Doc] = []
                for name in names:
                    st = self.status.setdefault(name, CheckpointState())
                    st.last_attempt = now
                    self._names[self.doc_key(name)] = name
                    try:
                        batch.append(await self._read(name))
                    except Exception as exc:
                        st.last_error = failed[name] = f"reading state failed: {_reason(exc)}"
                        continue
                    if len(batch) >= 100 or sum(len(d.state) for d in batch) >= PUT_BUDGET:
                        done += await self._write(batch, tally)
                        batch = []
                if batch:
                    done += await self._write(batch, tally)
            except CheckpointError as exc:
                self.last_error = _reason(exc)
                pending = [n for n in names if n not in done and n not in failed]
                for name in pending:
                    self.status[name].last_error = self.last_error
                raise CheckpointError(
                    f"checkpoint of {len(pending)} doc(s) failed: {self.last_error}"
                ) from exc
            finally:
                for name in done:
                    st = self.status[name]
                    st.last_ok, st.last_error = now, None
                    st.writes += name in tally.written
                    if self._dirty.get(name) == seqs[name]:  # no edit since we read it
                        self._dirty.pop(name, None)
            self.last_error = None
            return CheckpointReport(
                tuple(tally.written),
                failed,
                tally.nbytes,
                time.perf_counter() - started,
                tuple(tally.held),
                tally.pruned,
            )

    async def _write(self, batch: list[_Doc], tally: _Tally) -> list[str]:
        """Checkpoint one batch of docs: skip, write, prune, index. Returns the docs done."""
        keys = sorted({d.key for d in batch})
        listed = self._group(await self._manifests(keys), keys)
        # A doc whose state a stored object already holds needs no new object.
        holders: dict[str, Listed] = {}
        for d in batch:
            if d.cover is not None:
                for o in maximal(listed.get(d.key, [])):
                    if o.cover is not None and d.cover.within(o.cover):
                        holders[d.name] = o
                        break
        if holders:
            asked = [o.m for o in holders.values()]
            ok = await self._sink("confirm", self.sink.confirm(self.tenant, asked))
            holders = {n: o for n, o in holders.items() if o.object_id in ok}
        records = {
            d.name: self.seal(d.name, d.state, d.sv, d.ds) for d in batch if d.name not in holders
        }
        if records:
            await self._sink("store", self.sink.put(self.tenant, list(records.values())))
        justifiers: dict[str, Listed] = dict(holders)
        for d in batch:
            rec = records.get(d.name)
            if rec is not None:
                head = self._header(rec.manifest)
                o = Listed(rec.manifest, head, d.cover, rank_of(rec.manifest, d.cover))
                self._opened[o.object_id] = o
                justifiers[d.name] = o
                tally.written.append(d.name)
                tally.nbytes += rec.manifest.nbytes
                self._ledger.seen(self._entry(o))
                if self._on_written is not None:
                    self._on_written(d.name, rec.manifest.generation)
            else:
                tally.held.append(d.name)
        updates = []
        victims: list[Manifest] = []
        for d in batch:
            j = justifiers[d.name]
            self._latest[d.key] = j.object_id  # never deleted by us: it holds our state
            self._remember(d.key, d.cover)
            others = [o for o in listed.get(d.key, []) if o.object_id != j.object_id]
            doomed = [
                o
                for o in others
                if j.cover is not None
                and o.cover is not None
                and precedes(o.cover, o.object_id, j.cover, j.object_id)
            ]
            victims += [o.m for o in doomed]
            updates.append(IndexUpdate(d.key, d.text, len(doomed) == len(others)))
        tally.pruned += await self._prune(victims)
        await asyncio.to_thread(self._ledger.save)
        try:
            await self.index.sync(updates)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"search index update failed: {_reason(exc)}") from exc
        return [d.name for d in batch]

    async def _prune(self, victims: Sequence[Manifest]) -> int:
        """Delete dominated objects; best effort (a failure only leaves extra objects)."""
        if not victims:
            return 0
        try:
            await self._sink("prune", self.sink.delete(self.tenant, victims))
        except CheckpointError as exc:
            log.warning("checkpoint: %d dominated object(s) not deleted: %s", len(victims), exc)
            return 0
        for m in victims:
            self._opened.pop(m.object_id, None)
        return len(victims)

    # ---- what the store did ------------------------------------------------------------------
    @property
    def warnings(self) -> tuple[str, ...]:
        """Signs that the store served an older write again or lost a stored state."""
        return self._ledger.warnings

    def _entry(self, o: Listed) -> LedgerEntry:
        return LedgerEntry(
            o.head.seq, o.m.doc_key, o.m.device, o.head.doc, o.head.device, o.head.sv, o.head.ds
        )

    def _check_store(
        self, groups: dict[str, list[Listed]], scope: Sequence[str] | None
    ) -> dict[str, list[Listed]]:
        """Report lost states (re-mark our own dirty) and drop older writes served again."""
        for gone in self._ledger.lost(groups, scope):
            if gone.device == self.device_id:
                self.mark_dirty(gone.doc)  # write ours again
        return {
            key: [o for o in objs if not self._ledger.is_rollback(o)]
            for key, objs in groups.items()
        }

    # ---- restore ---------------------------------------------------------------------------
    async def _chunks(
        self, objs: Sequence[Listed], tick: Callable[[int, int], None]
    ) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        batch: list[Manifest] = []
        for o in [*objs, None]:
            if o is not None:
                batch.append(o.m)
            size = sum(x.nbytes for x in batch)
            if batch and (o is None or size >= PUT_BUDGET or len(batch) >= 200):
                out.update(await self._sink("store", self.sink.chunks(self.tenant, batch)))
                tick(len(batch), size)
                batch = []
        return out

    async def restore(
        self,
        doc_names: Iterable[str] | None = None,
        *,
        changed_only: bool = False,
        include_own: bool = True,
        progress: Callable[[RestoreProgress], None] | None = None,
    ) -> dict[str, list[bytes]]:
        """The verified states to merge per doc (all docs of the group by default).

        Reads only the objects no other listed object dominates. `changed_only` also skips
        objects this node already holds (returned before, or written by it). A tampered or
        incomplete object is refused with a log line naming its object id; the others are
        still returned. Raises CheckpointError when the store fails.
        """
        names = None if doc_names is None else sorted(set(doc_names))
        doc_keys = None if names is None else [self.doc_key(n) for n in names]
        own = self.device_tag(self.device_id)
        out: dict[str, list[bytes]] = {}
        got: dict[str, list[Cover]] = {}
        read: set[str] = set()
        listing = await self._manifests(doc_keys)
        counts = {"listed": len(listing), "total": 0, "done": 0, "nbytes": 0}

        def tick(n: int, nbytes: int) -> None:
            counts["done"] += n
            counts["nbytes"] += nbytes
            self.progress = RestoreProgress(**counts)
            if progress is not None:
                progress(self.progress)

        try:
            scope: Sequence[str] | None = doc_keys
            for attempt in range(RESTORE_ROUNDS):
                todo: list[Listed] = []
                groups = self._check_store(self._group(listing, scope), scope)
                for key, group in groups.items():
                    held = got.get(key, []) + (self._known.get(key, []) if changed_only else [])
                    for o in maximal(group):
                        if (
                            o.object_id in read
                            or (not include_own and o.m.device == own)
                            or (changed_only and o.object_id in self._seen)
                            or (o.cover is not None and any(o.cover.within(h) for h in held))
                        ):
                            continue
                        todo.append(o)
                counts["total"] += len(todo)
                tick(0, 0)
                chunks = await self._chunks(todo, tick)
                again: set[str] = set()
                for o in todo:
                    try:
                        doc, state = self.open(o.m, chunks.get(o.object_id, []))
                    except SecurityError as exc:
                        log.warning("checkpoint: object %s refused: %s", o.object_id, exc)
                        continue
                    except CheckpointError as exc:
                        if attempt < RESTORE_ROUNDS - 1:  # pruned while we read: list again
                            again.add(o.m.doc_key)
                        else:
                            log.warning("checkpoint: object %s refused: %s", o.object_id, exc)
                        continue
                    out.setdefault(doc, []).append(state)
                    read.add(o.object_id)
                    self._seen.add(o.object_id)
                    self._ledger.seen(self._entry(o))
                    if o.cover is not None:
                        got.setdefault(o.m.doc_key, []).append(o.cover)
                        self._remember(o.m.doc_key, o.cover)
                if not again:
                    break
                scope = sorted(again)
                listing = await self._manifests(scope)
        finally:
            self.progress = None
            await asyncio.to_thread(self._ledger.save)
        return out

    # ---- search ----------------------------------------------------------------------------
    async def search(
        self, query: str, limit: int = 10, mode: SearchMode | None = None, alpha: float = 0.5
    ) -> list[DocHit]:
        """The best passages of searchable docs for `query`, best first.

        `mode` is "keyword" (BM25), "vector" (by meaning, needs an embedder) or "hybrid"
        (both, `alpha` 0 = keyword only .. 1 = vector only); None means hybrid with an
        embedder and keyword without.
        """
        if mode is None:
            mode = "hybrid" if self.embedder is not None else "keyword"
        if mode not in _SEARCH_MODES:
            raise ValueError(f"search mode must be one of {', '.join(_SEARCH_MODES)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("alpha must be between 0 and 1")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        vector = None
        if mode != "keyword":
            if self.embedder is None:
                raise CheckpointError(f"{mode} search needs an embedder (NodeConfig.embedder)")
            (vector,) = await embed(self.embedder, [query])
        q = SearchQuery(query, mode, vector, alpha, limit)
        hits = await self._sink("search", self.sink.search(self.tenant, q))
        unknown = sorted({h.doc_key for h in hits if h.doc_key not in self._names})
        if unknown:  # learn names from the sealed headers
            self._group(await self._manifests(unknown))
        return [
            DocHit(name, h.text, h.score, snippet_of(h.text, query))
            for h in hits
            if (name := self._names.get(h.doc_key)) is not None
        ][:limit]

    # ---- loops -----------------------------------------------------------------------------
    @staticmethod
    def next_delay(interval: float, failures: int, max_backoff: float = 60.0) -> float:
        """Seconds to wait before the next round: `interval`, doubled per failure, capped."""
        if failures <= 0:
            return interval
        return max(interval, min(max_backoff, interval * 2.0**failures))

    async def _loop(
        self,
        what: str,
        interval: float,
        action: Callable[[], Awaitable[object]],
        max_backoff: float,
        sleep: Callable[[float], Awaitable[object]],
    ) -> None:
        failures = 0
        while True:
            await sleep(self.next_delay(interval, failures, max_backoff))
            try:
                await action()
            except CheckpointError as exc:
                failures += 1
                if failures == 1:
                    log.warning("checkpoint: %s failing, backing off: %s", what, exc)
            except Exception:
                failures += 1
                log.exception("checkpoint: unexpected error in %s", what)
            else:
                if failures:
                    log.info("checkpoint: %s works again after %d failure(s)", what, failures)
                failures = 0
            if what == "checkpoint":
                self.failures = failures

    async def run(
        self,
        interval: float,
        *,
        max_backoff: float = 60.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """Checkpoint dirty docs every `interval` s, backing off while the store fails.

        Never raises (cancel the task to stop it); per-doc errors land in `status`.
        """
        await self._loop("checkpoint", interval, self.checkpoint, max_backoff, sleep)

    async def run_pull(
        self,
        interval: float,
        apply: Callable[[dict[str, list[bytes]]], Awaitable[None] | None],
        *,
        max_backoff: float = 60.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """Every `interval` s, hand other devices' new checkpoints to `apply` (never raises)."""

        async def pull() -> None:
            states = await self.restore(changed_only=True, include_own=False)
            if states:
                result = apply(states)
                if result is not None:
                    await result

        await self._loop("pull", interval, pull, max_backoff, sleep)

    async def close(self) -> None:
        """Close the sink."""
        await self.sink.close()
