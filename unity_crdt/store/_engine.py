"""The local_cache's SQLite file, driven synchronously from one thread at a time.

`CacheDb` is the storage engine behind `store.sqlite.SqliteStore` (which owns the thread,
the job queue and the event-loop side): opening (with `_scan`), inserts, reads with row CRCs
(`_rows`), the transactions compaction is made of (`_compactor`), quarantine, rebuilding a
damaged file (`_recovery`), backups and giving free pages back (`_upkeep`).

What was read at open is the truth about what the file holds: the open reads every log row
(checking its CRC) and the metadata of every snapshot part, and keeps per doc the rowids of
its rows and parts (`_index.FileIndex`), so later reads go by rowid only, never through an
index. Damage is met where it shows: at open, at a load, at a write. What to do about it:

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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import StoreError
from ..status import CacheRecovery
from . import _upkeep
from ._compaction import row_crc
from ._index import FileIndex
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
from ._rows import quarantine, read_log, read_parts, write_rows
from ._scan import Bad, ScanResult, counts_of, scan
from ._schema import (
    SCHEMA_VERSION,
    Damaged,
    check_header,
    connect,
    create_tables,
    is_damage,
    read_version,
)
from .files import DB_NAME, acquire_lock, cache_os_error, make_private, release_lock, replace_db

__all__ = ["CLOSE_COMPACT_MIN_ROWS", "CacheDb"]

log = logging.getLogger(__name__)

# On close, docs with at least this many log rows are compacted so the next start is fast.
CLOSE_COMPACT_MIN_ROWS = 16
_MAX_RECOVERIES = 32
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
        self.index = FileIndex()
        self.incremental = False  # the file gives free pages back (auto_vacuum=INCREMENTAL)
        # Log rows, snapshot parts, and the generation being written in parts (0: none), as
        # the file holds them (kept in its `meta` row too).
        self.counts = [0, 0, 0]

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
        unlink_db(Path(f"{self.path}.new"))  # a rebuild that never finished
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
        self.counts = counts_of(found)
        repairs = take_repairable(found)
        stale = self.index.rebuild(found, building=self.counts[2])
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

    def _preload(self, found: ScanResult) -> dict[str, list[bytes]]:
        budget = self._preload_bytes
        cached = {r.id: r.data for r in found.rows if r.data is not None}
        out: dict[str, list[bytes]] = {}
        for doc in self.docs():
            d = self.index.docs[doc]
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
        return self.index.names()

    def touched(self) -> list[str]:
        """Docs appended to since the last call whose log now calls for a compaction."""
        return self.index.touched(self.min_rows, self.min_bytes)

    def close_candidates(self) -> list[str]:
        """Docs to compact before closing: written since their last compaction, with a tail."""
        return self.index.close_candidates(CLOSE_COMPACT_MIN_ROWS)

    def write(
        self, what: str, sql: str, rows: list[tuple[Any, ...]], building: int | None = None
    ) -> None:
        """Run `sql` (an INSERT INTO or DELETE FROM log or snapshot) for each of `rows` in
        one durable transaction, with the row counts and (if given) the generation being
        built (no recovery here)."""
        self.counts = write_rows(self.conn, self.counts, what, sql, rows, building, self.failpoint)

    def close(self) -> None:
        """Close the file and release the lock (compactions are the store's business)."""
        try:
            was_open = self._conn is not None
            self._drop_conn()
            if was_open:
                _upkeep.keep_wal_file(self.path)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close the file and release the lock without any more writes."""
        self._drop_conn()
        release_lock(self._lock_fd)
        self._lock_fd = None

    def backup(self, dest: Path) -> None:
        """Write a consistent copy of the file to `dest` (0600), atomically."""
        _upkeep.backup(self.conn, dest)

    def vacuum_step(self, pages: int) -> bool:
        """Give up to `pages` free pages back to the file system; True while more are free."""
        if not self.incremental:
            return False
        return _upkeep.vacuum_step(self.conn, pages)

    # -- internals ---------------------------------------------------------------------------

    def _insert(self, rows: list[tuple[str, bytes]]) -> None:
        first = self.index.next_id
        values = [(first + i, doc, row_crc(doc, data), data) for i, (doc, data) in enumerate(rows)]
        try:
            self.write("append", "INSERT INTO log (id, doc, crc, data) VALUES (?, ?, ?, ?)", values)
        except sqlite3.IntegrityError:  # an id taken behind our back: resync, once
            top = self.conn.execute("SELECT MAX(id) FROM log").fetchone()[0] or 0
            self.index.next_id = top + 1
            first = self.index.next_id
            values = [(first + i, d, c, data) for i, (_, d, c, data) in enumerate(values)]
            self.write("append", "INSERT INTO log (id, doc, crc, data) VALUES (?, ?, ?, ?)", values)
        self.index.next_id = first + len(rows)
        self.index.appended((rowid, doc, len(data)) for rowid, doc, _, data in values)

    def _load(self, doc: str, cached: dict[int, bytes | None]) -> list[bytes]:
        d = self.index.docs.get(doc)
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
        d = self.index.docs.get(doc)
        if d is None or not d.parts:
            return None
        snapshot, bad = read_parts(self.conn, doc, d)
        if bad:
            d.parts, d.gen = [], -1
            self._lost_at_load(bad)
        return snapshot

    def read_rows(self, doc: str, ids: list[int]) -> dict[int, bytes]:
        """The checked data of log rows `ids` of `doc`; damaged ones are quarantined."""
        out, bad = read_log(self.conn, doc, ids)
        if bad:
            d = self.index.docs[doc]
            for b in bad:
                d.log_bytes -= d.log.pop(b.id, 0)
            self._lost_at_load(bad)
        return out

    def _lost_at_load(self, bad: list[Bad]) -> None:
        """Quarantine what a load found damaged (a missing row has nothing to keep); report."""
        self._quarantine([b for b in bad if b.reason != "row is missing"], [])
        self._report(record([ScanResult(bad=bad)], "", "load", None))

    def _quarantine(
        self, bad: list[Bad], stale: list[int], repairs: list[tuple[int, str]] | None = None
    ) -> None:
        """Move failing rows into the quarantine table; drop superseded snapshot parts; put
        back the doc names of `repairs` (rowid, name) after keeping a copy of each."""
        conn = self.conn
        try:
            self.counts = quarantine(conn, self.counts, bad, stale, repairs or [], self.failpoint)
        except sqlite3.DatabaseError as exc:
            if is_damage(exc):
                raise
            # They stay where they are, out of every doc; the next open finds them again.
            log.warning("local cache %s: could not quarantine damaged rows: %s", self.path, exc)

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
