"""The sink as the checkpoint policy calls it: one tenant, and every failure a CheckpointError.

Separate so that writing, restoring and searching share one rule for a sink that breaks its
contract (raises anything else): the node stays alive, and the error names the step that
failed ("checkpoint store failed: ...").
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TypeVar

from ..errors import CheckpointError
from .format import CheckpointSink, Manifest, SearchHit, SearchQuery, SinkRecord

__all__ = ["Remote", "reason"]

_T = TypeVar("_T")


def reason(exc: BaseException) -> str:
    """An exception as a one-line reason (its type when it says nothing)."""
    return str(exc) or type(exc).__name__


async def _guarded(what: str, call: Awaitable[_T]) -> _T:
    try:
        return await call
    except CheckpointError:
        raise
    except Exception as exc:  # a sink broke its contract; keep the node alive anyway
        raise CheckpointError(f"checkpoint {what} failed: {reason(exc)}") from exc


class Remote:
    """One tenant's objects in a CheckpointSink; each call raises only CheckpointError."""

    def __init__(self, sink: CheckpointSink, tenant: str) -> None:
        self.sink = sink
        self.tenant = tenant

    async def manifests(self, doc_keys: Sequence[str] | None) -> list[Manifest]:
        """The manifests of `doc_keys` (None: of every doc)."""
        return await _guarded("store", self.sink.manifests(self.tenant, doc_keys))

    async def confirm(self, manifests: Sequence[Manifest]) -> set[str]:
        """The object ids among `manifests` the store holds now."""
        return await _guarded("confirm", self.sink.confirm(self.tenant, manifests))

    async def put(self, records: Sequence[SinkRecord]) -> None:
        """Store new objects."""
        await _guarded("store", self.sink.put(self.tenant, records))

    async def chunks(self, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        """object_id -> its chunks in index order."""
        return await _guarded("store", self.sink.chunks(self.tenant, manifests))

    async def delete(self, manifests: Sequence[Manifest]) -> None:
        """Delete objects (pruning)."""
        await _guarded("prune", self.sink.delete(self.tenant, manifests))

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        """The stored passages that best match `query`."""
        return await _guarded("search", self.sink.search(self.tenant, query))
