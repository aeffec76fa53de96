"""The local cache's SQLite file format: tables, the two copies of its version, connecting.

Schema 2 has no index at all: every read goes by rowid or scans a table, so a damaged index
can never make a doc silently lose rows or show a phantom doc (schema 1 read a doc's rows
through the `log_doc` index). The version is kept twice, in `user_version` and in the low
16 bits of `application_id`, so a flipped bit in either reads as damage, not as a cache
"written by a newer version". Schema 1 caches are rebuilt into schema 2 on first open.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..errors import CorruptCacheError, StoreError

__all__ = [
    "APP_ID",
    "JOURNAL_SIZE_LIMIT",
    "SCHEMA_VERSION",
    "Damaged",
    "connect",
    "create_tables",
    "is_damage",
    "read_version",
]

SCHEMA_VERSION = 2
APP_ID = 0x55430000  # "UC" then the schema version: the version's second copy
# After a checkpoint the WAL is cut back to this size (a big compaction can grow it a lot).
JOURNAL_SIZE_LIMIT = 4 * 2**20
_SQLITE_ERROR = 1
_SQLITE_CORRUPT = 11
_SQLITE_FORMAT = 24
_SQLITE_NOTADB = 26
_SCHEMA_WORDS = ("no such table", "no such column", "malformed", "has no column")

_TABLES = """
CREATE TABLE log (
    id INTEGER PRIMARY KEY, doc TEXT NOT NULL, crc INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE snapshot (
    id INTEGER PRIMARY KEY, doc TEXT NOT NULL, gen INTEGER NOT NULL, part INTEGER NOT NULL,
    parts INTEGER NOT NULL, crc INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE quarantine (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, source TEXT NOT NULL, doc BLOB,
    reason TEXT NOT NULL, data BLOB);
"""


class Damaged(CorruptCacheError):
    """The file is damaged where SQLite or the header checks can see it."""


def is_damage(exc: BaseException) -> bool:
    """Whether an SQLite error means a damaged file (not a full disk, a lock or a bug of ours)."""
    if isinstance(exc, Damaged):
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
    except sqlite3.DatabaseError as exc:
        conn.close()
        if is_damage(exc):
            raise Damaged(str(exc)) from exc
        raise
    except BaseException:
        conn.close()
        raise
    return conn


def read_version(conn: sqlite3.Connection, path: Path) -> int:
    """The file's schema version (0: empty); Damaged if its header copies disagree."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app = conn.execute("PRAGMA application_id").fetchone()[0]
    encoding = conn.execute("PRAGMA encoding").fetchone()[0]
    if encoding != "UTF-8":
        raise Damaged(f"the header says the text encoding is {encoding}, this cache writes UTF-8")
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
    return int(version)


def create_tables(conn: sqlite3.Connection) -> None:
    """Create the schema-2 tables and stamp both copies of the version, in one transaction."""
    conn.executescript(
        "BEGIN IMMEDIATE;"
        + _TABLES
        + f"PRAGMA user_version = {SCHEMA_VERSION};"
        + f"PRAGMA application_id = {APP_ID | SCHEMA_VERSION};"
        + "COMMIT;"
    )
