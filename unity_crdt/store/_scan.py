"""Reading the cache file back: every table walked by rowid, every row checked, and whatever
SQLite cannot read skipped and counted instead of giving up on the whole file.

`scan` is the read at open of a sound file: it walks `log` and `snapshot` (never through an
index: there is none), checks every log row's CRC and every snapshot part's metadata, and
groups rows by the doc column each row carries (covered by its CRC). `salvage` copies what
can be read from a damaged file into a fresh one: it reads columns by position (a bit flip in
a table's SQL cannot hide its rows), steps over pages SQLite reports damaged, and copies rows
failing their checksum into the fresh file's `quarantine` table. Both tally what was lost in
a `ScanResult`.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..ids import check_doc_id
from ._compaction import part_crc, row_crc_raw
from ._schema import is_damage, meta_crc, set_counts

__all__ = [
    "Bad",
    "LogRow",
    "ScanResult",
    "SnapshotPart",
    "attribute",
    "decode_name",
    "fix_name",
    "quarantine_copy",
    "salvage",
    "scan",
    "walk",
]

log = logging.getLogger(__name__)

_MAX_ROWID = 2**63 - 1
# Layouts by position (what `SELECT rowid, *` returns after the rowid).
_LOG = {1: ("id", "doc", "data", "crc"), 2: ("id", "doc", "crc", "data")}
_SNAPSHOT = {1: ("doc", "data", "crc"), 2: ("id", "doc", "gen", "part", "parts", "crc", "data")}
_QUARANTINE = ("id", "at", "source", "doc", "reason", "data")
_META = ("id", "log_rows", "parts", "building", "crc")


@dataclass
class LogRow:
    """One log row that passed its checks."""

    id: int
    doc: str
    size: int
    data: bytes | None  # kept only while the preload budget lasts


@dataclass
class SnapshotPart:
    """One snapshot part's metadata (its data is checked against `crc` when read)."""

    id: int
    doc: str
    gen: int
    part: int
    parts: int
    crc: int
    size: int


@dataclass
class Bad:
    """A row or part that failed its checks; `doc` is who lost it (None: cannot be told)."""

    table: str
    id: int
    doc: str | None
    reason: str
    raw_doc: bytes | None = None
    data: bytes | None = None  # its bytes, when readable (they go to the quarantine)
    crc: int | None = None
    head: bytes = b""  # for a snapshot part, what its CRC covers between name and data


@dataclass
class ScanResult:
    """What a scan or a salvage read, and what it could not."""

    rows: list[LogRow] = field(default_factory=list)
    parts: list[SnapshotPart] = field(default_factory=list)
    bad: list[Bad] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # stretches of unknown docs
    damaged: bool = False  # SQLite itself reported damage
    everything: bool = False  # nothing could be read at all
    copied: int = 0
    copied_log: int = 0
    repaired: int = 0  # rows whose doc name lost a bit, put back under the right name
    meta: tuple[Any, ...] | None = None  # (log rows, parts, building, crc) as recorded
    meta_table: bool = False  # the salvaged file had one (schema 2)

    def lost(self) -> dict[str, int]:
        """Rows and parts lost per doc (those whose doc can be told)."""
        out: dict[str, int] = {}
        for bad in self.bad:
            if bad.doc is not None:
                out[bad.doc] = out.get(bad.doc, 0) + 1
        return out

    def unattributed(self) -> int:
        """Losses whose doc cannot be told."""
        return len(self.unreadable) + sum(1 for bad in self.bad if bad.doc is None)


def decode_name(raw: object) -> str | None:
    """The doc name stored as `raw`, or None if it is not a valid one."""
    if not isinstance(raw, bytes):
        return None
    try:
        return check_doc_id(raw.decode("utf-8"))
    except (UnicodeDecodeError, ConfigError):
        return None


def fix_name(raw: bytes, data: bytes, crc: int, head: bytes = b"") -> str | None:
    """The doc name one bit away from `raw` that makes the row's CRC match, if any.

    A CRC detects every single-bit error, so a match means the bit flipped in the name and
    the data is intact (the chance of a chance match is len(raw) * 8 / 2**32). `head` is
    what a snapshot part's CRC covers between the name and the data.
    """
    if len(raw) > 1024:
        return None
    for i in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[i // 8] ^= 1 << (i % 8)
        name = decode_name(bytes(flipped))
        if name is not None and zlib.crc32(data, zlib.crc32(bytes(flipped) + b"\0" + head)) == crc:
            return name
    return None


def attribute(bad: Bad) -> None:
    """Name the doc a bad row belonged to: the name one bit away that its CRC confirms
    (the bit flipped in the name itself), else the stored name (None if not a valid one)."""
    raw = bad.raw_doc
    if raw is None:
        return
    fixed = None
    if isinstance(bad.data, bytes) and isinstance(bad.crc, int):
        fixed = fix_name(raw, bad.data, bad.crc, bad.head)
    bad.doc = fixed or decode_name(raw)


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


def _check_log(doc: object, crc: object, data: object) -> str | None:
    if not isinstance(doc, bytes) or not isinstance(data, bytes) or not isinstance(crc, int):
        return "a column holds the wrong type"
    if row_crc_raw(doc, data) != crc:
        return "checksum mismatch"
    if decode_name(doc) is None:
        return "not a valid doc name"
    return None


def _check_part_meta(doc: object, gen: object, part: object, parts: object) -> str | None:
    if not all(isinstance(v, int) for v in (gen, part, parts)):
        return "a column holds the wrong type"
    assert isinstance(part, int) and isinstance(parts, int)
    if not 0 <= part < parts:
        return f"part {part} of {parts}"
    if decode_name(doc) is None:
        return "not a valid doc name"
    return None


def scan(conn: sqlite3.Connection, keep_bytes: int) -> ScanResult:
    """Read a schema-2 file at open: log rows checked (their bytes kept up to `keep_bytes`),
    snapshot part metadata checked. A damaged page raises (the caller then salvages)."""
    found = ScanResult()
    kept = 0
    for rowid, raw, crc, data in conn.execute(
        "SELECT id, CAST(doc AS BLOB), crc, data FROM log NOT INDEXED ORDER BY id"
    ):
        why = _check_log(raw, crc, data)
        if why is not None:
            found.bad.append(Bad("log", rowid, None, why, raw_doc=raw, data=data, crc=crc))
            continue
        keep = kept + len(data) <= keep_bytes
        kept += len(data) if keep else 0
        found.rows.append(LogRow(rowid, raw.decode(), len(data), data if keep else None))
    # The data column is last: its length comes from the record header, its pages stay unread.
    for rowid, raw, gen, part, parts, crc, size in conn.execute(
        "SELECT id, CAST(doc AS BLOB), gen, part, parts, crc, length(data) "
        "FROM snapshot NOT INDEXED ORDER BY id"
    ):
        why = _check_part_meta(raw, gen, part, parts)
        if why is None and not (isinstance(crc, int) and isinstance(size, int)):
            why = "a column holds the wrong type"
        if why is not None:
            found.bad.append(Bad("snapshot", rowid, None, why, raw_doc=raw))
            continue
        found.parts.append(SnapshotPart(rowid, raw.decode(), gen, part, parts, crc, size))
    found.meta = conn.execute(
        "SELECT log_rows, parts, building, crc FROM meta WHERE id = 1"
    ).fetchone()
    return found


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


def quarantine_copy(conn: sqlite3.Connection, bad: Bad) -> None:
    """Insert a copy of a bad row into `conn`'s quarantine table (inside the caller's txn)."""
    conn.execute(
        "INSERT INTO quarantine (at, source, doc, reason, data) VALUES (?, ?, ?, ?, ?)",
        (time.time(), f"{bad.table} row {bad.id}", bad.raw_doc, bad.reason, bad.data),
    )


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
    why = _check_log(doc, crc, data)
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
    why = _check_part_meta(doc, gen, part, parts)
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
