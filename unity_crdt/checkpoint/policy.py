"""Encrypted checkpoints of whole doc states: the policy (seal, write, restore, search, loops).

Theory of operation. Each device writes one *object* per (group, doc, device), so concurrent
checkpoints never overwrite each other (stores like Weaviate have no compare-and-swap); restore
returns every device's state and the node applies them all (a CRDT merge). An object is a
*manifest* plus its *chunks*: the state is split into `chunk_size` parts, each sealed with
ChaCha20-Poly1305 under the group's checkpoint key, and the manifest carries a sealed header
(doc name, device id, size, SHA-256, chunk size, and a write counter that only rises). A write
stores every chunk under a fresh random *generation* first and the manifest LAST; only then are
older generations' chunks dropped, so a reader never sees a half-written checkpoint. The AEAD
associated data binds tenant, doc key, device tag, generation and chunk index, so swapping
chunks or objects is detected.

Restore trusts nothing in clear: it opens every header first and fetches chunks only for
manifests whose clear `parts`/`nbytes` are what their header implies. The highest write
counter seen per object is kept in a ledger file in the local cache, so an older copy served
again, or an object that vanished, is refused or reported (`warnings`).

What a store sees in clear: the tenant (a keyed hash of the group), the object id (keyed hash
of doc name + device), the doc key (keyed hash of the doc name), a device tag (keyed hash of
the device id), the generation, counts and sizes, and - only for docs the app marks searchable -
their plain-text projection. Doc names never leave the sealed header.

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

from ..crypto.keys import SEAL_OVERHEAD, GroupKeys, open_blob, seal_blob
from ..errors import CheckpointError, SecurityError
from ._ledger import Ledger, LedgerEntry
from .format import (
    PUT_BUDGET,
    CheckpointSink,
    DocHit,
    Header,
    Manifest,
    SinkRecord,
    check_tenant,
    decode_header,
    encode_header,
    record_aad,
)

__all__ = ["CHUNK_SIZE", "CheckpointReport", "CheckpointState", "Checkpointer"]

log = logging.getLogger(__name__)

CHUNK_SIZE = 4 * 1024 * 1024
MAX_HEADER_BYTES = 4096  # a sealed header is ~300 bytes plus the doc name (<= 255)


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


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class Checkpointer:
    """The checkpoint policy: dirty tracking, sealing, restore with verification, backoff loops.

    `get_state(doc)` returns a doc's full state (pycrdt `doc.get_update()`); `text_of(doc)`
    returns the plain-text projection of a searchable doc and None for every other doc.
    Both are called on the event loop, so they may touch pycrdt docs directly.
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
        ledger_path: Path | None = None,
        on_written: Callable[[str, str], None] | None = None,
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
        self._on_written = on_written  # (doc, generation) after each successful write
        self._dirty: dict[str, int] = {}
        self._seq = 0
        self._names: dict[str, str] = {}  # doc_key -> doc name, for search results
        self._seen: dict[str, str] = {}  # object_id -> generation last restored
        self._lock = asyncio.Lock()
        self.status: dict[str, CheckpointState] = {}
        self.failures = 0  # consecutive failed rounds of `run()`
        self.last_error: str | None = None
        self._ledger = Ledger(ledger_path)

    # ---- ids -------------------------------------------------------------------------------
    def doc_key(self, doc: str) -> str:
        """The keyed hash that stands for `doc` in the store."""
        return self._keys.object_key(doc).hex()

    def device_tag(self, device_id: str) -> str:
        """The keyed tag that stands for a device in the store."""
        # "\x01" cannot start a doc name, so a tag never equals a doc key or object id.
        return self._keys.object_key("\x01device", device_id).hex()[:32]

    def object_id(self, doc: str, device_id: str | None = None) -> str:
        """The store id of (doc, device): a UUID made of the keyed hash."""
        key = self._keys.object_key(doc, device_id or self.device_id)
        return str(uuid.UUID(bytes=key[:16], version=4))

    def _aad(self, kind: bytes, doc_key: str, device: str, gen: str, index: int, n: int) -> bytes:
        return record_aad(self.tenant, kind, doc_key, device, gen, index, n)

    # ---- sealing ---------------------------------------------------------------------------
    def _next_seq(self, object_id: str) -> int:
        # Above every counter seen, and above the clock in ms, so the counter keeps rising even
        # if the ledger file is lost.
        known = self._ledger.get(object_id)
        return max(int(self._clock() * 1000), (known.seq if known else 0) + 1)

    def seal(self, doc: str, state: bytes, text: str | None = None) -> SinkRecord:
        """Encrypt one doc state as this device's object (chunked)."""
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
        seq = self._next_seq(self.object_id(doc))
        header = encode_header(doc, self.device_id, state, seq=seq, chunk=self.chunk_size)
        sealed = seal_blob(key, header, self._aad(b"H", doc_key, device, generation, -1, n))
        manifest = Manifest(
            self.object_id(doc), doc_key, device, generation, n, sum(map(len, chunks)), sealed
        )
        return SinkRecord(manifest, chunks, text)

    def header(self, m: Manifest) -> Header:
        """Open and check a manifest's sealed header, and the clear fields against it.

        SecurityError if it was tampered with, belongs to another object, or if the clear
        `parts` and `nbytes` (which sinks use to fetch) are not what the header implies.
        """
        if len(m.header) > MAX_HEADER_BYTES:
            raise SecurityError("sealed header is implausibly large")
        aad = self._aad(b"H", m.doc_key, m.device, m.generation, -1, m.parts)
        h = decode_header(open_blob(self._keys.checkpoint_key, m.header, aad))
        if (
            self.doc_key(h.doc) != m.doc_key
            or self.device_tag(h.device) != m.device
            or self.object_id(h.doc, h.device) != m.object_id
        ):
            raise SecurityError("header does not belong to this object (swapped)")
        expected = h.expected_parts()
        if (expected is not None and m.parts != expected) or not 1 <= m.parts <= max(1, h.size):
            raise SecurityError(f"{m.parts} parts do not fit a state of {h.size} bytes")
        if m.nbytes != h.size + m.parts * SEAL_OVERHEAD:
            raise SecurityError("the sealed size does not match the header")
        return h

    def open(
        self, m: Manifest, chunks: Sequence[bytes], h: Header | None = None
    ) -> tuple[str, bytes]:
        """Verify and decrypt one object -> (doc name, state); SecurityError if tampered."""
        key = self._keys.checkpoint_key
        h = h or self.header(m)
        doc, size, digest = h.doc, h.size, h.sha256
        if len(chunks) != m.parts:
            raise CheckpointError(f"incomplete: {len(chunks)} of {m.parts} chunks present")
        state = b"".join(
            open_blob(key, c, self._aad(b"C", m.doc_key, m.device, m.generation, i, m.parts))
            for i, c in enumerate(chunks)
        )
        if len(state) != size or hashlib.sha256(state).hexdigest() != digest:
            raise SecurityError("state does not match its header digest")
        return doc, state

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

    # ---- checkpoint ------------------------------------------------------------------------
    async def _put(self, records: Sequence[SinkRecord]) -> None:
        try:
            await self.sink.put(self.tenant, records)
        except CheckpointError:
            raise
        except Exception as exc:  # a sink broke its contract; keep the node alive anyway
            raise CheckpointError(f"checkpoint store failed: {_reason(exc)}") from exc

    async def checkpoint(
        self, docs: Iterable[str] | None = None, *, force: bool = False
    ) -> CheckpointReport:
        """Write every dirty doc (or the dirty ones among `docs`; all of `docs` if `force`).

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
            written: list[str] = []
            failed: dict[str, str] = {}
            batch: list[tuple[str, SinkRecord]] = []
            nbytes = 0

            async def flush() -> None:
                nonlocal nbytes
                await self._put([rec for _, rec in batch])
                for name, rec in batch:
                    st = self.status.setdefault(name, CheckpointState())
                    st.last_ok, st.last_error, st.writes = now, None, st.writes + 1
                    nbytes += rec.manifest.nbytes
                    written.append(name)
                    if self._dirty.get(name) == seqs[name]:  # no edit since we read it
                        self._dirty.pop(name, None)
                    self._remember(rec.manifest, self.header(rec.manifest))
                    if self._on_written is not None:
                        self._on_written(name, rec.manifest.generation)
                batch.clear()
                await asyncio.to_thread(self._ledger.save)

            try:
                for name in names:
                    st = self.status.setdefault(name, CheckpointState())
                    st.last_attempt = now
                    self._names[self.doc_key(name)] = name
                    try:
                        state = self._get_state(name)
                        text = self._text_of(name) if self._text_of is not None else None
                    except Exception as exc:
                        st.last_error = failed[name] = f"reading state failed: {_reason(exc)}"
                        continue
                    batch.append((name, self.seal(name, state, text)))
                    if sum(r.manifest.nbytes for _, r in batch) >= PUT_BUDGET:
                        await flush()
                if batch:
                    await flush()
            except CheckpointError as exc:
                self.last_error = _reason(exc)
                pending = [n for n in names if n not in written and n not in failed]
                for name in pending:
                    self.status[name].last_error = self.last_error
                raise CheckpointError(
                    f"checkpoint of {len(pending)} doc(s) failed: {self.last_error}"
                ) from exc
            self.last_error = None
            return CheckpointReport(tuple(written), failed, nbytes, time.perf_counter() - started)

    # ---- restore ---------------------------------------------------------------------------
    async def _manifests(self, doc_keys: Sequence[str] | None) -> list[Manifest]:
        try:
            return await self.sink.manifests(self.tenant, doc_keys)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"checkpoint store failed: {_reason(exc)}") from exc

    async def _chunks(self, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        batch: list[Manifest] = []
        for m in [*manifests, None]:
            if m is not None:
                batch.append(m)
            size = sum(x.nbytes for x in batch)
            if batch and (m is None or size >= PUT_BUDGET):
                try:
                    out.update(await self.sink.chunks(self.tenant, batch))
                except CheckpointError:
                    raise
                except Exception as exc:
                    raise CheckpointError(f"checkpoint store failed: {_reason(exc)}") from exc
                batch = []
        return out

    @property
    def warnings(self) -> tuple[str, ...]:
        """Signs that the store rolled an object back or lost one (newest last, at most 32)."""
        return self._ledger.warnings

    def _remember(self, m: Manifest, h: Header) -> None:
        self._ledger.seen(m.object_id, LedgerEntry(h.seq, m.doc_key, h.doc, h.device))

    def _verified(self, todo: Sequence[Manifest]) -> list[tuple[Manifest, Header]]:
        """Manifests whose sealed header checks out and is not older than one seen before.

        Runs before any chunk is fetched: a store can make the clear `parts` say anything.
        """
        out = []
        for m in todo:
            try:
                h = self.header(m)
            except SecurityError as exc:
                log.warning("checkpoint: object %s refused: %s", m.object_id, exc)
                continue
            if not self._ledger.is_rollback(m.object_id, h.seq, h.doc, h.device):
                out.append((m, h))
        return out

    async def restore(
        self,
        doc_names: Iterable[str] | None = None,
        *,
        changed_only: bool = False,
        include_own: bool = True,
    ) -> dict[str, list[bytes]]:
        """Every device's verified state per doc (all docs of the group by default).

        `changed_only` skips objects already returned by an earlier call (for periodic pulls).
        A tampered or incomplete object is refused with a log line naming its object id; an
        object older than one seen before, or gone, is reported in `warnings`; the other
        objects are still returned. Raises CheckpointError when the store fails.
        """
        names = None if doc_names is None else sorted(set(doc_names))
        doc_keys = None if names is None else [self.doc_key(n) for n in names]
        own = self.device_tag(self.device_id)
        out: dict[str, list[bytes]] = {}
        todo = await self._manifests(doc_keys)
        for gone in self._ledger.missing((m.object_id for m in todo), doc_keys):
            if gone.device == self.device_id:
                self.mark_dirty(gone.doc)  # write ours again
        for attempt in range(2):
            todo = [
                m
                for m in todo
                if (include_own or m.device != own)
                and not (changed_only and self._seen.get(m.object_id) == m.generation)
            ]
            checked = self._verified(todo)
            chunks = await self._chunks([m for m, _ in checked])
            retry: list[Manifest] = []
            for m, h in checked:
                try:
                    doc, state = self.open(m, chunks.get(m.object_id, []), h)
                except SecurityError as exc:
                    log.warning("checkpoint: object %s refused: %s", m.object_id, exc)
                    continue
                except CheckpointError as exc:
                    if attempt == 0:  # probably rewritten while we read: list it again
                        retry.append(m)
                    else:
                        log.warning("checkpoint: object %s refused: %s", m.object_id, exc)
                    continue
                out.setdefault(doc, []).append(state)
                self._seen[m.object_id] = m.generation
                self._names[m.doc_key] = doc
                self._remember(m, h)
            if not retry:
                break
            ids = {m.object_id for m in retry}
            fresh = await self._manifests(sorted({m.doc_key for m in retry}))
            todo = [m for m in fresh if m.object_id in ids]
        await asyncio.to_thread(self._ledger.save)
        return out

    # ---- search ----------------------------------------------------------------------------
    async def search(self, query: str, limit: int = 10) -> list[DocHit]:
        """Keyword search over searchable docs, best first, one hit per doc."""
        try:
            hits = await self.sink.search(self.tenant, query, limit)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"checkpoint search failed: {_reason(exc)}") from exc
        unknown = sorted({h.doc_key for h in hits} - set(self._names))
        if unknown:  # learn names from the sealed headers
            for m in await self._manifests(unknown):
                try:
                    self._names[m.doc_key] = self.header(m).doc
                except SecurityError:
                    continue
        best: dict[str, DocHit] = {}
        for h in hits:
            name = self._names.get(h.doc_key)
            if name is not None and (name not in best or best[name].score < h.score):
                best[name] = DocHit(name, h.score, h.snippet)
        return sorted(best.values(), key=lambda h: -h.score)[:limit]

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
