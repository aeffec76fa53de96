"""What the engine does with damage: salvage into a fresh file, repair doc names, and say
exactly what was lost (a `status.CacheRecovery`, and one ERROR line)."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

from ..status import CacheRecovery
from ._repair import remove_copy, repaired_copy
from ._salvage import salvage
from ._scan import LogRow, ScanResult, attribute, fix_name
from ._schema import connect, create_tables
from .files import make_private

__all__ = [
    "close_quietly",
    "lossy",
    "record",
    "report",
    "rollback",
    "salvage_into",
    "salvage_repaired",
    "take_repairable",
    "unlink_db",
]

log = logging.getLogger("unity_crdt.store._engine")  # one logger for the engine's lines


def take_repairable(found: ScanResult) -> list[tuple[int, str]]:
    """Log rows whose only damage is a flipped bit in their doc name: moved from
    `found.bad` back into `found.rows` under the name their CRC confirms."""
    repairs = []
    for b in list(found.bad):
        if b.table == "log" and isinstance(b.data, bytes) and b.raw_doc and b.crc is not None:
            name = fix_name(b.raw_doc, b.data, b.crc)
            if name is not None:
                found.bad.remove(b)
                found.rows.append(LogRow(b.id, name, len(b.data), b.data))
                repairs.append((b.id, name))
    if repairs:
        found.rows.sort(key=lambda r: r.id)
        found.repaired += len(repairs)
    return repairs


def salvage_into(old: sqlite3.Connection | None, new_path: Path) -> ScanResult:
    """Create `new_path` (0600, schema 2) and copy into it what `old` still holds."""
    unlink_db(new_path)
    make_private(new_path)
    new = connect(new_path)
    try:
        create_tables(new)
        found = salvage(old, new)
        new.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        new.close()
    return found


def salvage_repaired(db: Path, new_path: Path) -> ScanResult | None:
    """Salvage from a copy of `db` with its header and schema repaired (None: no better)."""
    copy = Path(f"{db}.salvage")
    if not repaired_copy(db, copy):
        return None
    try:
        conn = sqlite3.connect(copy, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            found = salvage_into(conn, new_path)
        finally:
            close_quietly(conn)
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        log.warning("local cache %s: the repaired copy could not be read: %s", db, exc)
        return None
    finally:
        remove_copy(copy)
    return None if found.everything else found


def record(found: list[ScanResult], reason: str, during: str, moved: Path | None) -> CacheRecovery:
    """What these scans and salvages found and lost, as one recovery."""
    bad = [b for f in found for b in f.bad]
    for b in bad:
        if b.doc is None:
            attribute(b)
    lost: dict[str, int] = {}
    for f in found:
        for doc, n in f.lost().items():
            lost[doc] = lost.get(doc, 0) + n
    seen = sorted({b.reason for b in bad} | {u for f in found for u in f.unreadable})
    what = reason or "; ".join(seen) or "damage"
    return CacheRecovery(
        at=time.time(),
        reason=f"{what} (during {during})",
        moved_to=str(moved) if moved is not None else None,
        quarantined=sum(1 for b in bad if b.reason != "row is missing"),
        lost=tuple(sorted(lost.items())),
        unattributed=sum(f.unattributed() for f in found),
        everything=any(f.everything for f in found),
        repaired=sum(f.repaired for f in found),
    )


def report(path: Path, rec: CacheRecovery, fate: str = "") -> None:
    """The one ERROR line of a recovery: what was found, kept and lost (never content)."""
    parts = [f"local cache {path} is damaged: {rec.reason}"]
    if rec.moved_to is not None:
        parts.append(f"moved it to {rec.moved_to} and rebuilt the cache from what it held")
    if rec.everything:
        parts.append("nothing could be read from it")
    if rec.lost:
        docs = ", ".join(f"{doc!r} ({n} rows)" for doc, n in rec.lost[:20])
        more = f" and {len(rec.lost) - 20} more" if len(rec.lost) > 20 else ""
        parts.append(f"lost from {len(rec.lost)} docs: {docs}{more}")
    if rec.unattributed:
        parts.append(f"{rec.unattributed} unreadable stretches of unknown docs")
    if rec.repaired:
        parts.append(f"{rec.repaired} rows repaired (a bit flipped in their doc name)")
    if rec.quarantined:
        parts.append(f"{rec.quarantined} damaged rows kept in its quarantine table")
    parts.append(fate or "what was lost re-syncs from peers and checkpoints")
    log.error("; ".join(parts))


def lossy(found: ScanResult) -> bool:
    """Whether a salvage met anything but a sound file."""
    return bool(found.bad or found.unreadable or found.everything or found.damaged)


def close_quietly(conn: sqlite3.Connection | None) -> None:
    """Close a connection to a file that may be damaged (its close may fail)."""
    if conn is not None:
        with contextlib.suppress(sqlite3.Error):
            conn.close()


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the transaction under way, if any, on a file that may be damaged."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # the error that got us here matters more
            conn.execute("ROLLBACK")


def unlink_db(path: Path, keep_main: bool = False) -> None:
    """Delete a database file's -wal and -shm, and the file itself unless `keep_main`."""
    for suffix in ("-wal", "-shm") if keep_main else ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
