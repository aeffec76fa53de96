"""A repaired *copy* of a damaged cache file, for salvage when SQLite cannot read the file
itself: a flipped bit in the 100-byte header (magic, page size, format numbers) or in a
table's CREATE statement makes every query fail, although every row is still there.

Everything repaired is a constant this library wrote: the header fields of a WAL-mode UTF-8
database, and the CREATE statements of the schema-1 and schema-2 tables (each row of
`sqlite_master` gets the statement it resembles most, via `PRAGMA writable_schema`). The
damaged file itself is never written: the copy is made beside it and deleted after use.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import shutil
import sqlite3
import struct
from pathlib import Path

from ._schema import SCHEMA_1, SCHEMA_VERSION, create_tables, schema_objects
from .files import make_private

__all__ = ["remove_copy", "repaired_copy"]

log = logging.getLogger(__name__)

_MAGIC = b"SQLite format 3\x00"
_PAGE_SIZES = [2**n for n in range(9, 17)]


def repaired_copy(db: Path, copy: Path) -> bool:
    """Copy `db` (and its -wal) to `copy` with header and schema repaired; False on failure."""
    try:
        _remove(copy)
        make_private(copy)  # it holds the docs in clear: 0600 before a byte is copied
        shutil.copyfile(db, copy)
        wal = Path(f"{db}-wal")
        if wal.exists() and wal.stat().st_size:
            make_private(Path(f"{copy}-wal"))
            shutil.copyfile(wal, f"{copy}-wal")
        _repair_header(copy)
        try:
            _repair_schema(copy)
        except sqlite3.DatabaseError:
            # The schema table itself is unreadable: put a pristine one in its place. Every
            # file this library creates gets its tables in one go, so their root pages are
            # the same in every file of a schema version.
            _transplant_schema_page(copy)
            _repair_schema(copy)
        return True
    except (OSError, sqlite3.Error, UnicodeDecodeError) as exc:
        log.warning("local cache %s: could not repair a copy for salvage: %s", db, exc)
        _remove(copy)
        return False


def remove_copy(copy: Path) -> None:
    """Delete a repaired copy and its journal files."""
    _remove(copy)


def _remove(copy: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{copy}{suffix}")


def _repair_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        head = bytearray(f.read(100))
        if len(head) < 100:
            raise OSError("shorter than a database header")
        page = struct.unpack(">H", head[16:18])[0]
        page = 65536 if page == 1 else page
        if page not in _PAGE_SIZES or size % page:
            fits = [p for p in _PAGE_SIZES if size % p == 0 and p >= 4096]
            page = 4096 if 4096 in fits or not fits else fits[0]
        head[0:16] = _MAGIC
        head[16:18] = struct.pack(">H", 1 if page == 65536 else page)
        head[18:20] = b"\x02\x02"  # WAL
        head[20:24] = b"\x00\x40\x20\x20"  # no reserved bytes; the fixed payload fractions
        head[28:32] = struct.pack(">I", size // page)
        head[32:40] = b"\x00" * 8  # no freelist: the salvage never allocates a page
        head[44:48] = struct.pack(">I", 4)  # schema format 4
        head[56:60] = struct.pack(">I", 1)  # UTF-8
        head[72:92] = b"\x00" * 20
        head[92:96] = head[24:28]  # the size field is valid for this change counter
        f.seek(0)
        f.write(head)


def _transplant_schema_page(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(100)
    page = int.from_bytes(head[16:18], "big")
    auto_vacuum = int.from_bytes(head[52:56], "big") != 0  # schema 2 files only
    template = Path(f"{path}.template")
    _remove(template)
    try:
        conn = sqlite3.connect(template, isolation_level=None)
        try:
            conn.execute(f"PRAGMA page_size={page}")
            if auto_vacuum:
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                create_tables(conn)
            else:
                conn.executescript(SCHEMA_1)
        finally:
            conn.close()
        with open(template, "rb") as f:
            pristine = f.read(page)
    finally:
        _remove(template)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(pristine[100:page])


def _repair_schema(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.text_factory = bytes
        conn.execute("PRAGMA writable_schema=ON")
        rows = conn.execute("SELECT rowid, type, sql FROM sqlite_master").fetchall()
        for rowid, _, sql in rows:
            if sql is None:  # an automatic index (schema 1's snapshot key): no statement
                continue
            text = sql.decode("utf-8", "replace") if isinstance(sql, bytes) else str(sql)
            known = [o for v in (1, SCHEMA_VERSION) for o in schema_objects(v) if o[3]]
            best = max(known, key=lambda o: difflib.SequenceMatcher(None, o[3] or "", text).ratio())
            conn.execute(
                "UPDATE sqlite_master SET type = ?, name = ?, tbl_name = ?, sql = ? "
                "WHERE rowid = ?",
                (*best, rowid),
            )
        version = conn.execute("PRAGMA schema_version").fetchone()[0]
        conn.execute(f"PRAGMA schema_version = {int(version) + 1}")
        conn.execute("PRAGMA writable_schema=OFF")
    finally:
        conn.close()
