"""The local_cache adapter: a durable per-doc update log plus compacted snapshots.

`SqliteStore` keeps everything in `cache_dir/store.sqlite3` (WAL, synchronous=FULL) and does
all SQLite work on one dedicated thread, so the event loop never blocks on a commit. Appends
that arrive while a commit is in flight are committed together (group commit). Each row
carries a CRC32 of its doc name and bytes, so bit rot costs one row, not the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import secrets
import socket
import sqlite3
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import pycrdt

from .errors import CacheLockedError, StoreError
from .ids import check_doc_id

log = logging.getLogger(__name__)

DB_NAME = "store.sqlite3"
LOCK_NAME = "LOCK"
SCHEMA_VERSION = 1
COMPACT_MIN_ROWS = 1000
COMPACT_MIN_BYTES = 64 * 1024
# Replaying one log row costs about as much as decoding this many snapshot bytes (measured:
# ~5 us per small update vs ~20 ns per snapshot byte), so short edits count for more than
# their size when deciding whether a compaction pays off.
ROW_COST = 256
# On close, docs with at least this many log rows are compacted so the next start is fast.
CLOSE_COMPACT_MIN_ROWS = 16
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY,
    doc TEXT NOT NULL, data BLOB NOT NULL, crc INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS log_doc ON log (doc, id);
CREATE TABLE IF NOT EXISTS snapshot (
    doc TEXT PRIMARY KEY, data BLOB NOT NULL, crc INTEGER NOT NULL);
"""


class Store(Protocol):
    """The local_cache contract every backend meets (see `unity_crdt.testing.check_store`)."""

    @property
    def recovered_from(self) -> Path | None:
        """Where a corrupt cache was moved at open, or None."""
        ...

    async def open(self) -> None:
        """Open (and lock) the cache."""
        ...

    async def append(self, doc: str, update: bytes) -> None:
        """Add one update to a doc's log; durable once this returns."""
        ...

    async def load(self, doc: str) -> list[bytes]:
        """The doc's snapshot (if any) then its log tail, in order; [] for an unknown doc."""
        ...

    async def docs(self) -> list[str]:
        """Names of the docs that have stored state, sorted."""
        ...

    async def compact(self, doc: str) -> None:
        """Fold the doc's log into its snapshot now."""
        ...

    async def close(self) -> None:
        """Flush everything and release the cache."""
        ...

    async def __aenter__(self) -> Self:
        """Open the store."""
        ...

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the store."""
        ...


def row_crc(doc: str, data: bytes) -> int:
    """The checksum stored with each row: CRC32 over the doc name, a NUL, and the bytes."""
    return zlib.crc32(data, zlib.crc32(doc.encode("utf-8") + b"\0"))


def should_compact(
    log_rows: int, log_bytes: int, snapshot_bytes: int, min_rows: int, min_bytes: int
) -> bool:
    """Whether replaying the log now costs more than the snapshot (past a small floor)."""
    if log_rows < min_rows and log_bytes < min_bytes:
        return False
    return log_bytes + ROW_COST * log_rows > snapshot_bytes


def compact_updates(snapshot: bytes | None, rows: list[bytes]) -> tuple[bytes, list[int]]:
    """Apply snapshot + rows to a fresh Doc; return its full state and the rows to keep.

    A row is kept when some of its items are still pending (their dependencies never
    arrived): `get_update()` leaves pending items out, so deleting such a row would lose it.
    Rows pycrdt cannot parse are logged and dropped (they could never apply).
    """
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    if snapshot is not None:
        try:
            doc.apply_update(snapshot)
        except Exception as exc:
            log.error("local cache: a snapshot does not parse (%s); compacting without it", exc)
    usable: list[int] = []
    for i, row in enumerate(rows):
        try:
            doc.apply_update(row)
        except Exception as exc:
            log.warning("local cache: log row %d does not parse (%s); dropped", i, exc)
        else:
            usable.append(i)
    state = doc.get_state()
    # The part of a row not covered by the doc's state vector starts with its count of
    # clients that still have structs: anything but 0 means pending items.
    keep = [i for i in usable if pycrdt.get_update(rows[i], state)[:1] != b"\x00"]
    return doc.get_update(), keep


@dataclass
class _Stats:
    log_rows: int = 0
    log_bytes: int = 0
    snapshot_bytes: int = 0


@dataclass
class _Job:
    kind: str
    args: tuple[Any, ...]
    fut: asyncio.Future[Any]


class SqliteStore:
    """The local_cache on disk: SQLite in WAL mode, driven by one worker thread."""

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        compact_min_rows: int = COMPACT_MIN_ROWS,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / DB_NAME
        self._min_rows = compact_min_rows
        self._min_bytes = compact_min_bytes
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._stats: dict[str, _Stats] = {}
        self._dirty: set[str] = set()
        self._recovered_from: Path | None = None
        self._closed = False
        self.commits = 0  # append transactions committed: fewer than appends means batching

    @property
    def recovered_from(self) -> Path | None:
        """Where a corrupt cache file was moved when this store opened, or None."""
        return self._recovered_from

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Lock the cache dir, open (or recover) the database, and start the worker."""
        if self._thread is not None:
            raise StoreError(f"local cache {self.cache_dir} is already open")
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._recovered_from = None
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="unity-crdt-store", daemon=True)
        self._thread.start()
        try:
            await self._submit("open")
        except BaseException:
            await self._stop_thread()
            raise

    async def append(self, doc: str, update: bytes) -> None:
        """Add one update to `doc`'s log; returns once it is committed (fsynced)."""
        check_doc_id(doc)
        if not isinstance(update, bytes | bytearray | memoryview):
            raise TypeError(f"update must be bytes, not {type(update).__name__}")
        await self._submit("append", doc, bytes(update))

    async def load(self, doc: str) -> list[bytes]:
        """The snapshot (if any) then the log tail in order; damaged rows are skipped."""
        check_doc_id(doc)
        result: list[bytes] = await self._submit("load", doc)
        return result

    async def docs(self) -> list[str]:
        """Names of the docs with stored state, sorted."""
        result: list[str] = await self._submit("docs")
        return result

    async def compact(self, doc: str) -> None:
        """Fold `doc`'s log into its snapshot now."""
        check_doc_id(doc)
        await self._submit("compact", doc)

    async def close(self) -> None:
        """Commit everything queued, compact dirty docs, close the file, release the lock."""
        if self._thread is None:
            return
        try:
            await self._submit("close")
        finally:
            await self._stop_thread()

    # -- event-loop side -------------------------------------------------------------------

    def _submit(self, kind: str, *args: Any) -> asyncio.Future[Any]:
        if self._thread is None or self._closed or self._loop is None:
            raise StoreError(f"local cache {self.cache_dir} is not open")
        if kind == "close":
            self._closed = True
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._jobs.put(_Job(kind, args, fut))
        return fut

    async def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        self._closed = True
        if thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(thread.join)

    def _settle(self, done: list[tuple[_Job, Any, BaseException | None]]) -> None:
        def apply() -> None:
            for job, result, exc in done:
                if job.fut.done():
                    continue  # the caller was cancelled; the write may still have happened
                if exc is not None:
                    job.fut.set_exception(exc)
                else:
                    job.fut.set_result(result)

        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(apply)

    # -- worker thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                self._abandon()
                return
            batch = [first]
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)
                    break
                batch.append(job)
            done: list[tuple[_Job, Any, BaseException | None]] = []
            appends: list[_Job] = []
            for job in batch:
                if job.kind == "append" and self._conn is not None:
                    appends.append(job)
                    continue
                if appends:
                    done += self._commit(appends)
                    appends = []
                done.append(self._run(job))
            if appends:
                done += self._commit(appends)
            self._settle(done)
            self._auto_compact()

    def _run(self, job: _Job) -> tuple[_Job, Any, BaseException | None]:
        try:
            if self._conn is None and job.kind != "open":
                raise StoreError(f"local cache {self.cache_dir} is not open")
            handler: Callable[..., Any] = getattr(self, f"_do_{job.kind}")
            return job, handler(*job.args), None
        except sqlite3.Error as exc:
            return job, None, StoreError(f"local cache {self.path}: {job.kind} failed: {exc}")
        except Exception as exc:
            return job, None, exc

    def _commit(self, jobs: list[_Job]) -> list[tuple[_Job, Any, BaseException | None]]:
        conn = self._conn
        assert conn is not None
        rows = [(doc, data, row_crc(doc, data)) for doc, data in (job.args for job in jobs)]
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO log (doc, data, crc) VALUES (?, ?, ?)", rows)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            err = StoreError(f"could not write to local cache {self.path}: {exc}")
            return [(job, None, err) for job in jobs]
        self.commits += 1
        for doc, data, _ in rows:
            stats = self._stats.setdefault(doc, _Stats())
            stats.log_rows += 1
            stats.log_bytes += len(data)
            self._dirty.add(doc)
        return [(job, None, None) for job in jobs]

    def _auto_compact(self) -> None:
        for doc in list(self._dirty):
            s = self._stats[doc]
            if should_compact(
                s.log_rows, s.log_bytes, s.snapshot_bytes, self._min_rows, self._min_bytes
            ):
                try:
                    self._do_compact(doc)
                except (sqlite3.Error, StoreError) as exc:
                    log.error(
                        "local cache %s: compaction of doc %r failed: %s", self.path, doc, exc
                    )
                    self._dirty.discard(doc)

    def _do_open(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = _acquire_lock(self.cache_dir / LOCK_NAME, self.cache_dir)
        try:
            try:
                self._conn = self._connect()
            except _Corrupt as exc:
                target = _move_aside(self.path)
                log.error(
                    "local cache %s is corrupt (%s); moved it to %s and opened a fresh cache; "
                    "its documents will be re-synced from peers and checkpoints",
                    self.path,
                    exc,
                    target,
                )
                self._recovered_from = target
                self._conn = self._connect()
        except BaseException:
            _release_lock(self._lock_fd)
            self._lock_fd = None
            raise

    def _connect(self) -> sqlite3.Connection:
        existed = self.path.exists()
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=0.5)
        try:
            # We hold LOCK anyway; exclusive mode skips the -shm file and per-transaction
            # file locks (faster open and commits) and keeps any rogue opener out.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"local cache {self.path}: cannot enable WAL (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            if existed:
                problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
                if problems != ["ok"]:
                    raise _Corrupt(f"quick_check: {'; '.join(problems[:3])}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"local cache {self.path} has schema version {version}, this library "
                    f"reads {SCHEMA_VERSION} (written by a newer version?)"
                )
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
            if exc.sqlite_errorcode & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                raise _Corrupt(str(exc)) from exc
            raise StoreError(f"cannot open local cache {self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        if not existed:
            _fsync_dir(self.cache_dir)  # SQLite syncs the dir for its WAL, not for a new db
        return conn

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

    def _do_load(self, doc: str) -> list[bytes]:
        snapshot, rows = self._read(doc)
        head = [] if snapshot is None else [snapshot]
        return head + [data for _, data in rows]

    def _do_docs(self) -> list[str]:
        return sorted(d for d, s in self._stats.items() if s.log_rows or s.snapshot_bytes)

    def _do_compact(self, doc: str) -> None:
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
            conn.execute("ROLLBACK")
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

    def _abandon(self) -> None:
        # Reached only when open() was cancelled or failed half-way: drop what it acquired.
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        _release_lock(self._lock_fd)
        self._lock_fd = None

    def _do_close(self) -> None:
        try:
            for doc, s in self._stats.items():
                if s.log_rows >= CLOSE_COMPACT_MIN_ROWS and doc in self._dirty:
                    try:
                        self._do_compact(doc)
                    except (sqlite3.Error, StoreError) as exc:
                        log.error(
                            "local cache %s: compaction of %r failed: %s", self.path, doc, exc
                        )
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            _release_lock(self._lock_fd)
            self._lock_fd = None


class _Corrupt(Exception):
    """The database file failed to open or to check; it will be moved aside."""


def _acquire_lock(path: Path, cache_dir: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 256).decode("utf-8", "replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on host {holder[1]}" if len(holder) == 2 else "another process"
        raise CacheLockedError(
            f"local cache {cache_dir} is in use by {who} (lock file {path})"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor drops the flock


def _move_aside(db: Path) -> Path:
    n = 1
    while any(db.with_name(f"{db.name}.corrupt-{n}{s}").exists() for s in ("", "-wal", "-shm")):
        n += 1
    target = db.with_name(f"{db.name}.corrupt-{n}")
    for suffix in ("", "-wal", "-shm"):
        src = db.with_name(db.name + suffix)
        if src.exists():
            os.rename(src, db.with_name(target.name + suffix))
    _fsync_dir(db.parent)
    return target


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_KEY_MAGIC = b"UCK1"
_KEY_DIGEST = 8


def load_or_create_secret_file(path: Path, create: Callable[[], bytes], *, size: int = 32) -> bytes:
    """Read the secret in `path`, or create it once (0600, fsynced, never overwritten).

    File format: b"UCK1" + secret + blake2b-8(secret), so damage is detected. A damaged or
    wrong-size file raises StoreError naming the path and is left untouched.
    """
    path = Path(path)
    try:
        return _read_secret(path, size)
    except FileNotFoundError:
        pass
    secret = create()
    if len(secret) != size:
        raise ValueError(f"create() returned {len(secret)} bytes, expected {size}")
    body = _KEY_MAGIC + secret + hashlib.blake2b(secret, digest_size=_KEY_DIGEST).digest()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link(), unlike rename(), fails if a racing creator got there first: theirs wins.
        os.link(tmp, path)
    except FileExistsError:
        return _read_secret(path, size)
    finally:
        os.unlink(tmp)
        _fsync_dir(path.parent)
    return secret


def _read_secret(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        data = f.read(len(_KEY_MAGIC) + size + _KEY_DIGEST + 1)
    secret = data[len(_KEY_MAGIC) : len(_KEY_MAGIC) + size]
    digest = hashlib.blake2b(secret, digest_size=_KEY_DIGEST).digest()
    if (
        len(data) != len(_KEY_MAGIC) + size + _KEY_DIGEST
        or not data.startswith(_KEY_MAGIC)
        or data[-_KEY_DIGEST:] != digest
    ):
        raise StoreError(
            f"key file {path} is damaged or not a key file ({len(data)} bytes); it was left "
            "untouched: move it away to create a new key"
        )
    if mode & 0o077:
        log.warning("key file %s is readable by other users; run chmod 600 on it", path)
    return secret


class MemoryStore:
    """The Store contract in memory, for sans-IO tests; contents survive close and reopen."""

    def __init__(
        self,
        *,
        compact_min_rows: int = COMPACT_MIN_ROWS,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        self._snapshots: dict[str, bytes] = {}
        self._logs: dict[str, list[bytes]] = {}
        self._min_rows = compact_min_rows
        self._min_bytes = compact_min_bytes
        self._open = False

    @property
    def recovered_from(self) -> Path | None:
        """Always None: memory cannot be corrupt on disk."""
        return None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Mark the store open."""
        if self._open:
            raise StoreError("memory store is already open")
        self._open = True

    async def append(self, doc: str, update: bytes) -> None:
        """Add one update to `doc`'s log."""
        self._check(doc)
        if not isinstance(update, bytes | bytearray | memoryview):
            raise TypeError(f"update must be bytes, not {type(update).__name__}")
        rows = self._logs.setdefault(doc, [])
        rows.append(bytes(update))
        size = sum(len(r) for r in rows)
        if should_compact(
            len(rows), size, len(self._snapshots.get(doc, b"")), self._min_rows, self._min_bytes
        ):
            self._compact(doc)

    async def load(self, doc: str) -> list[bytes]:
        """The snapshot (if any) then the log, in order."""
        self._check(doc)
        head = [self._snapshots[doc]] if doc in self._snapshots else []
        return head + list(self._logs.get(doc, []))

    async def docs(self) -> list[str]:
        """Names of the docs with stored state, sorted."""
        self._check(None)
        return sorted(set(self._snapshots) | {d for d, rows in self._logs.items() if rows})

    async def compact(self, doc: str) -> None:
        """Fold `doc`'s log into its snapshot."""
        self._check(doc)
        self._compact(doc)

    async def close(self) -> None:
        """Mark the store closed (the contents stay, for a later reopen)."""
        self._open = False

    def _check(self, doc: str | None) -> None:
        if not self._open:
            raise StoreError("memory store is not open")
        if doc is not None:
            check_doc_id(doc)

    def _compact(self, doc: str) -> None:
        rows = self._logs.get(doc, [])
        if rows:
            state, keep = compact_updates(self._snapshots.get(doc), rows)
            self._snapshots[doc] = state
            self._logs[doc] = [rows[i] for i in keep]
