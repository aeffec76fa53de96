"""The rows of the cache file after open: read back by rowid and checked, written and deleted
in durable transactions, and moved aside when they fail their checks.

Separate from the engine (`_engine.CacheDb`), which keeps the index of where each doc lives and
decides what a failure means for it; these are the SQL and the checks. Reads go by rowid only,
never through an index (there is none): a snapshot part must sit where the index says, under
its doc, generation and position, and match its CRC; a log row must carry its doc's name and
match its CRC. What fails becomes a `Bad`, and `quarantine` moves it into the `quarantine`
table (copied, then deleted from its own table, in one transaction): nothing is overwritten.
Every transaction that changes rows also writes the row counts (the `meta` row), so a later
open can tell rows that vanished.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._compaction import part_crc, row_crc
from ._index import DocRows
from ._recovery import rollback
from ._scan import Bad, quarantine_copy
from ._schema import Damaged, set_counts

__all__ = ["quarantine", "read_log", "read_parts", "write_rows"]

_IN_CHUNK = 500  # rowids per "WHERE id IN (...)"


def read_parts(conn: sqlite3.Connection, doc: str, d: DocRows) -> tuple[bytes | None, list[Bad]]:
    """The doc's snapshot from its parts, each checked -> (snapshot, []); or, when a part
    fails, (None, every part as a `Bad`): a snapshot with a part lost is lost whole."""
    raw, chunks = doc.encode(), []
    for index, (rowid, _) in enumerate(d.parts):
        row = conn.execute(
            "SELECT CAST(doc AS BLOB), gen, part, parts, crc, data FROM snapshot WHERE id = ?",
            (rowid,),
        ).fetchone()
        if row is None:
            why, suspect = f"part {index} is missing", Bad("snapshot", rowid, doc, "")
        else:
            name, gen, part, parts, crc, data = row
            why = ""
            if (name, gen, part, parts) != (raw, d.gen, index, len(d.parts)):
                why = f"part {index} belongs elsewhere"
            elif not isinstance(data, bytes) or part_crc(raw, gen, part, parts, data) != crc:
                why = f"part {index} fails its checksum"
            # If a bit flipped in the part's doc name, the loss is that other doc's.
            suspect = Bad(
                "snapshot",
                rowid,
                None,
                why,
                raw_doc=raw,
                data=data if isinstance(data, bytes) else None,
                crc=crc if isinstance(crc, int) else None,
                head=f"{gen}.{part}.{parts}".encode(),
            )
        if why:
            suspect.reason = why
            bad = [Bad("snapshot", i, doc, why) for i, _ in d.parts if i != rowid]
            bad.append(suspect)
            return None, bad
        chunks.append(data)
    return b"".join(chunks), []


def read_log(
    conn: sqlite3.Connection, doc: str, ids: list[int]
) -> tuple[dict[int, bytes], list[Bad]]:
    """The checked data of log rows `ids` of `doc`, and the rows that failed or are missing."""
    out: dict[int, bytes] = {}
    raw = doc.encode()
    bad: list[Bad] = []
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        for rowid, name, crc, data in conn.execute(
            f"SELECT id, CAST(doc AS BLOB), crc, data FROM log WHERE id IN ({marks})", chunk
        ):
            if name == raw and isinstance(data, bytes) and row_crc(doc, data) == crc:
                out[rowid] = data
            else:
                bad.append(Bad("log", rowid, doc, "checksum mismatch", raw_doc=name))
    bad += [Bad("log", i, doc, "row is missing") for i in ids if i not in out]
    return out, bad


def write_rows(
    conn: sqlite3.Connection,
    counts: Sequence[int],
    what: str,
    sql: str,
    rows: list[tuple[Any, ...]],
    building: int | None,
    failpoint: Callable[[str], None] | None,
) -> list[int]:
    """Run `sql` (an INSERT INTO or DELETE FROM log or snapshot) for each of `rows` in one
    durable transaction, with the row counts (`counts`, returned as they are after it) and,
    if given, the generation being built. Rolled back on any error."""
    verb, _, table = sql.split()[:3]
    try:
        conn.execute("BEGIN IMMEDIATE")
        changed = conn.executemany(sql, rows).rowcount
        counts = list(counts)
        counts[table != "log"] += changed if verb == "INSERT" else -changed
        if building is not None:
            counts[2] = building
        set_counts(conn, *counts)
        if failpoint is not None:
            failpoint(what)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return counts


def quarantine(
    conn: sqlite3.Connection,
    counts: Sequence[int],
    bad: list[Bad],
    stale: list[int],
    repairs: list[tuple[int, str]],
    failpoint: Callable[[str], None] | None,
) -> list[int]:
    """Move failing rows into the quarantine table; drop superseded snapshot parts; put
    back the doc names of `repairs` (rowid, name) after keeping a copy of each. One
    transaction, rolled back on any error; returns the row counts (`counts`) after it."""
    counts = list(counts)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for rowid, name in repairs:
            conn.execute(
                "INSERT INTO quarantine (at, source, doc, reason, data) "
                "SELECT ?, ?, CAST(doc AS BLOB), 'doc name repaired', data FROM log "
                "WHERE id = ?",
                (time.time(), f"log row {rowid}", rowid),
            )
            fixed = conn.execute("UPDATE log SET doc = ? WHERE id = ?", (name, rowid))
            if fixed.rowcount != 1:
                raise Damaged(f"log row {rowid} is out of place in its table")
        for b in bad:
            copied = conn.execute(
                "INSERT INTO quarantine (at, source, doc, reason, data) "
                f"SELECT ?, ?, CAST(doc AS BLOB), ?, data FROM {b.table} WHERE id = ?",
                (time.time(), f"{b.table} row {b.id}", b.reason, b.id),
            ).rowcount
            if not copied:  # unreadable as a whole: keep what we know
                quarantine_copy(conn, b)
            gone = conn.execute(f"DELETE FROM {b.table} WHERE id = ?", (b.id,)).rowcount
            if not gone:  # read in a scan, not found by its key: the b-tree is damaged
                raise Damaged(f"{b.table} row {b.id} is out of place in its table")
            counts[b.table != "log"] -= gone
        dropped = conn.executemany("DELETE FROM snapshot WHERE id = ?", [(i,) for i in stale])
        counts[1] -= dropped.rowcount
        set_counts(conn, *counts)
        if failpoint is not None:
            failpoint("quarantine")
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return counts
