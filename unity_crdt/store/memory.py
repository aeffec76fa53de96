"""`MemoryStore`: the Store contract in memory, for sans-IO tests and throwaway nodes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from ..errors import StoreError
from ..ids import check_doc_id
from ..status import CacheRecovery
from ._compaction import COMPACT_MIN_BYTES, COMPACT_MIN_ROWS, compact_updates, should_compact

__all__ = ["MemoryStore"]


class MemoryStore:
    """The Store contract in memory, for sans-IO tests; contents survive close and reopen."""

    def __init__(
        self,
        *,
        compact_min_rows: int = COMPACT_MIN_ROWS,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        self._snapshots: dict[str, bytes] = {}
        self._logs: dict[str, list[bytes]] = {}
        self._min_rows = compact_min_rows
        self._min_bytes = compact_min_bytes
        self._open = False

    @property
    def recovered_from(self) -> Path | None:
        """Always None: memory cannot be corrupt on disk."""
        return None

    @property
    def recoveries(self) -> Sequence[CacheRecovery]:
        """Always empty: nothing to recover."""
        return ()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Mark the store open."""
        if self._open:
            raise StoreError("memory store is already open")
        self._open = True

    async def append(self, doc: str, update: bytes) -> None:
        """Add one update to `doc`'s log."""
        self._check(doc)
        if not isinstance(update, bytes | bytearray | memoryview):
            raise TypeError(f"update must be bytes, not {type(update).__name__}")
        rows = self._logs.setdefault(doc, [])
        rows.append(bytes(update))
        size = sum(len(r) for r in rows)
        if should_compact(
            len(rows), size, len(self._snapshots.get(doc, b"")), self._min_rows, self._min_bytes
        ):
            self._compact(doc)

    async def load(self, doc: str) -> list[bytes]:
        """The snapshot (if any) then the log, in order."""
        self._check(doc)
        head = [self._snapshots[doc]] if doc in self._snapshots else []
        return head + list(self._logs.get(doc, []))

    async def docs(self) -> list[str]:
        """Names of the docs with stored state, sorted."""
        self._check(None)
        return sorted(set(self._snapshots) | {d for d, rows in self._logs.items() if rows})

    async def compact(self, doc: str) -> None:
        """Fold `doc`'s log into its snapshot."""
        self._check(doc)
        self._compact(doc)

    async def close(self) -> None:
        """Mark the store closed (the contents stay, for a later reopen)."""
        self._open = False

    def _check(self, doc: str | None) -> None:
        if not self._open:
            raise StoreError("memory store is not open")
        if doc is not None:
            check_doc_id(doc)

    def _compact(self, doc: str) -> None:
        rows = self._logs.get(doc, [])
        if rows:
            state, keep = compact_updates(self._snapshots.get(doc), rows)
            self._snapshots[doc] = state
            self._logs[doc] = [rows[i] for i in keep]
