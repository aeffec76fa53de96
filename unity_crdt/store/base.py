"""The local-cache contract: what the node needs from any store (see `testing.check_store`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from ..status import CacheRecovery

__all__ = ["SnapshotSource", "Store"]

SnapshotSource = Callable[[str], bytes | None]
"""Given a doc name, its full state as one update (or None); called on the event loop.

The state must hold every update appended for that doc so far (a node's replica does: it
appends only what it has applied), since compaction deletes the log rows it covers."""


class Store(Protocol):
    """The local_cache contract every backend meets (see `unity_crdt.testing.check_store`)."""

    @property
    def recovered_from(self) -> Path | None:
        """Where a corrupt cache was moved (at open or later), or None."""
        ...

    @property
    def recoveries(self) -> Sequence[CacheRecovery]:
        """What each recovery of damaged data since open found and lost, oldest first."""
        ...

    async def open(self) -> None:
        """Open (and lock) the cache."""
        ...

    async def append(self, doc: str, update: bytes) -> None:
        """Add one update to a doc's log; durable once this returns."""
        ...

    async def load(self, doc: str) -> list[bytes]:
        """The doc's snapshot (if any) then its log tail, in order; [] for an unknown doc."""
        ...

    async def docs(self) -> list[str]:
        """Names of the docs that have stored state, sorted."""
        ...

    async def compact(self, doc: str) -> None:
        """Fold the doc's log into its snapshot now."""
        ...

    async def close(self) -> None:
        """Flush everything and release the cache."""
        ...

    async def __aenter__(self) -> Self:
        """Open the store."""
        ...

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the store."""
        ...
