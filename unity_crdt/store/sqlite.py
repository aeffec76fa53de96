"""The local_cache on disk: a durable per-doc update log plus compacted snapshots.

`SqliteStore` keeps everything in `cache_dir/store.sqlite3` (the engine is `store._engine`) and
does all SQLite work off the event loop: the open on the loop's default executor, everything
after it on one dedicated worker thread, so the event loop never blocks on a commit. Appends
that arrive while a commit is in flight are committed together (group commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ..errors import StoreError
from ..ids import check_doc_id
from ._compaction import COMPACT_MIN_BYTES, COMPACT_MIN_ROWS
from ._engine import CacheDb
from .base import SnapshotSource

__all__ = ["PRELOAD_BYTES", "SqliteStore"]

log = logging.getLogger(__name__)

# Open reads the docs' contents too, up to this many bytes in all: the node loads every doc
# right after open, and this way those loads cost no thread round trip.
PRELOAD_BYTES = 8 * 2**20

_Done = tuple["_Job", Any, BaseException | None]


@dataclass
class _Job:
    kind: str
    args: tuple[Any, ...]
    fut: asyncio.Future[Any]


class SqliteStore:
    """The local_cache on disk: SQLite in WAL mode, driven by one worker thread.

    Open also reads the stored docs (up to `preload_bytes` in all) in the same thread hand-off,
    so a cold start costs one hand-off, not one per doc; `docs()` and the first `load()` of a
    preloaded doc answer without one. The worker thread starts with the first job after open.

    If SQLite finds the file corrupt after open, the file is moved aside, a fresh cache is
    opened and the operation retried on it, except `load`, which raises CorruptCacheError
    (the node logs it; that doc re-syncs from peers). The fresh cache lacks what the old file
    held: with `snapshot_source`, every doc the old file held is then asked for (on the event
    loop) and its state appended, so every update this process acknowledged (its docs in
    memory hold them all) is on disk again. Without it, those docs are back in the cache only
    once peers or checkpoints re-send them; the error log says which of the two happened.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        compact_min_rows: int = COMPACT_MIN_ROWS,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
        snapshot_source: SnapshotSource | None = None,
        preload_bytes: int = PRELOAD_BYTES,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.snapshot_source = snapshot_source
        self._db = CacheDb(
            self.cache_dir,
            min_rows=compact_min_rows,
            min_bytes=compact_min_bytes,
            preload_bytes=preload_bytes,
            on_recover=self._on_recover,
        )
        self.path = self._db.path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._ready = False  # open() has finished: jobs may go to the worker
        self._started = False  # the worker thread was started
        # What open read, valid on the event-loop side until an append or a recovery.
        self._preloaded: dict[str, list[bytes]] = {}
        self._docs_at_open: list[str] | None = None
        self.commits = 0  # append transactions committed: fewer than appends means batching

    @property
    def recovered_from(self) -> Path | None:
        """Where a corrupt cache file was last moved (at open or later), or None."""
        return self._db.recovered_from

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
        self._db.recovered_from = None
        self._jobs = queue.SimpleQueue()
        # The one-off open runs on the loop's default executor, usually a warm thread (the
        # node has just used it); our worker thread starts with the first job after it.
        # Starting a thread is a good part of a cold start, and next to a running open it
        # waits for the GIL for most of the open.
        self._thread = threading.Thread(target=self._serve, name="unity-crdt-store", daemon=True)
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
        """The snapshot (if any) then the log tail in order; damaged rows are skipped."""
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
        await self._submit("compact", doc)

    async def close(self) -> None:
        """Commit everything queued, compact dirty docs, close the file, release the lock."""
        if self._thread is None:
            return
        if not self._ready:
            raise StoreError(f"local cache {self.cache_dir} is still opening")
        self._preloaded, self._docs_at_open = {}, None
        try:
            await self._submit("close")
        finally:
            await self._stop_thread()

    # -- event-loop side -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._thread is None or self._closed or not self._ready or self._loop is None:
            raise StoreError(f"local cache {self.cache_dir} is not open")

    def _submit(self, kind: str, *args: Any) -> asyncio.Future[Any]:
        self._check_open()
        assert self._loop is not None
        if kind == "close":
            self._closed = True
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._jobs.put(_Job(kind, args, fut))
        if not self._started:
            assert self._thread is not None
            self._started = True
            self._thread.start()
        return fut

    async def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        self._closed = True
        if thread is not None and self._started:
            self._jobs.put(None)
            await asyncio.to_thread(thread.join)

    def _call_soon(self, fn: Callable[[], None]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(fn)

    def _on_recover(self, docs: list[str]) -> str:
        # Worker thread, mid-recovery: the re-write must run on the loop, which owns the docs.
        self._call_soon(lambda: self._refill(docs))
        if self.snapshot_source is None:
            return "are only in memory, with peers and in checkpoints until they re-sync"
        return "are re-written from the docs in memory"

    def _refill(self, docs: list[str]) -> None:
        self._preloaded, self._docs_at_open = {}, None
        source = self.snapshot_source
        if source is None:
            return
        for doc in docs:
            try:
                state = source(doc)
                if state is not None:
                    fut = self._submit("append", doc, bytes(state))
                    fut.add_done_callback(functools.partial(self._refilled, doc))
            except Exception as exc:
                log.error(
                    "local cache %s: could not re-write doc %r after a recovery: %s",
                    self.path,
                    doc,
                    exc,
                )

    def _refilled(self, doc: str, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.error(
                "local cache %s: could not re-write doc %r after a recovery: %s",
                self.path,
                doc,
                fut.exception(),
            )

    # -- worker thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                self._db.abandon()  # no-op unless close() failed or open() was cancelled
                return
            batch = [first]
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)
                    break
                batch.append(job)
            done: list[_Done] = []
            appends: list[_Job] = []
            for job in batch:
                if job.kind == "append" and self._db.is_open:
                    appends.append(job)
                    continue
                if appends:
                    done += self._commit(appends)
                    appends = []
                done.append(self._run(job))
            if appends:
                done += self._commit(appends)
            self._settle(done)
            if self._db.is_open:
                self._db.auto_compact()

    def _run(self, job: _Job) -> _Done:
        try:
            if not self._db.is_open:
                raise StoreError(f"local cache {self.cache_dir} is not open")
            handler: Callable[..., Any] = getattr(self._db, job.kind)
            return job, handler(*job.args), None
        except sqlite3.Error as exc:
            return job, None, StoreError(f"local cache {self.path}: {job.kind} failed: {exc}")
        except Exception as exc:
            return job, None, exc

    def _commit(self, jobs: list[_Job]) -> list[_Done]:
        try:
            self._db.insert([(doc, data) for doc, data in (job.args for job in jobs)])
        except (sqlite3.Error, StoreError) as exc:
            err = StoreError(f"could not write to local cache {self.path}: {exc}")
            return [(job, None, err) for job in jobs]
        self.commits += 1
        return [(job, None, None) for job in jobs]

    def _settle(self, done: list[_Done]) -> None:
        def apply() -> None:
            for job, result, exc in done:
                if job.fut.done():
                    continue  # the caller was cancelled; the write may still have happened
                if exc is not None:
                    job.fut.set_exception(exc)
                else:
                    job.fut.set_result(result)

        self._call_soon(apply)
