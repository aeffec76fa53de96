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
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Ledger", "LedgerEntry"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LedgerEntry:
    """The newest write of one checkpoint object this device has seen."""

    seq: int
    doc_key: str
    doc: str
    device: str


class Ledger:
    """Highest write counter seen per checkpoint object; `path=None` keeps it in memory."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, LedgerEntry] = {}
        self._dirty = False
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
