"""The local_cache on disk: a durable per-doc update log plus compacted snapshots.

`SqliteStore` keeps everything in `cache_dir/store.sqlite3` (the engine is `store._engine`) and
does all SQLite work off the event loop: the open on the loop's default executor, everything
after it on one dedicated worker thread (`store._worker`), so the event loop never blocks on
a commit. Appends that arrive while a commit is in flight are committed together (group
commit). Compactions run in steps between other jobs (`store._compactor`).

The worker never dies silently: an exception of any kind fails the jobs it was running, and
if the thread itself must stop, every waiting and later call fails with StoreError and the
cache lock is released, so `close()` and a node's `flush()` never hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ..errors import StoreError
from ..ids import check_doc_id
from ..status import CacheRecovery
from ._compaction import COMPACT_MIN_BYTES, COMPACT_MIN_ROWS
from ._engine import CacheDb
from ._worker import StoreJob, StoreThread
from .base import SnapshotSource

__all__ = ["PRELOAD_BYTES", "SqliteStore"]

log = logging.getLogger(__name__)

# Open reads the docs' contents too, up to this many bytes in all: the node loads every doc
# right after open, and this way those loads cost no thread round trip.
PRELOAD_BYTES = 8 * 2**20


class SqliteStore:
    """The local_cache on disk: SQLite in WAL mode, driven by one worker thread.

    Open also reads the stored docs (up to `preload_bytes` in all) in the same thread hand-off,
    so a cold start costs one hand-off, not one per doc; `docs()` and the first `load()` of a
    preloaded doc answer without one. The worker thread starts with the first job after open.

    `snapshot_source(doc)` (optional, called on the event loop) returns the doc's full state
    as held in memory, covering every update appended so far; `state_vector_source(doc)` its
    state vector. With them, compaction writes that state instead of re-applying the log
    (see `store._compactor`), and after a rebuild of a damaged file the docs that lost rows
    are written again from memory. Without them, compaction applies the log to a fresh Doc,
    and lost rows are back only once peers or checkpoints re-send them.

    Damage met after open (see `store._engine`) rebuilds the file from what it still holds
    and retries the operation; `recoveries` says what each recovery found and lost.
    `failpoint` (tests) is called on the worker thread before each commit.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        compact_min_rows: int = COMPACT_MIN_ROWS,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
        snapshot_source: SnapshotSource | None = None,
        state_vector_source: Callable[[str], bytes] | None = None,
        preload_bytes: int = PRELOAD_BYTES,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.snapshot_source = snapshot_source
        self.state_vector_source = state_vector_source
        self._db = CacheDb(
            self.cache_dir,
            min_rows=compact_min_rows,
            min_bytes=compact_min_bytes,
            preload_bytes=preload_bytes,
            on_recover=self._on_recover,
        )
        self.path = self._db.path
        self._worker = StoreThread(
            self._db,
            call_soon=self._call_soon,
            has_source=lambda: self.snapshot_source is not None,
            ask=self._auto_compact,
        )
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._ready = False  # open() has finished: jobs may go to the worker
        self._started = False  # the worker thread was started
        # What open read, valid on the event-loop side until an append or a recovery.
        self._preloaded: dict[str, list[bytes]] = {}
        self._docs_at_open: list[str] | None = None

    @property
    def commits(self) -> int:
        """Append transactions committed: fewer than appends means batching."""
        return self._worker.commits

    @property
    def recovered_from(self) -> Path | None:
        """Where a corrupt cache file was last moved (at open or later), or None."""
        return self._db.recovered_from

    @property
    def recoveries(self) -> Sequence[CacheRecovery]:
        """What each recovery since open found and lost, oldest first (the last 32)."""
        return tuple(self._db.recoveries)

    @property
    def failpoint(self) -> Callable[[str], None] | None:
        """Called with the operation's name on the worker thread before each commit (tests)."""
        return self._db.failpoint

    @failpoint.setter
    def failpoint(self, fn: Callable[[str], None] | None) -> None:
        self._db.failpoint = fn

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Lock the cache dir, open (or recover) the database, read its docs."""
        if self._thread is not None:
            raise StoreError(f"local cache {self.cache_dir} is already open")
        self._loop = asyncio.get_running_loop()
        self._closed = self._ready = False
        self._worker.reset()
        self._db.recovered_from = None
        self._db.recoveries.clear()
        # The one-off open runs on the loop's default executor, usually a warm thread (the
        # node has just used it); our worker thread starts with the first job after it.
        # Starting a thread is a good part of a cold start, and next to a running open it
        # waits for the GIL for most of the open.
        self._thread = threading.Thread(
            target=self._worker.serve, name="unity-crdt-store", daemon=True
        )
        self._started = False
        opening = self._loop.run_in_executor(None, self._db.open)
        try:
            self._docs_at_open, self._preloaded = await asyncio.shield(opening)
        except BaseException:
            # A cancelled open goes on in the executor: let it finish, then give up whatever
            # it took (the lock, the file).
            await asyncio.wait([opening])
            await asyncio.to_thread(self._db.abandon)
            self._thread = None
            raise
        self._ready = True

    async def append(self, doc: str, update: bytes) -> None:
        """Add one update to `doc`'s log; returns once it is committed (fsynced)."""
        check_doc_id(doc)
        if not isinstance(update, bytes | bytearray | memoryview):
            raise TypeError(f"update must be bytes, not {type(update).__name__}")
        fut = self._submit("append", doc, bytes(update))
        self._preloaded.pop(doc, None)
        self._docs_at_open = None
        await fut

    async def load(self, doc: str) -> list[bytes]:
        """The snapshot (if any) then the log tail in order; damaged rows are left out."""
        check_doc_id(doc)
        self._check_open()
        preloaded = self._preloaded.pop(doc, None)
        if preloaded is not None:
            return preloaded
        result: list[bytes] = await self._submit("load", doc)
        return result

    async def docs(self) -> list[str]:
        """Names of the docs with stored state, sorted."""
        self._check_open()
        if self._docs_at_open is not None:
            return list(self._docs_at_open)
        result: list[str] = await self._submit("docs")
        return result

    async def compact(self, doc: str) -> None:
        """Fold `doc`'s log into its snapshot now."""
        check_doc_id(doc)
        self._check_open()
        await self._compaction_job(doc)

    async def backup(self, dest: str | Path) -> None:
        """Copy the cache to the SQLite file `dest`, holding every append submitted before
        this call: a safe backup of a live cache (a copy of its files is not)."""
        self._check_open()
        await self._submit("backup", Path(dest))

    async def close(self) -> None:
        """Commit everything queued, compact dirty docs, close the file, release the lock."""
        if self._thread is None:
            return
        if not self._ready:
            raise StoreError(f"local cache {self.cache_dir} is still opening")
        self._preloaded, self._docs_at_open = {}, None
        try:
            if self._worker.dead is None and not self._closed:
                if self.snapshot_source is not None:
                    for doc in await self._submit("close_candidates"):
                        # Queued ahead of the close, which waits for them.
                        self._compaction_job(doc).add_done_callback(self._quietly)
                await self._submit("close")
        except StoreError:
            if self._worker.dead is None:
                raise
        finally:
            await self._stop_thread()
        if self._worker.dead is not None:
            log.error(
                "local cache %s closed after its worker stopped: %r", self.path, self._worker.dead
            )

    # -- event-loop side -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._worker.dead is not None:
            raise StoreError(
                f"local cache {self.cache_dir}: the store worker stopped ({self._worker.dead!r}); "
                "nothing more can be read or written until the node restarts"
            )
        if self._thread is None or self._closed or not self._ready or self._loop is None:
            raise StoreError(f"local cache {self.cache_dir} is not open")

    def _submit(self, kind: str, *args: Any) -> asyncio.Future[Any]:
        self._check_open()
        assert self._loop is not None
        if kind == "close":
            self._closed = True
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._worker.jobs.put(StoreJob(kind, args, fut))
        if not self._started:
            assert self._thread is not None
            self._started = True
            self._thread.start()
        if self._worker.dead is not None:  # it died after the check: nobody would answer
            self._worker.fail_queued()
        return fut

    def _compaction_job(self, doc: str) -> asyncio.Future[Any]:
        """Queue a compaction of `doc`: with the state in memory, read now, when there is one."""
        state = sv = None
        if self.snapshot_source is not None:
            try:
                state = self.snapshot_source(doc)
                if state is not None and self.state_vector_source is not None:
                    sv = self.state_vector_source(doc)
            except Exception as exc:
                log.error("local cache %s: no state of doc %r to compact: %s", self.path, doc, exc)
                state = None
        if state is None:
            return self._submit("compact", doc)
        return self._submit("snapshot", doc, bytes(state), sv)

    async def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        self._closed = True
        if thread is not None and self._started:
            self._worker.jobs.put(None)
            await asyncio.to_thread(thread.join)

    def _call_soon(self, fn: Callable[[], None]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(fn)

    def _auto_compact(self, doc: str) -> None:
        # The worker asked: read the state now, on the loop, and queue it behind every append
        # submitted so far (the job queue is FIFO).
        if self._closed or self._worker.dead is not None:
            return
        try:
            fut = self._compaction_job(doc)
        except StoreError:
            return
        fut.add_done_callback(self._quietly)

    def _quietly(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.error("local cache %s: a background write failed: %s", self.path, fut.exception())

    def _on_recover(self, docs: list[str]) -> str:
        # Worker thread, mid-recovery: the re-write must run on the loop, which owns the docs.
        self._call_soon(lambda: self._refill(docs))
        if not docs:
            return "no doc in memory lost anything"
        if self.snapshot_source is None:
            return "the docs that lost rows are only in memory, with peers and in checkpoints"
        return "the docs that lost rows are re-written from the docs in memory"

    def _refill(self, docs: list[str]) -> None:
        self._docs_at_open = None
        source = self.snapshot_source
        for doc in docs:
            try:
                state = source(doc) if source is not None else None
                # Without a state: read at open and not loaded yet, still to be had here.
                blobs = [bytes(state)] if state is not None else self._preloaded.get(doc, [])
                for blob in blobs:
                    self._submit("append", doc, blob).add_done_callback(self._quietly)
            except Exception as exc:
                log.error(
                    "local cache %s: could not re-write doc %r after a recovery: %s",
                    self.path,
                    doc,
                    exc,
                )
