"""The store's worker thread: the only thread that touches the cache file after open.

Separate from `store.sqlite` (the event-loop side: the public calls, the queue they feed, the
futures they await) because everything here runs on the other side of that queue. The worker
takes whatever jobs are queued as one batch and commits the appends among them in one
transaction (group commit); between batches it runs one step of the oldest compaction under
way (`store._compactor`), so folding a big doc never holds up writes for long. Every result
goes back to the event loop through `call_soon`, which settles the job's future there.

The worker never dies silently: an exception of any kind fails the jobs it was running, and
if the thread itself must stop (`dead`), every waiting and later job fails with StoreError and
the cache lock is released, so a `close()` or a node's `flush()` never hangs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import StoreError
from ._compactor import Compaction, steps
from ._engine import CacheDb
from ._schema import is_damage

__all__ = ["StoreJob", "StoreThread"]

# The store's lines keep the logger name they always had.
log = logging.getLogger("unity_crdt.store.sqlite")

_MAX_ATTEMPTS = 3  # a compaction restarted by this many rebuilds gives up

_Done = tuple["StoreJob", Any, BaseException | None]
_DEFERRED = object()  # a compaction job: its future is settled when the compaction ends


@dataclass
class StoreJob:
    """One call of the store, queued for the worker: what, its arguments, who waits."""

    kind: str
    args: tuple[Any, ...]
    fut: asyncio.Future[Any]


class StoreThread:
    """Runs the queued jobs against `db` (see the module).

    `call_soon(fn)` runs `fn` on the event loop; `has_source()` says whether the store has a
    snapshot source (then compactions are asked of the loop with `ask(doc)`, which queues the
    state read there; without one they apply the log here).
    """

    def __init__(
        self,
        db: CacheDb,
        *,
        call_soon: Callable[[Callable[[], None]], None],
        has_source: Callable[[], bool],
        ask: Callable[[str], None],
    ) -> None:
        self._db = db
        self._call_soon = call_soon
        self._has_source = has_source
        self._ask = ask
        self.jobs: queue.SimpleQueue[StoreJob | None] = queue.SimpleQueue()
        self.dead: BaseException | None = None  # why the worker thread stopped
        # Compactions under way (one step each per turn), docs asked for.
        self._compactions: collections.deque[Compaction] = collections.deque()
        self._requested: set[str] = set()
        self.commits = 0  # append transactions committed: fewer than appends means batching

    def reset(self) -> None:
        """Start afresh for a new open: an empty queue, alive, no compaction under way."""
        self.jobs = queue.SimpleQueue()
        self.dead = None
        self._compactions.clear()
        self._requested.clear()

    def serve(self) -> None:
        """The thread's body: run jobs until the stop sentinel (None) or death."""
        batch: list[StoreJob] = []
        try:
            while True:
                taken = self._take(block=not self._compactions)
                if taken is None:
                    self._db.abandon()  # no-op unless close() failed or open() was cancelled
                    return
                batch = taken
                self._settle(self._process(batch))
                batch = []
                if self._db.is_open:
                    self._step()
                    self._request()
        except BaseException as exc:
            self._die(exc, batch)

    def _take(self, block: bool) -> list[StoreJob] | None:
        try:
            first = self.jobs.get() if block else self.jobs.get_nowait()
        except queue.Empty:
            return []
        if first is None:
            return None
        batch = [first]
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            batch.append(job)
        return batch

    def _process(self, batch: list[StoreJob]) -> list[_Done]:
        done: list[_Done] = []
        appends: list[StoreJob] = []
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
        return done

    def _run(self, job: StoreJob) -> _Done:
        try:
            db = self._db
            if not db.is_open:
                raise StoreError(f"local cache {self._db.cache_dir} is not open")
            if job.kind in ("snapshot", "compact"):
                doc = job.args[0]
                d = db.index.docs.get(doc)
                covered = list(d.log) if d is not None else []
                state, sv = (job.args[1], job.args[2]) if job.kind == "snapshot" else (None, None)
                self._compactions.append(Compaction(doc, state, sv, covered, [job.fut]))
                self._requested.add(doc)
                return job, _DEFERRED, None
            if job.kind == "close":
                self._close_db()
                return job, None, None
            if job.kind == "close_candidates":
                return job, db.close_candidates(), None
            handler: Callable[..., Any] = getattr(db, job.kind)
            return job, handler(*job.args), None
        except sqlite3.Error as exc:
            return job, None, StoreError(f"local cache {self._db.path}: {job.kind} failed: {exc}")
        except Exception as exc:
            return job, None, exc

    def _commit(self, jobs: list[StoreJob]) -> list[_Done]:
        try:
            self._db.insert([(doc, data) for doc, data in (job.args for job in jobs)])
        except Exception as exc:
            err = StoreError(f"could not write to local cache {self._db.path}: {exc}")
            return [(job, None, err) for job in jobs]
        self.commits += 1
        return [(job, None, None) for job in jobs]

    def _step(self) -> None:
        """Run one step of the oldest compaction under way."""
        if not self._compactions:
            return
        job, db = self._compactions[0], self._db
        if job.running is None or job.rebuilds != db.rebuilds:  # new, or the file was rebuilt
            if job.attempts >= _MAX_ATTEMPTS:
                self._finish(job, StoreError(f"compaction of doc {job.doc!r} kept meeting damage"))
                return
            job.attempts += 1
            job.rebuilds = db.rebuilds
            job.running = steps(db, job)
        try:
            next(job.running)
        except StopIteration:
            self._finish(job, None)
        except Exception as exc:
            if is_damage(exc) and db.is_open:
                try:
                    db.recover("compact", exc)  # the next step starts the compaction again
                except Exception as again:
                    self._finish(job, again)
                return
            self._finish(job, exc)

    def _finish(self, job: Compaction, exc: BaseException | None) -> None:
        self._compactions.remove(job)
        self._requested.discard(job.doc)
        if exc is not None and not isinstance(exc, StoreError):
            exc = StoreError(
                f"local cache {self._db.path}: compaction of {job.doc!r} failed: {exc}"
            )
        if exc is not None and not job.waiters:
            log.error("%s", exc)
        for fut in job.waiters:
            self._settle([(StoreJob("compact", (), fut), None, exc)])

    def _request(self) -> None:
        for doc in self._db.touched():
            if doc in self._requested:
                continue
            self._requested.add(doc)
            if not self._has_source():
                d = self._db.index.docs.get(doc)
                self._compactions.append(Compaction(doc, None, None, list(d.log) if d else []))
            else:
                self._call_soon(lambda doc=doc: self._ask(doc))  # type: ignore[misc]

    def _close_db(self) -> None:
        """Finish every compaction under way, then (without a source) compact the docs that
        want it by applying their logs, then close the file."""
        db = self._db
        try:
            while self._compactions:
                self._step()
            if not self._has_source():  # after those: they may leave a tail
                for doc in db.close_candidates():
                    self._compactions.append(Compaction(doc, None))
                while self._compactions:
                    self._step()
        finally:
            db.close()

    def _settle(self, done: list[_Done]) -> None:
        done = [d for d in done if d[1] is not _DEFERRED]
        if not done:
            return

        def apply() -> None:
            for job, result, exc in done:
                if job.fut.done():
                    continue  # the caller was cancelled; the write may still have happened
                if exc is not None:
                    job.fut.set_exception(exc)
                else:
                    job.fut.set_result(result)

        self._call_soon(apply)

    def _die(self, exc: BaseException, batch: list[StoreJob]) -> None:
        """The worker thread must stop: fail every job it holds or will be given."""
        self.dead = exc
        log.error("local cache %s: the store worker stopped: %r", self._db.path, exc)
        err = StoreError(
            f"local cache {self._db.cache_dir}: the store worker stopped ({exc!r}); nothing "
            "more can be written until the node restarts"
        )
        self._settle([(job, None, err) for job in batch])
        for c in list(self._compactions):
            self._settle([(StoreJob("compact", (), fut), None, err) for fut in c.waiters])
        self._compactions.clear()
        self.fail_queued()
        with contextlib.suppress(Exception):
            self._db.abandon()

    def fail_queued(self) -> None:
        """Fail every job still queued (the worker is dead: nobody would answer)."""
        err = StoreError(
            f"local cache {self._db.cache_dir}: the store worker stopped ({self.dead!r})"
        )
        failed: list[_Done] = []
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                failed.append((job, None, err))
        self._settle(failed)
