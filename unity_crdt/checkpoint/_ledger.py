"""The checkpoint write counters this device has seen, kept in the local cache (a 0600 file).

Every sealed checkpoint header carries its writer's counter for that object (`Header.seq`,
monotonic per object). Remembering the highest counter seen per object lets a restore notice a
store that serves an older copy (a counter going back) or drops an object (one seen before is
no longer listed). The file is keyed by object id and also holds the doc name and device id
for the warnings; it lives next to the local cache, which holds the docs in clear anyway.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Ledger", "LedgerEntry"]

log = logging.getLogger(__name__)

MAX_WARNINGS = 32


@dataclass(frozen=True)
class LedgerEntry:
    """The newest write of one checkpoint object this device has seen."""

    seq: int
    doc_key: str
    doc: str
    device: str


class Ledger:
    """Highest write counter seen per checkpoint object; `path=None` keeps it in memory.

    It also keeps the warnings about what the store did (an older copy served, an object
    gone), newest last, each logged once.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, LedgerEntry] = {}
        self._dirty = False
        self._warnings: OrderedDict[tuple[str, str], str] = OrderedDict()
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_bytes())
                self.entries = {
                    str(oid): LedgerEntry(
                        int(e["seq"]), str(e["doc_key"]), str(e["doc"]), str(e["device"])
                    )
                    for oid, e in data["objects"].items()
                }
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                # Losing it only weakens rollback detection until the next restore; never fatal.
                log.warning("checkpoint ledger %s is unreadable, starting afresh: %s", path, exc)

    def get(self, object_id: str) -> LedgerEntry | None:
        """What was last seen of `object_id`, if anything."""
        return self.entries.get(object_id)

    def note(self, object_id: str, entry: LedgerEntry) -> None:
        """Remember `entry` unless a newer write of the object was seen already."""
        known = self.entries.get(object_id)
        if known is None or entry.seq > known.seq:
            self.entries[object_id] = entry
            self._dirty = True

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the store did that it should not have (at most MAX_WARNINGS, newest last)."""
        return tuple(self._warnings.values())

    def _warn(self, object_id: str, kind: str, text: str) -> None:
        if (object_id, kind) not in self._warnings:
            log.warning("checkpoint: %s", text)
        self._warnings[(object_id, kind)] = text
        self._warnings.move_to_end((object_id, kind))
        while len(self._warnings) > MAX_WARNINGS:
            self._warnings.popitem(last=False)

    def seen(self, object_id: str, entry: LedgerEntry) -> None:
        """An object was read (or written) at `entry`: remember it; it is no longer missing."""
        self.note(object_id, entry)
        self._warnings.pop((object_id, "missing"), None)

    def is_rollback(self, object_id: str, seq: int, doc: str, device: str) -> bool:
        """Whether a copy at `seq` is older than one seen before (then it is reported)."""
        known = self.entries.get(object_id)
        if known is None or seq >= known.seq:
            return False
        self._warn(
            object_id,
            "rollback",
            f"the store served an older checkpoint of doc {doc!r} by device {device[:8]} "
            f"(write {seq}, after write {known.seq} was seen); refused",
        )
        return True

    def missing(self, listed: Iterable[str], doc_keys: Iterable[str] | None) -> list[LedgerEntry]:
        """Report objects seen before that a listing (of `doc_keys`, or all) lacks."""
        present = set(listed)
        wanted = None if doc_keys is None else set(doc_keys)
        gone = []
        for oid, e in self.entries.items():
            if oid in present or (wanted is not None and e.doc_key not in wanted):
                continue
            self._warn(
                oid,
                "missing",
                f"the checkpoint of doc {e.doc!r} by device {e.device[:8]} (write {e.seq}) "
                "is gone from the store (deleted?)",
            )
            gone.append(e)
        return gone

    def save(self) -> None:
        """Write the file if anything changed (atomic rename, mode 0600)."""
        if self.path is None or not self._dirty:
            return
        data = {"v": 1, "objects": {oid: asdict(e) for oid, e in self.entries.items()}}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(data).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._dirty = False
