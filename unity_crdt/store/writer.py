"""`CacheWriter`: a node's updates on their way into its local cache, and the truth about
whether they got there.

Every committed update is appended to the store as its own row. An append that fails (a full
disk, an I/O error) leaves a gap in that doc's update chain: later rows of the same client
depend on the lost one and would stay pending forever after a restart. So a failed doc is
marked *unsaved*, and once writes work again its **full state** (from memory) is appended,
which covers the lost row and everything before it. That repair is retried in the
background with a growing delay, and tried once more by every `flush()`, which raises
StoreError while any doc is still unsaved: a `flush()` that returns means every edit made
before it is on disk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import StoreError
from ..status import CacheStatus
from .base import SnapshotSource, Store

__all__ = ["RETRY_MAX", "RETRY_MIN", "CacheWriter"]

log = logging.getLogger(__name__)

RETRY_MIN = 0.5  # seconds before the first background repair; doubles up to RETRY_MAX
RETRY_MAX = 30.0

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class CacheWriter:
    """Appends a node's committed updates to its Store and answers for their durability.

    `state_of(doc)` gives the doc's full state from memory (None if it has none); `spawn`
    starts the background repair as a task its owner supervises.
    """

    def __init__(
        self,
        store: Store,
        state_of: SnapshotSource,
        spawn: Spawn,
        *,
        retry_min: float = RETRY_MIN,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self._store = store
        self._state_of = state_of
        self._spawn = spawn
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._pending: set[asyncio.Future[None]] = set()
        # Unsaved docs -> a count bumped at every failure, so a repair that read the state
        # before a newer failure does not clear that one.
        self._unsaved: dict[str, int] = {}
        self._error: str | None = None
        self._failed = 0
        self._repairing = asyncio.Lock()
        self._retry: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Appends submitted and not yet answered."""
        return len(self._pending)

    def persist(self, doc: str, update: bytes) -> None:
        """Append `update` to `doc`'s log in the background (a failure is remembered)."""
        fut = asyncio.ensure_future(self._store.append(doc, update))
        self._pending.add(fut)

        def done(f: asyncio.Future[None]) -> None:
            self._pending.discard(f)
            if f.cancelled():
                self._failure(doc, StoreError("the write was cancelled"))
            elif f.exception() is not None:
                exc = f.exception()
                assert exc is not None
                self._failure(doc, exc)

        fut.add_done_callback(done)

    async def flush(self) -> None:
        """Wait for every append so far; repair unsaved docs; StoreError if any still is."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        if self._unsaved:
            await self._repair()
        if self._unsaved:
            docs = sorted(self._unsaved)
            shown = ", ".join(repr(d) for d in docs[:10]) + (" ..." if len(docs) > 10 else "")
            raise StoreError(
                f"edits of {len(docs)} doc(s) were not written to the local cache ({shown}): "
                f"{self._error}; they are kept in memory and written as soon as the cache "
                "accepts writes again"
            )

    def status(self) -> CacheStatus:
        """Write health plus what the store's recoveries found."""
        # A store written against the older contract may lack `recoveries`: report none.
        recoveries = getattr(self._store, "recoveries", ())
        return CacheStatus(
            store_error=self._error if self._unsaved else None,
            unsaved_docs=tuple(sorted(self._unsaved)),
            failed_writes=self._failed,
            recoveries=len(recoveries),
            last_recovery=recoveries[-1] if recoveries else None,
        )

    def close(self) -> None:
        """Stop retrying in the background (a last `flush()` may still repair)."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()

    # -- internals ---------------------------------------------------------------------------

    def _failure(self, doc: str, exc: BaseException) -> None:
        first = not self._unsaved
        self._unsaved[doc] = self._unsaved.get(doc, 0) + 1
        self._error = str(exc)
        self._failed += 1
        if first:
            log.error(
                "could not write to the local cache: %s; the edits stay in memory and are "
                "written again as soon as it works (retrying)",
                exc,
            )
        if self._retry is None and not self._closed:
            self._retry = self._spawn(self._retry_loop(), "local cache repair")

    async def _retry_loop(self) -> None:
        delay = self._retry_min
        try:
            while self._unsaved and not self._closed:
                await asyncio.sleep(delay)
                await self._repair()
                delay = min(delay * 2, self._retry_max)
        finally:
            self._retry = None

    async def _repair(self) -> None:
        """Append the full state of every unsaved doc: it covers whatever failed before."""
        async with self._repairing:
            for doc, count in list(self._unsaved.items()):
                try:
                    state = self._state_of(doc)
                    if state is not None:
                        await self._store.append(doc, state)
                except Exception as exc:
                    self._error = str(exc)
                    self._failed += 1
                    continue
                if state is None:
                    log.error("doc %r has no state in memory to write again; dropped", doc)
                if self._unsaved.get(doc) == count:
                    del self._unsaved[doc]
            if not self._unsaved and self._error is not None:
                log.warning("the local cache accepts writes again; every unsaved doc written")
                self._error = None
