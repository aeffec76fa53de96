"""Encrypted checkpoints of whole doc states: the policy (seal, write, compact, restore, search).

`Checkpointer` decides what to write and when: it tracks which docs changed, checkpoints them
in batches (recording each doc's status), restores, searches, and runs the loops that do so
periodically with backoff. The mechanisms it composes each have a module of their own:

- `checkpoint._seal`: the object format (ids, chunks, AEAD, the checks on a manifest) and
  what a store sees in clear;
- `checkpoint._write`: one batch written so that compaction is safe (`checkpoint._cover` has
  the order and the proof), leaving about one object per doc;
- `checkpoint._restore`: reading only undominated objects and trusting nothing in clear,
  with the ledger of writes seen (`checkpoint._ledger`) catching rollbacks and losses;
- `checkpoint._catalog`: what is known of the stored objects between calls;
- `checkpoint._remote`: the sink, every failure a CheckpointError;
- `checkpoint._passages` and `checkpoint._vectors`: the search index and its embeddings.

The records and the sink contract are in `checkpoint.format` (sans-IO); sinks are opened by URL
scheme through `checkpoint.sinks`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Embedder
from ..crypto.keys import GroupKeys
from ..errors import CheckpointError
from ._catalog import Catalog
from ._ledger import Ledger
from ._passages import PassageIndex
from ._remote import Remote, reason
from ._restore import Restorer
from ._seal import Sealer
from ._vectors import VectorCache, embed
from ._write import Pending, Tally, Writer
from .format import (
    PUT_BUDGET,
    CheckpointSink,
    DocHit,
    Header,
    Manifest,
    SearchMode,
    SearchQuery,
    SinkRecord,
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
_SEARCH_MODES = ("keyword", "vector", "hybrid")


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
        self._ledger = Ledger(ledger_path)
        self._sealer = Sealer(keys, device_id, self._ledger, chunk_size=chunk_size, clock=clock)
        self.device_id = device_id
        self.sink = sink
        self.tenant = self._sealer.tenant
        self.chunk_size = chunk_size
        self._clock = clock
        self.embedder = embedder
        self.index = PassageIndex(sink, self.tenant, embedder, VectorCache(vector_file))
        self._dirty: dict[str, int] = {}
        self._seq = 0
        self._catalog = Catalog(self._sealer, admit)
        self._remote = Remote(sink, self.tenant)
        self._writer = Writer(
            self._sealer,
            self._catalog,
            self._remote,
            self._ledger,
            self.index,
            get_state,
            text_of,
            on_written,
        )
        self._restorer = Restorer(
            self._sealer, self._catalog, self._remote, self._ledger, self.mark_dirty
        )
        self._lock = asyncio.Lock()
        self.status: dict[str, CheckpointState] = {}
        self.failures = 0  # consecutive failed rounds of `run()`
        self.last_error: str | None = None
        self.progress: RestoreProgress | None = None  # of the restore under way, if any

    # ---- ids and sealing (the object format is `checkpoint._seal`'s) ------------------------
    def doc_key(self, doc: str) -> str:
        """The keyed hash that stands for `doc` in the store."""
        return self._sealer.doc_key(doc)

    def device_tag(self, device_id: str) -> str:
        """The keyed tag that stands for a device in the store."""
        return self._sealer.device_tag(device_id)

    def object_id(self, doc: str, device_id: str | None = None, generation: str = "") -> str:
        """The store id of one write of (doc, device): a UUID made of the keyed hash."""
        return self._sealer.object_id(doc, device_id, generation)

    def seal(
        self, doc: str, state: bytes, sv: bytes | None = None, ds: bytes | None = None
    ) -> SinkRecord:
        """Encrypt one doc state as a new object of this device (chunked)."""
        return self._sealer.seal(doc, state, sv, ds)

    def open(self, m: Manifest, chunks: Sequence[bytes]) -> tuple[str, bytes]:
        """Verify and decrypt one object -> (doc name, state); SecurityError if tampered."""
        return self._sealer.open(m, chunks)

    # ---- dirty tracking --------------------------------------------------------------------
    def mark_dirty(self, doc: str) -> None:
        """Record that `doc` changed since its last checkpoint."""
        self._seq += 1
        self._dirty[doc] = self._seq
        self._catalog.name(doc)

    @property
    def dirty(self) -> frozenset[str]:
        """Docs changed since their last successful checkpoint."""
        return frozenset(self._dirty)

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
            tally = Tally()
            try:
                batch: list[Pending] = []
                for name in names:
                    st = self.status.setdefault(name, CheckpointState())
                    st.last_attempt = now
                    self._catalog.name(name)
                    try:
                        batch.append(await self._writer.read(name))
                    except Exception as exc:
                        st.last_error = failed[name] = f"reading state failed: {reason(exc)}"
                        continue
                    if len(batch) >= 100 or sum(len(d.state) for d in batch) >= PUT_BUDGET:
                        done += await self._writer.write(batch, tally)
                        batch = []
                if batch:
                    done += await self._writer.write(batch, tally)
            except CheckpointError as exc:
                self.last_error = reason(exc)
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

    # ---- restore ---------------------------------------------------------------------------
    @property
    def warnings(self) -> tuple[str, ...]:
        """Signs that the store served an older write again or lost a stored state."""
        return self._ledger.warnings

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

        def report(counts: Mapping[str, int] | None) -> None:
            self.progress = None if counts is None else RestoreProgress(**counts)
            if self.progress is not None and progress is not None:
                progress(self.progress)

        return await self._restorer.restore(
            doc_names, changed_only=changed_only, include_own=include_own, report=report
        )

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
        hits = await self._remote.search(q)
        names = self._catalog.names
        unknown = sorted({h.doc_key for h in hits if h.doc_key not in names})
        if unknown:  # learn names from the sealed headers
            self._catalog.group(await self._remote.manifests(unknown))
        return [
            DocHit(name, h.text, h.score, snippet_of(h.text, query))
            for h in hits
            if (name := names.get(h.doc_key)) is not None
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
