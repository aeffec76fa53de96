"""Where each doc lives in the cache file, built from what the open read (`_scan`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._scan import Bad, ScanResult

__all__ = ["DocRows", "index_docs"]


@dataclass
class DocRows:
    """Where one doc lives in the file: its log rowids and its current snapshot's parts."""

    log: dict[int, int] = field(default_factory=dict)  # rowid -> size, in rowid order
    log_bytes: int = 0
    gen: int = -1  # the snapshot generation in use (-1: none)
    parts: list[tuple[int, int]] = field(default_factory=list)  # (rowid, size) in order
    dirty: bool = False  # written since its last compaction

    @property
    def snapshot_bytes(self) -> int:
        """The size of the snapshot in use."""
        return sum(size for _, size in self.parts)


def index_docs(found: ScanResult, building: int) -> tuple[dict[str, DocRows], list[int]]:
    """Each doc's rows and current snapshot; and the parts of superseded generations (or of
    `building`, a compaction cut short) to delete.

    A doc's snapshot is its newest complete generation. An incomplete one that is neither
    superseded nor the one being built lost a part: its parts are added to `found.bad`.
    """
    docs: dict[str, DocRows] = {}
    for row in found.rows:
        d = docs.setdefault(row.doc, DocRows())
        d.log[row.id] = row.size
        d.log_bytes += row.size
        d.dirty = True
    gens: dict[str, dict[int, list[Any]]] = {}
    for p in found.parts:
        gens.setdefault(p.doc, {}).setdefault(p.gen, []).append(p)
    stale: list[int] = []
    for doc, by_gen in gens.items():
        choices = sorted(by_gen.items(), reverse=True)
        complete = [c for c in choices if _complete(c[1])]
        chosen = complete[0] if complete else None
        for gen, parts in choices:
            if chosen is not None and gen == chosen[0]:
                continue
            if chosen is not None or gen == building:  # superseded, or cut short
                stale += [p.id for p in parts]
            else:  # no whole snapshot left: the doc lost it
                found.bad += [
                    Bad("snapshot", p.id, doc, f"generation {gen} lacks parts") for p in parts
                ]
        if chosen is not None:
            d = docs.setdefault(doc, DocRows())
            d.gen = chosen[0]
            d.parts = [(p.id, p.size) for p in sorted(chosen[1], key=lambda p: p.part)]
    return docs, stale


def _complete(parts: list[Any]) -> bool:
    n = parts[0].parts
    return all(p.parts == n for p in parts) and sorted(p.part for p in parts) == list(range(n))
