"""Where each doc lives in the cache file, built from what the open read (`_scan`).

The engine reads and writes by rowid only, never through an index (the file has none), so
this index in memory is the truth about the file between scans: every write of the engine and
of the compactor keeps it in step, and every scan (at open, after a rebuild) rebuilds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ._compaction import should_compact
from ._scan import Bad, ScanResult

__all__ = ["DocRows", "FileIndex", "index_docs"]


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


class FileIndex:
    """Every doc's rows and snapshot parts, the docs appended to lately, and the next ids."""

    def __init__(self) -> None:
        self.docs: dict[str, DocRows] = {}
        self.next_id = 1
        self.next_part_id = 1
        self.next_gen = 1
        self.orphans: list[int] = []  # parts of a generation never finished, to delete
        self._touched: set[str] = set()

    def rebuild(self, found: ScanResult, building: int = 0) -> list[int]:
        """Index what a scan found; return superseded snapshot parts to delete."""
        self.docs, stale = index_docs(found, building)
        self.orphans = []
        self._touched = set(self.docs)
        ids = [0] + [r.id for r in found.rows] + [b.id for b in found.bad if b.table == "log"]
        self.next_id = max(ids) + 1
        all_parts = [p.id for p in found.parts] + [b.id for b in found.bad]
        self.next_part_id = max([0, *all_parts]) + 1
        self.next_gen = max([0, *(p.gen for p in found.parts)]) + 1
        return stale

    def names(self) -> list[str]:
        """Names of the docs with stored state, sorted."""
        return sorted(doc for doc, d in self.docs.items() if d.log or d.parts)

    def appended(self, rows: Iterable[tuple[int, str, int]]) -> None:
        """Note log rows (rowid, doc, size) just committed."""
        for rowid, doc, size in rows:
            d = self.docs.setdefault(doc, DocRows())
            d.log[rowid] = size
            d.log_bytes += size
            d.dirty = True
            self._touched.add(doc)

    def touched(self, min_rows: int, min_bytes: int) -> list[str]:
        """Docs appended to since the last call whose log now calls for a compaction."""
        out = []
        for doc in self._touched:
            d = self.docs.get(doc)
            if d is not None and should_compact(
                len(d.log), d.log_bytes, d.snapshot_bytes, min_rows, min_bytes
            ):
                out.append(doc)
        self._touched = set()
        return out

    def close_candidates(self, min_rows: int) -> list[str]:
        """Docs written since their last compaction with at least `min_rows` log rows."""
        return sorted(doc for doc, d in self.docs.items() if d.dirty and len(d.log) >= min_rows)
