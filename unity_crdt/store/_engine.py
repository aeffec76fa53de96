"""The local_cache's SQLite file, driven synchronously from one thread at a time.

`CacheDb` is the storage engine behind `store.sqlite.SqliteStore` (which owns the thread,
the job queue and the event-loop side): schema, WAL set-up, reads with row CRCs, inserts,
compaction, and recovery from a corrupt file.

Corruption is detected where it shows up rather than by a full scan at every start (`PRAGMA
quick_check` reads the whole file, which costs more the bigger the cache): SQLite reports a
garbage or truncated file on the first queries at open, the queries at open walk the log and
the snapshot table, the preload reads the snapshots, and a page damaged elsewhere is reported
when a later query first touches it; the row CRCs catch what SQLite cannot see. A corrupt file
is moved aside (kept for forensics) and a fresh cache opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import CorruptCacheError, StoreError
from ._compaction import compact_updates, row_crc, should_compact
from .files import DB_NAME, acquire_lock, fsync_dir, move_aside, release_lock

__all__ = ["CLOSE_COMPACT_MIN_ROWS", "SCHEMA_VERSION", "CacheDb"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# On close, docs with at least this many log rows are compacted so the next start is fast.
CLOSE_COMPACT_MIN_ROWS = 16
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY,
    doc TEXT NOT NULL, data BLOB NOT NULL, crc INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS log_doc ON log (doc, id);
CREATE TABLE IF NOT EXISTS snapshot (
    doc TEXT PRIMARY KEY, data BLOB NOT NULL, crc INTEGER NOT NULL);
"""


@dataclass
class _Stats:
    log_rows: int = 0
    log_bytes: int = 0
    snapshot_bytes: int = 0


class CacheDb:
    """`cache_dir/store.sqlite3` (WAL, synchronous=FULL, exclusive) under `cache_dir/LOCK`.

    Not thread-safe: one thread at a time (open may run on another thread than the rest).
    After open, a query that finds the file corrupt makes it move the file aside, open a
    fresh one, call `on_recover(docs the old file held)` (which returns what becomes of them,
    for the error log) and retry the operation on the fresh file, except `load`, which
    raises CorruptCacheError.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        min_rows: int,
        min_bytes: int,
        preload_bytes: int,
        on_recover: Callable[[list[str]], str],
    ) -> None:
        self.cache_dir = cache_dir
        self.path = cache_dir / DB_NAME
        self.recovered_from: Path | None = None
        self._min_rows = min_rows
        self._min_bytes = min_bytes
        self._preload_bytes = preload_bytes
        self._on_recover = on_recover
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._stats: dict[str, _Stats] = {}
        self._dirty: set[str] = set()

    @property
    def is_open(self) -> bool:
        """Whether a database connection is open."""
        return self._conn is not None

    def open(self) -> tuple[list[str], dict[str, list[bytes]]]:
        """Lock, open (or recover), and read the docs up to the preload budget.

        Returns the names of the stored docs and the contents of those it read.
        """
        self._lock_fd = acquire_lock(self.cache_dir)
        try:
            try:
                self._conn = self._connect()
                preloaded = self._preload()
            except _Corrupt as exc:
                self._drop_conn()
                target = move_aside(self.path)
                log.error(
                    "local cache %s is corrupt (%s); moved it to %s and opened a fresh cache; "
                    "its documents will be re-synced from peers and checkpoints",
                    self.path,
                    exc,
                    target,
                )
                self.recovered_from = target
                self._conn = self._connect()
                preloaded = {}
        except sqlite3.Error as exc:
            self.abandon()
            raise StoreError(f"cannot open local cache {self.path}: {exc}") from exc
        except BaseException:
            self.abandon()
            raise
        return self.docs(), preloaded

    def insert(self, rows: list[tuple[str, bytes]]) -> None:
        """Append rows (doc, update) to the log in one durable transaction."""
        with_crc = [(doc, data, row_crc(doc, data)) for doc, data in rows]
        self._guarded("append", self._insert, with_crc)
        for doc, data in rows:
            stats = self._stats.setdefault(doc, _Stats())
            stats.log_rows += 1
            stats.log_bytes += len(data)
            self._dirty.add(doc)

    def load(self, doc: str) -> list[bytes]:
        """The doc's snapshot (if any) then its log rows; rows failing their CRC are skipped."""
        return self._guarded("load", self._load, doc)

    def docs(self) -> list[str]:
        """Names of the docs with stored state, sorted."""
        return sorted(d for d, s in self._stats.items() if s.log_rows or s.snapshot_bytes)

    def compact(self, doc: str) -> None:
        """Fold the doc's log into its snapshot."""
        self._guarded("compact", self._compact, doc)

    def auto_compact(self) -> None:
        """Compact the docs written since their last compaction whose log got too long."""
        for doc in list(self._dirty):
            s = self._stats.get(doc)
            if s is not None and should_compact(
                s.log_rows, s.log_bytes, s.snapshot_bytes, self._min_rows, self._min_bytes
            ):
                try:
                    self.compact(doc)
                except (sqlite3.Error, StoreError) as exc:
                    log.error(
                        "local cache %s: compaction of doc %r failed: %s", self.path, doc, exc
                    )
                    self._dirty.discard(doc)

    def close(self) -> None:
        """Compact docs with a log tail, close the file, release the lock."""
        # No recovery here: nobody could re-write the docs any more. A corrupt page met now
        # is met again, and handled, by the next open or load.
        try:
            for doc, s in self._stats.items():
                if s.log_rows >= CLOSE_COMPACT_MIN_ROWS and doc in self._dirty:
                    try:
                        self._compact(doc)
                    except (sqlite3.Error, StoreError) as exc:
                        log.error(
                            "local cache %s: compaction of %r failed: %s", self.path, doc, exc
                        )
        finally:
            was_open = self._conn is not None
            self._drop_conn()
            if was_open:
                _keep_wal_file(self.path)
            self.abandon()

    def abandon(self) -> None:
        """Close the file and release the lock without any more writes."""
        self._drop_conn()
        release_lock(self._lock_fd)
        self._lock_fd = None

    # -- internals -------------------------------------------------------------------------

    def _guarded(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        if self._conn is None:
            raise StoreError(f"local cache {self.cache_dir} is not open")
        try:
            return fn(*args)
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise
            self._recover(what, exc)
        if what == "load":
            raise CorruptCacheError(
                f"local cache {self.path} was corrupt when reading doc {args[0]!r}; it was "
                f"moved to {self.recovered_from}; the doc will be re-synced from peers"
            )
        return fn(*args)

    def _recover(self, what: str, exc: sqlite3.DatabaseError) -> None:
        docs = self.docs()
        self._drop_conn()
        self._stats, self._dirty = {}, set()
        target = move_aside(self.path)
        self.recovered_from = target
        fate = self._on_recover(docs)
        log.error(
            "local cache %s is corrupt (%s, during %s); moved it to %s and opened a fresh "
            "cache; the %d docs it held %s",
            self.path,
            exc,
            what,
            target,
            len(docs),
            fate,
        )
        self._conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        existed = os.path.exists(self.path)
        # Opened on one thread, used on another (the store's worker), never concurrently.
        conn = sqlite3.connect(
            self.path, isolation_level=None, timeout=0.5, check_same_thread=False
        )
        try:
            # We hold LOCK anyway; exclusive mode skips the -shm file and per-transaction
            # file locks (faster open and commits) and keeps any rogue opener out.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            # The first read of the file: SQLite reports garbage (NOTADB) or a file shorter
            # than its header says (CORRUPT) here.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"local cache {self.path}: cannot enable WAL (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"local cache {self.path} has schema version {version}, this library "
                    f"reads {SCHEMA_VERSION} (written by a newer version?)"
                )
            # These walk the whole log and the snapshot table's b-tree (not the snapshots'
            # overflow pages: the preload reads those).
            self._stats = {}
            for doc, n, size in conn.execute(
                "SELECT doc, COUNT(*), SUM(length(data)) FROM log GROUP BY doc"
            ):
                self._stats[doc] = _Stats(n, size)
            for doc, size in conn.execute("SELECT doc, length(data) FROM snapshot"):
                self._stats.setdefault(doc, _Stats()).snapshot_bytes = size
            self._dirty = {d for d, s in self._stats.items() if s.log_rows}
        except sqlite3.DatabaseError as exc:
            conn.close()
            if _is_corrupt(exc):
                raise _Corrupt(str(exc)) from exc
            raise StoreError(f"cannot open local cache {self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        if not existed:
            fsync_dir(self.cache_dir)  # SQLite syncs the dir for its WAL, not for a new db
        return conn

    def _preload(self) -> dict[str, list[bytes]]:
        budget = self._preload_bytes
        out: dict[str, list[bytes]] = {}
        for doc in self.docs():
            s = self._stats[doc]
            if s.log_bytes + s.snapshot_bytes > budget:
                continue
            budget -= s.log_bytes + s.snapshot_bytes
            try:
                out[doc] = self._load(doc)
            except sqlite3.DatabaseError as exc:
                if _is_corrupt(exc):
                    raise _Corrupt(str(exc)) from exc
                raise
        return out

    def _insert(self, rows: list[tuple[str, bytes, int]]) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO log (doc, data, crc) VALUES (?, ?, ?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _read(self, doc: str) -> tuple[bytes | None, list[tuple[int, bytes]]]:
        assert self._conn is not None
        snapshot = None
        row = self._conn.execute("SELECT data, crc FROM snapshot WHERE doc = ?", (doc,)).fetchone()
        if row is not None:
            if row_crc(doc, row[0]) == row[1]:
                snapshot = bytes(row[0])
            else:
                log.warning(
                    "local cache %s: the snapshot of doc %r fails its checksum; skipped "
                    "(the doc will be re-synced)",
                    self.path,
                    doc,
                )
        rows = []
        for rowid, data, crc in self._conn.execute(
            "SELECT id, data, crc FROM log WHERE doc = ? ORDER BY id", (doc,)
        ):
            if row_crc(doc, data) == crc:
                rows.append((rowid, bytes(data)))
            else:
                log.warning(
                    "local cache %s: log row %d of doc %r fails its checksum; skipped "
                    "(the doc will be re-synced)",
                    self.path,
                    rowid,
                    doc,
                )
        return snapshot, rows

    def _load(self, doc: str) -> list[bytes]:
        snapshot, rows = self._read(doc)
        head = [] if snapshot is None else [snapshot]
        return head + [data for _, data in rows]

    def _compact(self, doc: str) -> None:
        conn = self._conn
        assert conn is not None
        self._dirty.discard(doc)
        stats = self._stats.get(doc)
        if stats is None or stats.log_rows == 0:
            return
        snapshot, rows = self._read(doc)
        state, keep = compact_updates(snapshot, [data for _, data in rows])
        max_id = conn.execute("SELECT MAX(id) FROM log WHERE doc = ?", (doc,)).fetchone()[0]
        kept = [rows[i] for i in keep]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT OR REPLACE INTO snapshot (doc, data, crc) VALUES (?, ?, ?)",
                (doc, state, row_crc(doc, state)),
            )
            if kept:
                kept_ids = {rowid for rowid, _ in kept}
                conn.executemany(
                    "DELETE FROM log WHERE id = ?",
                    [
                        (i,)
                        for (i,) in conn.execute(
                            "SELECT id FROM log WHERE doc = ? AND id <= ?", (doc, max_id)
                        ).fetchall()
                        if i not in kept_ids
                    ],
                )
            else:
                conn.execute("DELETE FROM log WHERE doc = ? AND id <= ?", (doc, max_id))
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        if kept:
            log.warning(
                "local cache %s: doc %r has %d updates whose dependencies are missing; kept "
                "them in the log",
                self.path,
                doc,
                len(kept),
            )
        stats.snapshot_bytes = len(state)
        stats.log_rows = len(kept)
        stats.log_bytes = sum(len(data) for _, data in kept)

    def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):  # a corrupt file may fail to checkpoint
                conn.close()


class _Corrupt(CorruptCacheError):
    """The database file failed to open or to read at open; it will be moved aside."""


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _keep_wal_file(db: Path) -> None:
    # A clean close deletes the -wal file, and re-creating it is the dearest step of the next
    # open (a new inode: ~0.15 ms of a ~1 ms open). SQLite reads an empty -wal file as an
    # empty WAL, so leaving one behind (what SQLITE_FCNTL_PERSIST_WAL does, which Python's
    # sqlite3 cannot set) makes the next start cheaper. Never touch a WAL that has content.
    with contextlib.suppress(OSError):
        os.close(os.open(f"{db}-wal", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # the error that got us here matters more
            conn.execute("ROLLBACK")
