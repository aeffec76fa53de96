"""Salvage: copying whatever can still be read from a damaged cache file into a fresh one.

Separate from the read at open (`_scan.scan`), which may assume a sound file: salvage assumes
nothing. It reads columns by position (a bit flip in a table's SQL cannot hide its rows),
steps over pages SQLite reports damaged (`walk`), applies the checks of `_scan` to every row,
and copies rows failing their checksum into the fresh file's `quarantine` table. It tallies
what was lost in a `ScanResult`, and compares what it read with the row counts the file
recorded, so rows a damaged b-tree page hides are counted as lost too.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

from ._compaction import part_crc, row_crc_raw
from ._scan import (
    Bad,
    ScanResult,
    check_log,
    check_part_meta,
    decode_name,
    fix_name,
    quarantine_copy,
)
from ._schema import is_damage, meta_crc, set_counts

__all__ = ["salvage", "walk"]

_MAX_ROWID = 2**63 - 1
# Layouts by position (what `SELECT rowid, *` returns after the rowid).
_LOG = {1: ("id", "doc", "data", "crc"), 2: ("id", "doc", "crc", "data")}
_SNAPSHOT = {1: ("doc", "data", "crc"), 2: ("id", "doc", "gen", "part", "parts", "crc", "data")}
_QUARANTINE = ("id", "at", "source", "doc", "reason", "data")
_META = ("id", "log_rows", "parts", "building", "crc")


def walk(
    conn: sqlite3.Connection, table: str, columns: str, found: ScanResult, kind: str
) -> Iterator[Any]:
    """The rows of `table` in rowid order (the first column is the rowid).

    Where SQLite reports damage, the walk steps over it: a row whose content cannot be read
    becomes a `Bad` (with its doc, when that column can still be read), a stretch of pages
    that cannot be reached is noted in `found.unreadable`.
    """
    select = f"SELECT rowid, {columns} FROM {table} NOT INDEXED"
    after = -_MAX_ROWID - 1
    while True:
        try:
            for row in conn.execute(f"{select} WHERE rowid > ? ORDER BY rowid", (after,)):
                after = row[0]
                yield row
            return
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if not is_damage(exc):
                raise
            found.damaged = True
            reason = str(exc)
        nxt = _first_readable(conn, table, after + 1)
        if nxt is None:  # nothing reachable after `after`
            found.unreadable.append(f"{table} after row {after}")
            return
        at, reached = nxt
        if at > after + 1:
            found.unreadable.append(f"{table} rows {after + 1}..{reached - 1}")
        try:
            row = conn.execute(f"{select} WHERE rowid = ?", (reached,)).fetchone()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if not is_damage(exc):
                raise
            raw = _try(conn, f"SELECT CAST(doc AS BLOB) FROM {table} WHERE rowid = ?", reached)
            found.bad.append(Bad(kind, reached, None, f"unreadable: {reason}", raw_doc=raw))
        else:
            if row is not None:
                yield row
        after = reached


def _first_readable(conn: sqlite3.Connection, table: str, start: int) -> tuple[int, int] | None:
    """(the first position >= start a seek succeeds from, the rowid found there), or None."""

    def seek(p: int) -> int | None:
        row = conn.execute(
            f"SELECT rowid FROM {table} NOT INDEXED WHERE rowid >= ? ORDER BY rowid LIMIT 1",
            (p,),
        ).fetchone()
        return None if row is None else int(row[0])

    lo, step = start - 1, 1
    while True:
        p = min(start + step - 1, _MAX_ROWID)
        try:
            found = seek(p)
            break
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if not is_damage(exc) or p == _MAX_ROWID:
                if not is_damage(exc):
                    raise
                return None
            lo, step = p, step * 2
    hi = p
    while hi - lo > 1:  # the first position past the damage
        mid = (lo + hi) // 2
        try:
            found = seek(mid)
            hi = mid
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if not is_damage(exc):
                raise
            lo = mid
    return None if found is None else (hi, found)


def _try(conn: sqlite3.Connection, sql: str, *args: Any) -> Any:
    try:
        row = conn.execute(sql, args).fetchone()
    except (sqlite3.DatabaseError, UnicodeDecodeError):
        return None
    return None if row is None else row[0]


def salvage(old: sqlite3.Connection | None, new: sqlite3.Connection) -> ScanResult:
    """Copy every readable, checked row of `old` into `new` (same ids) in one transaction.

    Schema-1 snapshots become one-part schema-2 snapshots (generation 0); rows failing their
    checks go to `new`'s quarantine table, with their bytes when those could be read.
    """
    found = ScanResult()
    if old is None:
        found.everything = True
        return found
    old.text_factory = bytes  # a damaged name must not stop the read
    try:
        tables = _tables(old)
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        if not is_damage(exc):
            raise
        found.everything = found.damaged = True
        return found
    new.execute("BEGIN IMMEDIATE")
    try:
        for name, layout in tables:
            _copy(old, new, name, layout, found)
        for bad in found.bad:
            quarantine_copy(new, bad)
        meta = found.meta if _meta_ok(found.meta) else None
        building = meta[2] if meta is not None else 0  # a compaction the damage cut short
        set_counts(new, found.copied_log, found.copied - found.copied_log, building)
        new.execute("COMMIT")
    except BaseException:
        if new.in_transaction:
            new.execute("ROLLBACK")
        raise
    if not found.copied and not tables:
        found.everything = True
    if found.meta_table:
        _check_counts(found)
    return found


def _check_counts(found: ScanResult) -> None:
    """Compare what a salvage found with the counts the file recorded: rows that a damaged
    b-tree page hides (a cell count lost a bit) show up here, not as SQLite errors."""
    have = [
        found.copied_log + sum(b.table == "log" for b in found.bad),
        found.copied - found.copied_log + sum(b.table == "snapshot" for b in found.bad),
    ]
    meta = found.meta
    if meta is None or not _meta_ok(meta):
        found.unreadable.append("the row counts (cannot tell whether rows went missing)")
    elif [meta[0], meta[1]] != have:
        found.unreadable.append(
            f"{meta[0]} log rows and {meta[1]} snapshot parts were written, "
            f"{have[0]} and {have[1]} could be read: rows vanished"
        )


def _meta_ok(meta: tuple[Any, ...] | None) -> bool:
    return (
        meta is not None
        and len(meta) == 4
        and all(isinstance(v, int) for v in meta)
        and meta_crc(meta[0], meta[1], meta[2]) == meta[3]
    )


def _tables(old: sqlite3.Connection) -> list[tuple[str, tuple[str, ...]]]:
    """Our tables in `old` with their layouts: by column names, or by shape when a bit flip
    damaged a name."""
    out = []
    for (raw,) in old.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if name.startswith("sqlite_") or not name.isidentifier():
            continue
        cols = tuple(
            r[1].decode("utf-8", "replace") if isinstance(r[1], bytes) else str(r[1])
            for r in old.execute(f'PRAGMA table_info("{name}")')
        )
        candidates = [_LOG[2], _LOG[1], _SNAPSHOT[2], _SNAPSHOT[1], _QUARANTINE, _META]
        fits = [c for c in candidates if len(c) == len(cols)]
        if fits:  # the layout with most names in place (schema 2 first on a tie)
            best = max(fits, key=lambda c: sum(a == b for a, b in zip(c, cols, strict=True)))
            out.append((name, best))
    return out


def _copy(
    old: sqlite3.Connection,
    new: sqlite3.Connection,
    table: str,
    layout: tuple[str, ...],
    found: ScanResult,
) -> None:
    kind = "log" if layout in _LOG.values() else "snapshot"
    if layout in (_META, _QUARANTINE):
        kind = "quarantine" if layout == _QUARANTINE else "meta"
    if kind == "meta":
        found.meta_table = True
    for row in walk(old, f'"{table}"', "*", found, kind):
        rowid, values = row[0], dict(zip(layout, row[1:], strict=False))
        if kind == "meta":
            found.meta = tuple(values.get(k) for k in ("log_rows", "parts", "building", "crc"))
            continue
        if layout == _QUARANTINE:
            new.execute(
                "INSERT INTO quarantine (at, source, doc, reason, data) VALUES (?, ?, ?, ?, ?)",
                tuple(values.get(k) for k in ("at", "source", "doc", "reason", "data")),
            )
            continue
        doc, crc, data = values.get("doc"), values.get("crc"), values.get("data")
        if kind == "log":
            why = _copy_log(new, rowid, values, found)
        else:
            why = _copy_part(new, rowid, values)
        if why is None:
            found.copied += 1
            found.copied_log += kind == "log"
            continue
        found.bad.append(
            Bad(
                kind,
                rowid,
                None,
                why,
                raw_doc=doc if isinstance(doc, bytes) else None,
                data=data if isinstance(data, bytes) else None,
                crc=crc if isinstance(crc, int) else None,
            )
        )


def _copy_log(
    new: sqlite3.Connection, rowid: int, values: dict[str, Any], found: ScanResult
) -> str | None:
    doc, crc, data = values.get("doc"), values.get("crc"), values.get("data")
    why = check_log(doc, crc, data)
    name = decode_name(doc)
    if why == "checksum mismatch" and isinstance(doc, bytes):
        assert isinstance(data, bytes) and isinstance(crc, int)
        name = fix_name(doc, data, crc)
        if name is not None:  # a bit flipped in the name: the row itself is whole
            why = None
            found.repaired += 1
            quarantine_copy(
                new, Bad("log", rowid, name, "doc name repaired", raw_doc=doc, data=data)
            )
    if why is None:
        new.execute(
            "INSERT INTO log (id, doc, crc, data) VALUES (?, ?, ?, ?)", (rowid, name, crc, data)
        )
    return why


def _copy_part(new: sqlite3.Connection, rowid: int, values: dict[str, Any]) -> str | None:
    doc, crc, data = values.get("doc"), values.get("crc"), values.get("data")
    gen, part, parts = values.get("gen", 0), values.get("part", 0), values.get("parts", 1)
    why = check_part_meta(doc, gen, part, parts)
    if why is not None:
        return why
    if not (isinstance(doc, bytes) and isinstance(data, bytes) and isinstance(crc, int)):
        return "a column holds the wrong type"
    schema1 = "gen" not in values
    expected = row_crc_raw(doc, data) if schema1 else part_crc(doc, gen, part, parts, data)
    if expected != crc:
        return "checksum mismatch"
    new.execute(
        "INSERT INTO snapshot (id, doc, gen, part, parts, crc, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (rowid, decode_name(doc), gen, part, parts, part_crc(doc, gen, part, parts, data), data),
    )
    return None
