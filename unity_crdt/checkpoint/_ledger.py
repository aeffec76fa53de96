"""What this device has seen stored, per (doc, writing device): a 0600 file in the local cache.

Every sealed checkpoint header carries its writer's counter for the doc (`Header.seq`, rising
with each write of that device), and the state vector and delete set of its state. A device's
states only grow, so its newest write holds all its earlier ones. Remembering the newest write
seen per (doc, device) lets a restore notice a store that serves an older write again (refused:
the newer one, which this node already merged, holds it) or that lost what it stored: nothing
listed holds a state seen before, neither that device's newer write nor another device's
merged object that covers it (compaction deletes objects only when such a cover exists).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ._cover import Cover, Listed

__all__ = ["Ledger", "LedgerEntry"]

log = logging.getLogger(__name__)

MAX_WARNINGS = 32
_VERSION = 2


@dataclass(frozen=True)
class LedgerEntry:
    """The newest write of one (doc, device) this node has seen stored."""

    seq: int
    doc_key: str
    device_tag: str
    doc: str
    device: str
    sv: bytes | None = None
    ds: bytes | None = None

    @classmethod
    def of(cls, o: Listed) -> LedgerEntry:
        """The entry for a stored object whose header was opened."""
        return cls(
            o.head.seq, o.m.doc_key, o.m.device, o.head.doc, o.head.device, o.head.sv, o.head.ds
        )

    def cover(self) -> Cover | None:
        """What that write's state holds, if its header said."""
        if self.sv is None or self.ds is None:
            return None
        return Cover.parse(self.sv, self.ds)

    def to_json(self) -> dict[str, object]:
        """The entry as JSON values."""
        enc = {k: base64.b64encode(v).decode() for k, v in (("sv", self.sv), ("ds", self.ds)) if v}
        return {
            "seq": self.seq,
            "doc_key": self.doc_key,
            "device_tag": self.device_tag,
            "doc": self.doc,
            "device": self.device,
            **enc,
        }

    @classmethod
    def from_json(cls, e: Mapping[str, object]) -> LedgerEntry:
        """Parse `to_json` output (ValueError, KeyError or TypeError if malformed)."""
        sv, ds = e.get("sv"), e.get("ds")
        return cls(
            int(str(e["seq"])),
            str(e["doc_key"]),
            str(e["device_tag"]),
            str(e["doc"]),
            str(e["device"]),
            base64.b64decode(str(sv)) if sv else None,
            base64.b64decode(str(ds)) if ds else None,
        )


class Ledger:
    """Newest write seen per (doc key, device tag); `path=None` keeps it in memory only.

    It also keeps the warnings about what the store did (an older write served again, a
    stored state lost), newest last, each logged once.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[tuple[str, str], LedgerEntry] = {}
        self._dirty = False
        self._warnings: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_bytes())
                if data.get("v") == _VERSION:
                    for e in data["entries"]:
                        entry = LedgerEntry.from_json(e)
                        self.entries[(entry.doc_key, entry.device_tag)] = entry
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                # Losing it only weakens rollback detection until the next restore; never fatal.
                log.warning("checkpoint ledger %s is unreadable, starting afresh: %s", path, exc)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the store did that it should not have (at most MAX_WARNINGS, newest last)."""
        return tuple(self._warnings.values())

    def newest(self, doc_key: str, device_tag: str) -> int:
        """The highest write counter seen for (doc, device); 0 if none."""
        entry = self.entries.get((doc_key, device_tag))
        return entry.seq if entry is not None else 0

    def seen(self, entry: LedgerEntry) -> None:
        """A write was stored or read: remember it if it is the newest of its (doc, device)."""
        key = (entry.doc_key, entry.device_tag)
        known = self.entries.get(key)
        if known is None or entry.seq > known.seq:
            self.entries[key] = entry
            self._dirty = True
        self._warnings.pop((*key, "lost"), None)

    def is_rollback(self, o: Listed) -> bool:
        """Whether `o` is an older write of its (doc, device) than one seen (then reported).

        Only Yjs states (with a cover) are monotonic per device; other states are never refused.
        """
        known = self.entries.get((o.m.doc_key, o.m.device))
        if known is None or o.cover is None or o.head.seq >= known.seq or o.head.seq == 0:
            return False
        self._warn(
            (o.m.doc_key, o.m.device, "rollback"),
            f"the store served an older checkpoint of doc {known.doc!r} by device "
            f"{known.device[:8]} (write {o.head.seq}, after write {known.seq} was seen); "
            "refused",
        )
        return True

    def lost(
        self, listed: Mapping[str, Iterable[Listed]], doc_keys: Iterable[str] | None
    ) -> list[LedgerEntry]:
        """Report the writes seen before (of `doc_keys`, or all) that nothing listed holds."""
        wanted = None if doc_keys is None else set(doc_keys)
        gone = []
        for (doc_key, tag), e in self.entries.items():
            if wanted is not None and doc_key not in wanted:
                continue
            cover = e.cover()
            held = any(
                (o.m.device == tag and o.head.seq >= e.seq)
                or (cover is not None and o.cover is not None and cover.within(o.cover))
                for o in listed.get(doc_key, ())
            )
            if held:
                self._warnings.pop((doc_key, tag, "lost"), None)
                continue
            self._warn(
                (doc_key, tag, "lost"),
                f"the checkpoint of doc {e.doc!r} by device {e.device[:8]} (write {e.seq}) is "
                "gone from the store, and nothing stored holds its state (deleted?)",
            )
            gone.append(e)
        return gone

    def _warn(self, key: tuple[str, str, str], text: str) -> None:
        if key not in self._warnings:
            log.warning("checkpoint: %s", text)
        self._warnings[key] = text
        self._warnings.move_to_end(key)
        while len(self._warnings) > MAX_WARNINGS:
            self._warnings.popitem(last=False)

    def save(self) -> None:
        """Write the file if anything changed (atomic rename, mode 0600)."""
        if self.path is None or not self._dirty:
            return
        data = {"v": _VERSION, "entries": [e.to_json() for e in self.entries.values()]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(data).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._dirty = False
