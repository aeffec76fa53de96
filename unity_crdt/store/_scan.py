"""Reading the cache file back at open: every table walked by rowid, every row checked.

`scan` is the read at open of a sound file: it walks `log` and `snapshot` (never through an
index: there is none), checks every log row's CRC and every snapshot part's metadata, and
groups rows by the doc column each row carries (covered by its CRC). What it found, and what
failed its checks, is a `ScanResult`; a damaged file is read by `_salvage` instead, into the
same record, with the same checks.

A row that fails its checks is a `Bad`: whose loss it is can often still be told, from its
stored doc name or, when a single bit flipped in that name, from the name one bit away that
its CRC confirms (`fix_name`).
"""

from __future__ import annotations

import sqlite3
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..ids import check_doc_id
from ._compaction import row_crc_raw
from ._schema import meta_crc

__all__ = [
    "Bad",
    "LogRow",
    "ScanResult",
    "SnapshotPart",
    "attribute",
    "check_log",
    "check_part_meta",
    "counts_of",
    "decode_name",
    "fix_name",
    "quarantine_copy",
    "scan",
]


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


def check_log(doc: object, crc: object, data: object) -> str | None:
    """Why a log row's stored columns fail their checks, or None if they pass."""
    if not isinstance(doc, bytes) or not isinstance(data, bytes) or not isinstance(crc, int):
        return "a column holds the wrong type"
    if row_crc_raw(doc, data) != crc:
        return "checksum mismatch"
    if decode_name(doc) is None:
        return "not a valid doc name"
    return None


def check_part_meta(doc: object, gen: object, part: object, parts: object) -> str | None:
    """Why a snapshot part's metadata fails its checks, or None if it passes."""
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
        why = check_log(raw, crc, data)
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
        why = check_part_meta(raw, gen, part, parts)
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


def counts_of(found: ScanResult) -> list[int]:
    """The log rows, snapshot parts and generation being built that a scan found, checked
    against the counts the file recorded: rows that vanished, or counts that cannot be
    read, are noted in `found` (vanished rows mark it damaged)."""
    recorded = found.meta
    ok = recorded is not None and meta_crc(*recorded[:3]) == recorded[3]
    counts = [
        len(found.rows) + sum(b.table == "log" for b in found.bad),
        len(found.parts) + sum(b.table == "snapshot" for b in found.bad),
        recorded[2] if ok and recorded is not None else 0,
    ]
    if not ok or recorded is None:
        found.unreadable.append("the row counts (cannot tell whether rows went missing)")
    elif [recorded[0], recorded[1]] != counts[:2]:
        found.damaged = True
        found.unreadable.append(
            f"{recorded[0]} log rows and {recorded[1]} snapshot parts were written, "
            f"{counts[0]} and {counts[1]} are left: rows vanished"
        )
    return counts


def quarantine_copy(conn: sqlite3.Connection, bad: Bad) -> None:
    """Insert a copy of a bad row into `conn`'s quarantine table (inside the caller's txn)."""
    conn.execute(
        "INSERT INTO quarantine (at, source, doc, reason, data) VALUES (?, ?, ?, ?, ?)",
        (time.time(), f"{bad.table} row {bad.id}", bad.raw_doc, bad.reason, bad.data),
    )
