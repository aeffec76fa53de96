"""The local_cache's SQLite file, driven synchronously from one thread at a time.

`CacheDb` is the storage engine behind `store.sqlite.SqliteStore` (which owns the thread,
the job queue and the event-loop side): opening (with `_scan`), inserts, reads with row CRCs,
the transactions compaction is made of (`_compactor`), quarantine, rebuilding a damaged file
(`_recovery`), backups and giving free pages back.

What was read at open is the truth about what the file holds: the open reads every log row
(checking its CRC) and the metadata of every snapshot part, and keeps per doc the rowids of
its rows and parts, so later reads go by rowid only, never through an index. Damage is met
where it shows: at open, at a load, at a write. What to do about it:

* A row or part failing its CRC in a sound file is moved into the `quarantine` table (copied,
  then deleted from its own table, in one transaction): nothing is overwritten, and the doc
  loads without it.
* Damage SQLite itself reports (a bad page, a damaged header or schema) makes the engine
  rebuild: every readable row is copied into a fresh file (`_salvage`), the damaged file
  is kept beside it as `store.sqlite3.corrupt-<n>`, and the operation is retried on the fresh
  file. Docs already read stay loaded; what could not be read is reported.

Every recovery is recorded (`recoveries`, a `status.CacheRecovery` each) and logged as one
ERROR line naming the docs that lost rows and how many.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import StoreError
from ..status import CacheRecovery
from ._compaction import part_crc, row_crc, should_compact
from ._index import DocRows, index_docs
from ._recovery import (
    close_quietly,
    lossy,
    record,
    report,
    salvage_into,
    salvage_repaired,
    take_repairable,
    unlink_db,
)
from ._scan import Bad, ScanResult, quarantine_copy, scan
from ._schema import (
    SCHEMA_VERSION,
    Damaged,
    check_header,
    connect,
    create_tables,
    is_damage,
    meta_crc,
    read_version,
    set_counts,
)
from .files import (
    DB_NAME,
    acquire_lock,
    cache_os_error,
    fsync_dir,
    make_private,
    release_lock,
    replace_db,
)

__all__ = ["CLOSE_COMPACT_MIN_ROWS", "CacheDb"]

log = logging.getLogger(__name__)

# On close, docs with at least this many log rows are compacted so the next start is fast.
CLOSE_COMPACT_MIN_ROWS = 16
_MAX_RECOVERIES = 32
_IN_CHUNK = 500  # rowids per "WHERE id IN (...)"
_T = TypeVar("_T")


class CacheDb:
    """`cache_dir/store.sqlite3` (WAL, synchronous=FULL, exclusive) under `cache_dir/LOCK`.

    Not thread-safe: one thread at a time (open may run on another thread than the rest).
    `failpoint`, if set, is called with the operation's name right before each commit (tests
    make it raise, as a full disk would). `on_recover(docs)` is called after a rebuild met
    after open with the docs that may have lost rows, and returns what becomes of them.
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
        self.recoveries: list[CacheRecovery] = []
        self.failpoint: Callable[[str], None] | None = None
        self.rebuilds = 0  # bumped by every rebuild: compaction steps check it
        self.min_rows = min_rows
        self.min_bytes = min_bytes
        self._preload_bytes = preload_bytes
        self._on_recover = on_recover
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self.docs_rows: dict[str, DocRows] = {}
        self._touched: set[str] = set()
        self._next_id = 1
        self.next_part_id = 1
        self.next_gen = 1
        self.incremental = False  # the file gives free pages back (auto_vacuum=INCREMENTAL)
        # Log rows, snapshot parts, and the generation being written in parts (0: none), as
        # the file holds them (kept in its `meta` row too).
        self.counts = [0, 0, 0]
        self.orphans: list[int] = []  # parts of a generation never finished, to delete

    @property
    def is_open(self) -> bool:
        """Whether a database connection is open."""
        return self._conn is not None

    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection (StoreError if closed)."""
        if self._conn is None:
            raise StoreError(f"local cache {self.cache_dir} is not open")
        return self._conn

    # -- open --------------------------------------------------------------------------------

    def open(self) -> tuple[list[str], dict[str, list[bytes]]]:
        """Lock, open (salvaging a damaged file), and read docs up to the preload budget.

        Returns the names of the stored docs and the contents of those it read.
        """
        self._lock_fd = acquire_lock(self.cache_dir)
        try:
            found = self._open_file()
            preloaded = self._preload(found)
        except sqlite3.Error as exc:
            self.abandon()
            raise StoreError(f"cannot open local cache {self.path}: {exc}") from exc
        except OSError as exc:
            self.abandon()
            raise cache_os_error(self.cache_dir, exc, "open") from exc
        except BaseException:
            self.abandon()
            raise
        return self.docs(), preloaded

    def _open_file(self) -> ScanResult:
        for suffix in ("", "-wal", "-shm"):  # a rebuild that never finished
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}.new{suffix}")
        for suffix in ("", "-wal"):
            if suffix == "" or os.path.exists(f"{self.path}{suffix}"):
                make_private(Path(f"{self.path}{suffix}"))
        conn: sqlite3.Connection | None = None
        reason: str | None = None  # None: a sound schema-1 file, rebuilt into schema 2
        try:
            check_header(self.path)
            conn = connect(self.path)
            version = read_version(conn, self.path)
            if version == 0:
                create_tables(conn)
                version = SCHEMA_VERSION
            if version == SCHEMA_VERSION:
                found = scan(conn, self._preload_bytes)
                self._conn, conn = conn, None
                self._settle_scan(found, "open")
                return found
        except (sqlite3.DatabaseError, Damaged, UnicodeDecodeError) as exc:
            if not is_damage(exc):
                close_quietly(conn)
                raise
            reason = str(exc)
            if self._conn is not None:  # the scan passed, settling it met damage
                conn, self._conn = self._conn, None
        except BaseException:
            close_quietly(conn)
            raise
        return self._rebuild(conn, reason, "open")

    def _settle_scan(
        self,
        found: ScanResult,
        during: str,
        salvaged: ScanResult | None = None,
        reason: str | None = None,
        moved: Path | None = None,
        midrun: list[str] | None = None,
    ) -> None:
        """Index what a scan found; quarantine what failed its checks; report any loss."""
        recorded = found.meta
        ok = recorded is not None and meta_crc(*recorded[:3]) == recorded[3]
        self.counts = [
            len(found.rows) + sum(b.table == "log" for b in found.bad),
            len(found.parts) + sum(b.table == "snapshot" for b in found.bad),
            recorded[2] if ok and recorded is not None else 0,
        ]
        if not ok or recorded is None:
            found.unreadable.append("the row counts (cannot tell whether rows went missing)")
        elif [recorded[0], recorded[1]] != self.counts[:2]:
            found.damaged = True
            found.unreadable.append(
                f"{recorded[0]} log rows and {recorded[1]} snapshot parts were written, "
                f"{self.counts[0]} and {self.counts[1]} are left: rows vanished"
            )
        repairs = take_repairable(found)
        stale = self._index(found, building=self.counts[2])
        self.counts[2] = 0  # what was being built is gone (or about to be)
        self.incremental = self.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        resync = recorded is None or tuple(recorded[:3]) != tuple(self.counts)
        if found.bad or stale or found.unreadable or repairs or resync:
            self._quarantine(found.bad, stale, repairs)
        sources = [f for f in (salvaged, found) if f is not None]
        lost = found.bad or found.unreadable or (salvaged is not None and lossy(salvaged))
        if not (lost or repairs or reason is not None):
            return
        rec = record(sources, reason or "", during, moved)
        fate = ""
        if midrun is not None:
            hit = midrun if rec.everything or rec.unattributed else [d for d, _ in rec.lost]
            fate = self._on_recover(sorted(set(hit) & set(midrun)))
        self._report(rec, fate)

    def _index(self, found: ScanResult, building: int = 0) -> list[int]:
        """Rebuild `docs_rows` from a scan; return superseded snapshot parts to delete."""
        self.docs_rows, stale = index_docs(found, building)
        self.orphans = []
        self._touched = set(self.docs_rows)
        ids = [0] + [r.id for r in found.rows] + [b.id for b in found.bad if b.table == "log"]
        self._next_id = max(ids) + 1
        all_parts = [p.id for p in found.parts] + [b.id for b in found.bad]
        self.next_part_id = max([0, *all_parts]) + 1
        self.next_gen = max([0, *(p.gen for p in found.parts)]) + 1
        return stale

    def _preload(self, found: ScanResult) -> dict[str, list[bytes]]:
        budget = self._preload_bytes
        cached = {r.id: r.data for r in found.rows if r.data is not None}
        out: dict[str, list[bytes]] = {}
        for doc in self.docs():
            d = self.docs_rows[doc]
            size = d.snapshot_bytes + d.log_bytes
            if size > budget or any(i not in cached for i in d.log):
                continue
            budget -= size
            out[doc] = self._guarded("load", self._load, doc, cached)
        return out

    # -- reads and writes ------------------------------------------------------------------

    def insert(self, rows: list[tuple[str, bytes]]) -> None:
        """Append rows (doc, update) to the log in one durable transaction."""
        self._guarded("append", self._insert, rows)

    def load(self, doc: str) -> list[bytes]:
        """The doc's snapshot (if any) then its log rows; damaged ones are quarantined."""
        return self._guarded("load", self._load, doc, {})

    def docs(self) -> list[str]:
        """Names of the docs with stored state, sorted."""
        return sorted(doc for doc, d in self.docs_rows.items() if d.log or d.parts)

    def touched(self) -> list[str]:
        """Docs appended to since the last call whose log now calls for a compaction."""
        out = []
        for doc in self._touched:
            d = self.docs_rows.get(doc)
            if d is not None and should_compact(
                len(d.log), d.log_bytes, d.snapshot_bytes, self.min_rows, self.min_bytes
            ):
                out.append(doc)
        self._touched = set()
        return out

    def close_candidates(self) -> list[str]:
        """Docs to compact before closing: written since their last compaction, with a tail."""
        return sorted(
            doc
            for doc, d in self.docs_rows.items()
            if d.dirty and len(d.log) >= CLOSE_COMPACT_MIN_ROWS
        )

    def write(
        self, what: str, sql: str, rows: list[tuple[Any, ...]], building: int | None = None
    ) -> None:
        """Run `sql` (an INSERT INTO or DELETE FROM log or snapshot) for each of `rows` in
        one durable transaction, with the row counts and (if given) the generation being
        built (no recovery here)."""
        conn = self.conn
        verb, _, table = sql.split()[:3]
        try:
            conn.execute("BEGIN IMMEDIATE")
            changed = conn.executemany(sql, rows).rowcount
            counts = list(self.counts)
            counts[table != "log"] += changed if verb == "INSERT" else -changed
            if building is not None:
                counts[2] = building
            set_counts(conn, *counts)
            if self.failpoint is not None:
                self.failpoint(what)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self.counts = counts

    def guarded(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """Run `fn`; if it meets damage, rebuild the file and run it again once."""
        return self._guarded(what, fn, *args)

    def close(self) -> None:
        """Close the file and release the lock (compactions are the store's business)."""
        try:
            was_open = self._conn is not None
            self._drop_conn()
            if was_open:
                _keep_wal_file(self.path)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close the file and release the lock without any more writes."""
        self._drop_conn()
        release_lock(self._lock_fd)
        self._lock_fd = None

    def backup(self, dest: Path) -> None:
        """Write a consistent copy of the file to `dest` (0600), atomically (SQLite's online
        backup, from this connection: the exclusive lock keeps other readers out)."""
        tmp = dest.with_name(f".{dest.name}.partial")
        unlink_db(tmp)
        make_private(tmp)
        try:
            target = sqlite3.connect(tmp)
            try:
                self.conn.backup(target)
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

    def vacuum_step(self, pages: int) -> bool:
        """Give up to `pages` free pages back to the file system; True while more are free."""
        if not self.incremental:
            return False
        conn = self.conn
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

    # -- internals ---------------------------------------------------------------------------

    def _insert(self, rows: list[tuple[str, bytes]]) -> None:
        first = self._next_id
        values = [(first + i, doc, row_crc(doc, data), data) for i, (doc, data) in enumerate(rows)]
        try:
            self.write("append", "INSERT INTO log (id, doc, crc, data) VALUES (?, ?, ?, ?)", values)
        except sqlite3.IntegrityError:  # an id taken behind our back: resync, once
            top = self.conn.execute("SELECT MAX(id) FROM log").fetchone()[0] or 0
            self._next_id = top + 1
            first = self._next_id
            values = [(first + i, d, c, data) for i, (_, d, c, data) in enumerate(values)]
            self.write("append", "INSERT INTO log (id, doc, crc, data) VALUES (?, ?, ?, ?)", values)
        self._next_id = first + len(rows)
        for rowid, doc, _, data in values:
            d = self.docs_rows.setdefault(doc, DocRows())
            d.log[rowid] = len(data)
            d.log_bytes += len(data)
            d.dirty = True
            self._touched.add(doc)

    def _load(self, doc: str, cached: dict[int, bytes | None]) -> list[bytes]:
        d = self.docs_rows.get(doc)
        if d is None:
            return []
        out = []
        snapshot = self.read_snapshot(doc)
        if snapshot is not None:
            out.append(snapshot)
        rows = self.read_rows(doc, [i for i in d.log if cached.get(i) is None])
        for rowid in list(d.log):
            data = cached.get(rowid) or rows.get(rowid)
            if data is not None:
                out.append(data)
        return out

    def read_snapshot(self, doc: str) -> bytes | None:
        """The doc's snapshot, its parts checked; a damaged one is quarantined and reported."""
        d = self.docs_rows.get(doc)
        if d is None or not d.parts:
            return None
        raw, chunks = doc.encode(), []
        for index, (rowid, _) in enumerate(d.parts):
            row = self.conn.execute(
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
                d.parts, d.gen = [], -1
                self._quarantine(bad, [])
                self._report(record([ScanResult(bad=bad)], "", "load", None))
                return None
            chunks.append(data)
        return b"".join(chunks)

    def read_rows(self, doc: str, ids: list[int]) -> dict[int, bytes]:
        """The checked data of log rows `ids` of `doc`; damaged ones are quarantined."""
        out: dict[int, bytes] = {}
        raw = doc.encode()
        bad: list[Bad] = []
        for i in range(0, len(ids), _IN_CHUNK):
            chunk = ids[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            for rowid, name, crc, data in self.conn.execute(
                f"SELECT id, CAST(doc AS BLOB), crc, data FROM log WHERE id IN ({marks})", chunk
            ):
                if name == raw and isinstance(data, bytes) and row_crc(doc, data) == crc:
                    out[rowid] = data
                else:
                    bad.append(Bad("log", rowid, doc, "checksum mismatch", raw_doc=name))
        bad += [Bad("log", i, doc, "row is missing") for i in ids if i not in out]
        if bad:
            d = self.docs_rows[doc]
            for b in bad:
                d.log_bytes -= d.log.pop(b.id, 0)
            self._quarantine([b for b in bad if b.reason != "row is missing"], [])
            self._report(record([ScanResult(bad=bad)], "", "load", None))
        return out

    def _quarantine(
        self, bad: list[Bad], stale: list[int], repairs: list[tuple[int, str]] | None = None
    ) -> None:
        """Move failing rows into the quarantine table; drop superseded snapshot parts; put
        back the doc names of `repairs` (rowid, name) after keeping a copy of each."""
        conn = self.conn
        counts = list(self.counts)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for rowid, name in repairs or []:
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
            if self.failpoint is not None:
                self.failpoint("quarantine")
            conn.execute("COMMIT")
            self.counts = counts
        except sqlite3.DatabaseError as exc:
            _rollback(conn)
            if is_damage(exc):
                raise
            # They stay where they are, out of every doc; the next open finds them again.
            log.warning("local cache %s: could not quarantine damaged rows: %s", self.path, exc)
        except BaseException:
            _rollback(conn)
            raise

    def _guarded(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return fn(*args)
        except (sqlite3.DatabaseError, Damaged, UnicodeDecodeError) as exc:
            if not is_damage(exc) or self._conn is None:
                raise
            self.recover(what, exc)
        return fn(*args)

    def recover(self, what: str, exc: BaseException) -> None:
        """Rebuild the file after damage met by `what` after open."""
        before = self.docs()
        old, self._conn = self._conn, None
        self._rebuild(old, str(exc), what, midrun=before)

    def _rebuild(
        self,
        old: sqlite3.Connection | None,
        reason: str | None,
        during: str,
        midrun: list[str] | None = None,
    ) -> ScanResult:
        """Copy what `old` holds into a fresh file, switch to it, and scan that.

        `reason` None: a schema-1 file upgraded (kept aside only if anything failed). The
        damaged file is kept as `store.sqlite3.corrupt-<n>`, never deleted. If the fresh file
        cannot be written (a full disk), nothing is switched: StoreError, the old file stays
        in place (and in use, after open), and the next attempt salvages it again.
        """
        self.rebuilds += 1
        new_path = Path(f"{self.path}.new")
        try:
            salvaged = salvage_into(old, new_path)
            if salvaged.everything:  # SQLite cannot read the file as it is: repair a copy
                salvaged = salvage_repaired(self.path, new_path) or salvaged
        except Exception as exc:
            unlink_db(new_path)
            if midrun is not None:
                self._conn = old  # still readable where it is not damaged
            elif old is not None:
                close_quietly(old)
            what = "upgrade" if reason is None else "rebuild the damaged"
            raise StoreError(
                f"cannot {what} local cache {self.path} (that needs about as much free "
                f"space as the file): {exc}"
            ) from exc
        close_quietly(old)
        moved = replace_db(self.path, new_path, keep_old=reason is not None or lossy(salvaged))
        if moved is not None:
            self.recovered_from = moved
        self._conn = connect(self.path)
        found = scan(self._conn, self._preload_bytes)
        if reason is None and not lossy(salvaged):
            log.info("local cache %s upgraded to schema %d", self.path, SCHEMA_VERSION)
            self._settle_scan(found, during)
        else:
            self._settle_scan(found, during, salvaged, reason or "", moved, midrun)
        return found

    def _report(self, rec: CacheRecovery, fate: str = "") -> None:
        self.recoveries.append(rec)
        del self.recoveries[:-_MAX_RECOVERIES]
        report(self.path, rec, fate)

    def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):  # a corrupt file may fail to checkpoint
                conn.close()


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
