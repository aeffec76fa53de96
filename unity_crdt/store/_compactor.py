"""Compaction in small steps, so folding a big doc never holds up other writes for long.

A compaction writes a doc's full state as a new snapshot *generation*, split into parts of
`SNAPSHOT_PART` bytes, one transaction per part; the worker runs other jobs (appends) between
steps. The transaction writing the last part completes the generation, which is the switch:
from then on the doc reads the new snapshot. Later steps delete the superseded parts and the
log rows the snapshot covers, a few at a time, then give free pages back to the file system
(incremental vacuum). A crash at any step leaves a readable doc: before the switch the old
snapshot and every log row are still there; after it, leftovers are merely redundant (the
next open drops superseded parts; covered rows load harmlessly until the next compaction).

Where the state comes from:

* From the node (`SnapshotSource`): the replica's full state, read on the event loop and
  queued behind every append submitted before it (the job queue is FIFO). So every log row
  in the file when the job is dequeued was submitted before the state was read, and the
  state covers it, except items still pending in the replica (their dependencies never
  arrived): `still_needed` finds those rows and they stay. No log is re-applied.
* Without a source (a bare store): the snapshot and log are applied to a fresh Doc here, in
  one step, as before (`_compaction.compact_updates`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pycrdt

from ._compaction import compact_updates, part_crc, still_needed
from ._engine import CacheDb
from ._index import DocRows

__all__ = ["SNAPSHOT_PART", "Compaction", "steps"]

log = logging.getLogger(__name__)

SNAPSHOT_PART = 2**20  # one part per transaction: a ~1 MiB commit holds other writes ~10 ms
_DELETE_ROWS = 512  # covered log rows deleted per transaction
_VACUUM_PAGES = 1024  # free pages given back per step (4 MiB)
_INSERT_PART = (
    "INSERT INTO snapshot (id, doc, gen, part, parts, crc, data) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


@dataclass
class Compaction:
    """One doc's compaction: its inputs, who waits for it, and where its steps are."""

    doc: str
    state: bytes | None  # None: apply the log (no snapshot source)
    state_vector: bytes | None = None
    covered: list[int] = field(default_factory=list)  # log rows present when it was queued
    waiters: list[Any] = field(default_factory=list)
    running: Iterator[None] | None = None
    rebuilds: int = -1  # the engine's rebuild count its steps were made under
    attempts: int = 0


def steps(db: CacheDb, job: Compaction) -> Iterator[None]:
    """The compaction as a series of transactions; the caller runs one per `next()`."""
    doc = job.doc
    d = db.index.docs.get(doc)
    if d is None or not d.log:
        return
    if job.state is None:
        snapshot = db.read_snapshot(doc)
        ids = list(d.log)
        rows = db.read_rows(doc, ids)
        ordered = [(i, rows[i]) for i in ids if i in rows]
        state, keep_at = compact_updates(snapshot, [data for _, data in ordered])
        covered = [i for i, _ in ordered]
        keep: set[int] | None = {ordered[k][0] for k in keep_at}
    else:
        state = job.state
        covered = [i for i in job.covered if i in d.log]
        keep = None
    if db.index.orphans:  # a compaction that failed and could not clean up after itself
        db.write(
            "compact", "DELETE FROM snapshot WHERE id = ?", [(i,) for i in db.index.orphans], 0
        )
        db.index.orphans = []
    gen = db.index.next_gen
    db.index.next_gen += 1
    raw = doc.encode()
    chunks = [state[i : i + SNAPSHOT_PART] for i in range(0, len(state), SNAPSHOT_PART)] or [b""]
    written: list[tuple[int, int]] = []
    try:
        for index, chunk in enumerate(chunks):
            if index == len(chunks) - 1 and keep is None:
                sv = job.state_vector if job.state_vector is not None else pycrdt.get_state(state)
                rows = db.read_rows(doc, covered)
                keep = {i for i, data in rows.items() if still_needed(data, sv)}
            pid = db.index.next_part_id
            db.index.next_part_id += 1
            crc = part_crc(raw, gen, index, len(chunks), chunk)
            # The last part completes the generation: the switch to the new snapshot. Until
            # then the file says which generation is being built (a crash leaves it unused).
            last = index == len(chunks) - 1
            part = [(pid, doc, gen, index, len(chunks), crc, chunk)]
            db.write("snapshot", _INSERT_PART, part, building=0 if last else gen)
            written.append((pid, len(chunk)))
            if index < len(chunks) - 1:
                yield
    except BaseException:
        _drop_parts(db, [pid for pid, _ in written])
        raise
    assert keep is not None
    d = db.index.docs.setdefault(doc, DocRows())
    superseded = [pid for pid, _ in d.parts]
    d.gen, d.parts = gen, written
    drop = [(i, d.log.pop(i)) for i in covered if i not in keep and i in d.log]
    d.log_bytes -= sum(size for _, size in drop)
    seen = set(covered)
    d.dirty = any(i not in seen for i in d.log)  # rows appended while this ran
    if keep:
        log.warning(
            "local cache %s: doc %r has %d updates whose dependencies are missing; kept "
            "them in the log",
            db.path,
            doc,
            len(keep),
        )
    yield
    for pid in superseded:  # a part each: deleting one rewrites (zeroes) its pages
        db.write("compact", "DELETE FROM snapshot WHERE id = ?", [(pid,)])
        yield
    batch: list[tuple[int]] = []
    size = 0
    for rowid, row_size in drop:  # deleting zeroes the pages (secure_delete): ~1 MiB a step
        batch.append((rowid,))
        size += row_size
        if len(batch) >= _DELETE_ROWS or size >= SNAPSHOT_PART:
            db.write("compact", "DELETE FROM log WHERE id = ?", batch)
            batch, size = [], 0
            yield
    if batch:
        db.write("compact", "DELETE FROM log WHERE id = ?", batch)
        yield
    while db.vacuum_step(_VACUUM_PAGES):
        yield


def _drop_parts(db: CacheDb, ids: list[int]) -> None:
    """Best effort: the parts of a generation that never completed (the next open drops
    any left)."""
    if ids and db.is_open:
        try:
            db.write(
                "compact", "DELETE FROM snapshot WHERE id = ?", [(i,) for i in ids], building=0
            )
        except Exception as exc:
            log.debug("local cache %s: parts of an unfinished snapshot stay: %s", db.path, exc)
            db.index.orphans += ids
