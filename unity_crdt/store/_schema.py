"""The local cache's SQLite file format: tables, the two copies of its version, connecting.

Schema 2 has no index at all: every read goes by rowid or scans a table, so a damaged index
can never make a doc silently lose rows or show a phantom doc (schema 1 read a doc's rows
through the `log_doc` index). The version is kept twice, in `user_version` and in the low
16 bits of `application_id`, so a flipped bit in either reads as damage, not as a cache
"written by a newer version". Schema 1 caches are rebuilt into schema 2 on first open.
"""

from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path

from ..errors import CorruptCacheError, StoreError

__all__ = [
    "APP_ID",
    "JOURNAL_SIZE_LIMIT",
    "SCHEMA_1",
    "SCHEMA_VERSION",
    "Damaged",
    "check_header",
    "connect",
    "create_tables",
    "is_damage",
    "meta_crc",
    "read_version",
    "schema_objects",
    "set_counts",
]

SCHEMA_VERSION = 2
APP_ID = 0x55430000  # "UC" then the schema version: the version's second copy
# After a checkpoint the WAL is cut back to this size (a big compaction can grow it a lot).
JOURNAL_SIZE_LIMIT = 4 * 2**20
_SQLITE_ERROR = 1
_SQLITE_CORRUPT = 11
_SQLITE_FORMAT = 24
_SQLITE_NOTADB = 26
_SCHEMA_WORDS = (
    "no such table",
    "no such column",
    "malformed",
    "has no column",
    "unsupported file format",
)

_TABLES = """
CREATE TABLE log (
    id INTEGER PRIMARY KEY, doc TEXT NOT NULL, crc INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE snapshot (
    id INTEGER PRIMARY KEY, doc TEXT NOT NULL, gen INTEGER NOT NULL, part INTEGER NOT NULL,
    parts INTEGER NOT NULL, crc INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE quarantine (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, source TEXT NOT NULL, doc BLOB,
    reason TEXT NOT NULL, data BLOB);
CREATE TABLE meta (
    id INTEGER PRIMARY KEY, log_rows INTEGER NOT NULL, parts INTEGER NOT NULL,
    building INTEGER NOT NULL, crc INTEGER NOT NULL);
INSERT INTO meta VALUES (1, 0, 0, 0, 3750648859);
"""


# What schema 1 (before this module) created, for its upgrade and for repairing a damaged one.
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY,
    doc TEXT NOT NULL, data BLOB NOT NULL, crc INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS log_doc ON log (doc, id);
CREATE TABLE IF NOT EXISTS snapshot (
    doc TEXT PRIMARY KEY, data BLOB NOT NULL, crc INTEGER NOT NULL);
"""
_OBJECTS: dict[int, list[tuple[str, str, str, str | None]]] = {}


def schema_objects(version: int) -> list[tuple[str, str, str, str | None]]:
    """(type, name, tbl_name, sql) of each object of schema `version`, as SQLite stores them."""
    if version not in _OBJECTS:
        conn = sqlite3.connect(":memory:")
        conn.executescript(_TABLES if version == SCHEMA_VERSION else SCHEMA_1)
        _OBJECTS[version] = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
        ).fetchall()
        conn.close()
    return _OBJECTS[version]


class Damaged(CorruptCacheError):
    """The file is damaged where SQLite or the header checks can see it."""


def is_damage(exc: BaseException) -> bool:
    """Whether an SQLite error means a damaged file (not a full disk, a lock or a bug of ours)."""
    if isinstance(exc, Damaged | UnicodeDecodeError):  # the latter: a garbled error message
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB, _SQLITE_FORMAT):
        return True
    # A damaged schema (a flipped bit in a table's SQL) surfaces as a plain SQL error.
    text = str(exc)
    return (code is None or code & 0xFF == _SQLITE_ERROR) and any(w in text for w in _SCHEMA_WORDS)


def connect(path: Path) -> sqlite3.Connection:
    """Open `path` in WAL mode, synchronous=FULL, exclusive; Damaged if SQLite cannot read it."""
    empty = not path.exists() or path.stat().st_size == 0
    # Opened on one thread, used on another (the store's worker), never concurrently.
    conn = sqlite3.connect(path, isolation_level=None, timeout=0.5, check_same_thread=False)
    try:
        if empty:
            # Only before the first table (on an existing file the pragma writes its header,
            # so it is never sent there). Incremental: free pages are given back after
            # compactions.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        # We hold LOCK anyway; exclusive mode skips the -shm file and per-transaction
        # file locks (faster open and commits) and keeps any rogue opener out.
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        # The first read of the file: SQLite reports garbage (NOTADB) or a file shorter
        # than its header says (CORRUPT) here.
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"local cache {path}: cannot enable WAL (got {mode})")
        # Every commit is fsynced before append() returns: what makes an acknowledged
        # update durable (tests/integration/test_cache_durability.py checks it with strace).
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        # Text comes back as bytes: a damaged value must never fail to decode mid-read.
        conn.text_factory = bytes
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        conn.close()
        if is_damage(exc):
            raise Damaged(str(exc)) from exc
        raise
    except BaseException:
        conn.close()
        raise
    return conn


def check_header(path: Path) -> None:
    """Damaged unless the file's 100-byte header holds what SQLite writes for our files.

    SQLite reads some damaged headers without complaint: a write version above 2 opens the
    file read-only, a reserved-bytes count shrinks every page. Empty files pass, and so do new
    files whose schema is still in the WAL.
    """
    with open(path, "rb") as f:
        head = f.read(100)
    if not head:
        return
    page = int.from_bytes(head[16:18], "big")
    # Schema cookie, format and text encoding all 0: a new file whose tables are still only
    # in the WAL (SQLite's own empty state, as a process killed before the first checkpoint
    # leaves it); the WAL's page 1 then says what the file holds.
    fresh = head[40:48] == bytes(8) and head[56:60] == bytes(4)
    ok = (
        len(head) == 100
        and head[:16] == b"SQLite format 3\x00"
        and (page == 1 or (page >= 512 and page & (page - 1) == 0))
        and head[18:20] in (b"\x01\x01", b"\x02\x02")
        and head[20:24] == b"\x00\x40\x20\x20"
        and (
            fresh
            or (
                int.from_bytes(head[44:48], "big") in (1, 2, 3, 4)
                and int.from_bytes(head[56:60], "big") == 1
            )
        )
        and head[72:92] == bytes(20)
    )
    if not ok:
        raise Damaged("the file header is damaged")


def read_version(conn: sqlite3.Connection, path: Path) -> int:
    """The file's schema version (0: empty); Damaged if its header copies disagree."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app = conn.execute("PRAGMA application_id").fetchone()[0]
    encoding = conn.execute("PRAGMA encoding").fetchone()[0]
    if encoding != b"UTF-8":
        raise Damaged(f"the header says the text encoding is {encoding!r}, not UTF-8")
    if app == 0:  # schema 1 (which set no application id) or a new file
        if version not in (0, 1):
            raise Damaged(f"schema version {version} without an application id")
        tables = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
        if version == 0 and tables:
            raise Damaged("the header says empty, yet the file has tables")
        return int(version)
    if app & 0xFFFF0000 != APP_ID:
        raise Damaged(f"application id {app:#x} is not this library's")
    if app & 0xFFFF != version:
        raise Damaged(f"the two copies of the schema version differ ({version}, {app & 0xFFFF})")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"local cache {path} has schema version {version}, this library reads "
            f"{SCHEMA_VERSION} (written by a newer version?)"
        )
    objects = conn.execute(
        "SELECT CAST(type AS BLOB), CAST(name AS BLOB), CAST(tbl_name AS BLOB), "
        "CAST(sql AS BLOB) FROM sqlite_master ORDER BY name"
    ).fetchall()
    expected = [tuple(v.encode() if v else v for v in o) for o in schema_objects(version)]
    if version == SCHEMA_VERSION and objects != expected:
        # A flipped bit in a statement can parse and still change what a column means.
        raise Damaged("the schema differs from the one this library writes")
    return int(version)


def meta_crc(log_rows: int, parts: int, building: int) -> int:
    """The checksum of the `meta` row."""
    return zlib.crc32(f"{log_rows}:{parts}:{building}".encode())


def set_counts(conn: sqlite3.Connection, log_rows: int, parts: int, building: int) -> None:
    """Record how many log rows and snapshot parts the file holds, and the snapshot
    generation being written part by part (0: none), inside the caller's transaction.

    A b-tree page whose cell count loses a bit drops rows without SQLite noticing; these
    counts, written with every change, let the next open see that rows went missing. The
    generation being built tells a compaction cut short (by a crash, or a backup taken
    meanwhile) from a snapshot that lost a part.
    """
    conn.execute(
        "UPDATE meta SET log_rows = ?, parts = ?, building = ?, crc = ? WHERE id = 1",
        (log_rows, parts, building, meta_crc(log_rows, parts, building)),
    )


def create_tables(conn: sqlite3.Connection) -> None:
    """Create the schema-2 tables and stamp both copies of the version, in one transaction."""
    conn.executescript(
        "BEGIN IMMEDIATE;"
        + _TABLES
        + f"PRAGMA user_version = {SCHEMA_VERSION};"
        + f"PRAGMA application_id = {APP_ID | SCHEMA_VERSION};"
        + "COMMIT;"
    )
