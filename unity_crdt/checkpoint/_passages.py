"""The search index of searchable docs: their passages in clear, with vectors, kept in step.

Passages are content-addressed (doc key + hash of the text), so writing one twice is harmless
and only passages whose text changed are written or embedded. Who may delete: a writer whose
checkpoint holds every stored state of the doc (it *dominates*) sets the doc's passages to its
own view; any other writer only adds. Concurrent writers may thus briefly leave an old
passage findable; the next dominating checkpoint (after the states merged) settles it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Embedder
from ._vectors import VectorCache
from .format import CheckpointSink, Passage, passage_hash, split_passages

__all__ = ["IndexUpdate", "PassageIndex"]


@dataclass(frozen=True)
class IndexUpdate:
    """One doc's view after a checkpoint: its text (None: not searchable here), and whether
    the checkpoint dominates every stored state of the doc."""

    doc_key: str
    text: str | None
    authoritative: bool


class PassageIndex:
    """Keeps a tenant's passages equal to the latest dominating view of each doc."""

    def __init__(
        self,
        sink: CheckpointSink,
        tenant: str,
        embedder: Embedder | None = None,
        vectors: VectorCache | None = None,
    ) -> None:
        self.sink = sink
        self.tenant = tenant
        self.embedder = embedder
        self.vectors = vectors if vectors is not None else VectorCache(None)

    async def sync(self, updates: Sequence[IndexUpdate]) -> tuple[int, int]:
        """Write new passages and drop stale ones -> (passages added, passages removed)."""
        todo = [u for u in updates if u.text is not None or u.authoritative]
        if not todo:
            return 0, 0
        stored = await self.sink.passage_ids(self.tenant, sorted({u.doc_key for u in todo}))
        new: list[tuple[str, str, str]] = []
        remove: dict[str, list[str]] = {}
        for u in todo:
            have = stored.get(u.doc_key, set())
            mine = {passage_hash(t): t for t in split_passages(u.text or "")}
            new += [(u.doc_key, pid, text) for pid, text in mine.items() if pid not in have]
            if u.authoritative and (gone := sorted(have - mine.keys())):
                remove[u.doc_key] = gone
        vectors: list[tuple[float, ...]] | list[None] = [None] * len(new)
        if new and self.embedder is not None:
            vectors = await self.vectors.vectors(self.embedder, [text for _, _, text in new])
        add = [Passage(k, pid, text, vec) for (k, pid, text), vec in zip(new, vectors, strict=True)]
        if add or remove:
            await self.sink.put_passages(self.tenant, add, remove)
        return len(add), sum(map(len, remove.values()))
