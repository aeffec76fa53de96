"""What the engine does to the cache file besides rows: online backups, giving free pages back
to the file system, and keeping the WAL file between runs.

Separate from the engine (`_engine.CacheDb`) because none of it touches a row or the index of
where docs live: each is a whole-file operation on an open connection (or, for the WAL file,
on the path after the connection is closed).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from ._recovery import unlink_db
from .files import fsync_dir, make_private

__all__ = ["backup", "keep_wal_file", "vacuum_step"]


def backup(conn: sqlite3.Connection, dest: Path) -> None:
    """Write a consistent copy of the file to `dest` (0600), atomically (SQLite's online
    backup, from this connection: the exclusive lock keeps other readers out)."""
    tmp = dest.with_name(f".{dest.name}.partial")
    unlink_db(tmp)
    make_private(tmp)
    try:
        target = sqlite3.connect(tmp)
        try:
            conn.backup(target)
        finally:
            target.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        unlink_db(tmp)
        raise
    fsync_dir(dest.parent)


def vacuum_step(conn: sqlite3.Connection, pages: int) -> bool:
    """Give up to `pages` free pages back to the file system (auto_vacuum=INCREMENTAL files
    only); True while more are free."""
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    total = conn.execute("PRAGMA page_count").fetchone()[0]
    if free < max(256, total // 8):
        return False
    # executescript steps the pragma to its end (execute would free a single page).
    conn.executescript(f"PRAGMA incremental_vacuum({pages});")
    if conn.execute("PRAGMA freelist_count").fetchone()[0] > 0:
        return True
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the file shrinks at checkpoint
    return False


def keep_wal_file(db: Path) -> None:
    """Leave an empty -wal file beside a cleanly closed `db` (never touching one with content)."""
    # A clean close deletes the -wal file, and re-creating it is the dearest step of the next
    # open (a new inode: ~0.15 ms of a ~1 ms open). SQLite reads an empty -wal file as an
    # empty WAL, so leaving one behind (what SQLITE_FCNTL_PERSIST_WAL does, which Python's
    # sqlite3 cannot set) makes the next start cheaper.
    with contextlib.suppress(OSError):
        os.close(os.open(f"{db}-wal", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
