"""Sans-IO rules of the local_cache: row checksums, when to compact, and compacting itself.

Pure functions of their inputs (pycrdt only), shared by every Store backend.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import pycrdt

__all__ = [
    "COMPACT_MIN_BYTES",
    "COMPACT_MIN_ROWS",
    "ROW_COST",
    "compact_updates",
    "part_crc",
    "row_crc",
    "row_crc_raw",
    "should_compact",
    "still_needed",
]

log = logging.getLogger(__name__)

COMPACT_MIN_ROWS = 1000
COMPACT_MIN_BYTES = 64 * 1024
# Replaying one log row costs about as much as decoding this many snapshot bytes (measured:
# ~5 us per small update vs ~20 ns per snapshot byte), so short edits count for more than
# their size when deciding whether a compaction pays off.
ROW_COST = 256


def row_crc(doc: str, data: bytes) -> int:
    """The checksum stored with each row: CRC32 over the doc name, a NUL, and the bytes."""
    return row_crc_raw(doc.encode("utf-8"), data)


def row_crc_raw(doc: bytes, data: bytes) -> int:
    """`row_crc` of a doc name given as the bytes stored in the file."""
    return zlib.crc32(data, zlib.crc32(doc + b"\0"))


def part_crc(doc: bytes, gen: int, part: int, parts: int, data: bytes) -> int:
    """The checksum of one part of a snapshot: it binds the doc, generation and position too,
    so a part read under another doc, generation or index fails it."""
    head = doc + b"\0" + f"{gen}.{part}.{parts}".encode() + b"\0"
    return zlib.crc32(data, zlib.crc32(head))


def still_needed(row: bytes, state_vector: bytes) -> bool:
    """Whether `row` holds items a snapshot at `state_vector` lacks (pending ones: keep it).

    The part of a row not covered by a state vector starts with its count of clients that
    still have structs: anything but 0 means the snapshot does not hold them. A row pycrdt
    cannot parse could never apply: it is not needed.
    """
    try:
        return pycrdt.get_update(row, state_vector)[:1] != b"\x00"
    except Exception as exc:
        log.warning("local cache: a log row does not parse (%s); dropped at compaction", exc)
        return False


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
    keep = [i for i in usable if still_needed(rows[i], state)]
    return doc.get_update(), keep
