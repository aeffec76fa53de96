"""The relay's durable outbox and cursor: a small SQLite file of the node's own (cache_dir).

Sealed parts wait here until the stream acknowledges them, so edits made while NATS is
unreachable survive a restart and go out on reconnect, each under the message id it was
given when it was sealed (the stream drops a re-sent id inside its duplicate window). The
file also keeps the relay cursor: the last stream sequence applied here and which stream
it belongs to. Nothing in it is plaintext: parts are sealed before they are queued.

Writes are batched: `sync()` writes the parts queued since the last sync that are still not
acknowledged (a part acknowledged within the same few milliseconds never touches the disk)
and deletes the stored parts acknowledged since, in one transaction on a worker thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, subject TEXT NOT NULL,
                                   msg_id TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS cursor (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(eq=False)
class Entry:
    """One sealed part waiting for the stream's acknowledgement."""

    seq: int
    subject: str
    msg_id: str
    data: bytes
    sent_at: float | None = None  # when it was last handed to the broker (None: not in flight)
    ack: Any = field(default=None, repr=False)  # the broker's pending acknowledgement


class RelayOutbox:
    """Unacknowledged parts in order, plus the relay cursor, persisted in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.consumed = 0  # the last stream sequence applied here
        self.stream_created = ""  # identity of the stream `consumed` counts in
        self._db: sqlite3.Connection | None = None
        self._new: list[Entry] = []
        self._stored: set[int] = set()
        self._gone: list[int] = []
        self._cursor_dirty = False
        self._next = 1
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    async def open(self) -> None:
        """Create or load the file."""
        try:
            await asyncio.to_thread(self._open)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the relay outbox {self.path}: {exc}") from exc

    def _open(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        for seq, subject, msg_id, data in db.execute(
            "SELECT seq, subject, msg_id, data FROM outbox ORDER BY seq"
        ):
            self.entries[seq] = Entry(seq, subject, msg_id, bytes(data))
            self._stored.add(seq)
        cursor = dict(db.execute("SELECT key, value FROM cursor").fetchall())
        self.consumed = int(cursor.get("consumed", "0"))
        self.stream_created = cursor.get("stream_created", "")
        self._next = max(self.entries, default=0) + 1
        self._db = db

    def add(self, subject: str, msg_id: str, data: bytes) -> Entry:
        """Queue one sealed part (persisted at the next `sync`)."""
        entry = Entry(self._next, subject, msg_id, data)
        self._next += 1
        self.entries[entry.seq] = entry
        self._new.append(entry)
        return entry

    def ack(self, entry: Entry) -> None:
        """The stream stored this part: forget it."""
        if self.entries.pop(entry.seq, None) is not None and entry.seq in self._stored:
            self._gone.append(entry.seq)

    def set_cursor(self, consumed: int, stream_created: str) -> None:
        """Remember the last stream sequence applied (persisted at the next `sync`)."""
        self.consumed, self.stream_created = consumed, stream_created
        self._cursor_dirty = True

    @property
    def dirty(self) -> bool:
        """Whether `sync` has something to write."""
        return bool(self._new or self._gone or self._cursor_dirty)

    async def sync(self) -> None:
        """Write what changed since the last sync, in one transaction."""
        async with self._lock:
            if self._db is None or not self.dirty:
                return
            new = [e for e in self._new if e.seq in self.entries]
            gone, self._new, self._gone = self._gone, [], []
            cursor = [("consumed", str(self.consumed)), ("stream_created", self.stream_created)]
            self._cursor_dirty = False
            try:
                await asyncio.to_thread(self._write, new, gone, cursor)
            except sqlite3.Error as exc:
                self._new[:0], self._gone[:0] = new, gone
                raise StoreError(f"cannot write the relay outbox: {exc}") from exc
            self._stored.update(e.seq for e in new)
            self._stored.difference_update(gone)
            # A part acknowledged while it was being written is deleted next time.
            self._gone += [e.seq for e in new if e.seq not in self.entries]

    def _write(self, new: list[Entry], gone: list[int], cursor: list[tuple[str, str]]) -> None:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?)",
                [(e.seq, e.subject, e.msg_id, e.data) for e in new],
            )
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in gone])
            db.executemany("INSERT OR REPLACE INTO cursor VALUES (?, ?)", cursor)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Write what is left and close the file."""
        await self.sync()
        async with self._lock:
            if self._db is not None:
                await asyncio.to_thread(self._db.close)
                self._db = None
