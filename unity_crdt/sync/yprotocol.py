"""Sans-IO y-protocols: y-websocket message framing and awareness (presence) merging.

No I/O and no clock: callers pass the current time (`now`, in seconds on any monotonic scale)
to `AwarenessTable`. `unity_crdt.frontends.ywebsocket` serves these messages over aiohttp.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import DecodeError, LimitExceeded
from .lib0 import JS_SAFE, read_varbytes, read_varuint, varbytes, varuint

__all__ = [
    "MSG_AUTH",
    "MSG_AWARENESS",
    "MSG_QUERY_AWARENESS",
    "MSG_SYNC",
    "SYNC_STEP1",
    "SYNC_STEP2",
    "SYNC_UPDATE",
    "AwarenessTable",
    "YMessage",
    "awareness_message",
    "encode_awareness",
    "parse_message",
    "pycrdt_index_to_yjs",
    "sync_message",
    "yjs_index_to_pycrdt",
]

MSG_SYNC, MSG_AWARENESS, MSG_AUTH, MSG_QUERY_AWARENESS = 0, 1, 2, 3
SYNC_STEP1, SYNC_STEP2, SYNC_UPDATE = 0, 1, 2


def _read_js_varuint(data: bytes, pos: int) -> tuple[int, int]:
    return read_varuint(data, pos, limit=JS_SAFE)


def sync_message(sync_type: int, payload: bytes) -> bytes:
    """A sync message: SyncStep1 (state vector), SyncStep2 or Update (update)."""
    return bytes((MSG_SYNC, sync_type)) + varbytes(payload)


def awareness_message(update: bytes) -> bytes:
    """An awareness message carrying an encoded awareness update."""
    return bytes((MSG_AWARENESS,)) + varbytes(update)


@dataclass(frozen=True, slots=True)
class YMessage:
    """One decoded client message; `sync_type` is set for sync messages only."""

    kind: int
    payload: bytes = b""
    sync_type: int | None = None


def parse_message(data: bytes) -> YMessage:
    """Strictly decode one y-websocket message (no trailing bytes); DecodeError otherwise."""
    kind, pos = _read_js_varuint(data, 0)
    sync_type = None
    if kind == MSG_SYNC:
        sync_type, pos = _read_js_varuint(data, pos)
        if sync_type not in (SYNC_STEP1, SYNC_STEP2, SYNC_UPDATE):
            raise DecodeError(f"unknown sync message type {sync_type}")
        payload, pos = read_varbytes(data, pos)
    elif kind == MSG_AWARENESS:
        payload, pos = read_varbytes(data, pos)
    elif kind in (MSG_AUTH, MSG_QUERY_AWARENESS):
        return YMessage(kind)  # the token already authenticated the socket; content unused
    else:
        raise DecodeError(f"unknown y-websocket message type {kind}")
    if pos != len(data):
        raise DecodeError("trailing bytes after the message")
    return YMessage(kind, payload, sync_type)


def yjs_index_to_pycrdt(text: str, index: int) -> int:
    """A Yjs Text index (UTF-16 code units) as a pycrdt Text index (UTF-8 bytes) into `text`."""
    units = 0
    for pos, char in enumerate(text):
        if units >= index:
            return len(text[:pos].encode("utf-8"))
        units += 2 if ord(char) > 0xFFFF else 1
    return len(text.encode("utf-8"))


def pycrdt_index_to_yjs(text: str, index: int) -> int:
    """A pycrdt Text index (UTF-8 bytes) as a Yjs Text index (UTF-16 code units) into `text`."""
    head = text.encode("utf-8")[: max(index, 0)].decode("utf-8", "ignore")
    return len(head.encode("utf-16-le")) // 2


@dataclass(slots=True)
class _Presence:
    clock: int
    state: bytes | None  # JSON text; None once the client said it left
    seen: float
    departed: bool = False  # removed by us because its connection closed


class AwarenessTable:
    """The awareness states of one room, merged with the y-protocols clock rules."""

    def __init__(self, max_entries: int = 1024, max_state_bytes: int = 64 * 1024) -> None:
        self._entries: dict[int, _Presence] = {}
        self._max = max_entries
        self._max_state = max_state_bytes  # cursors and names, not documents

    def __len__(self) -> int:
        return len(self._entries)

    def states(self) -> dict[int, str]:
        """Live states: client id -> JSON text."""
        return {cid: p.state.decode() for cid, p in self._entries.items() if p.state is not None}

    def apply(self, update: bytes, now: float, owner: set[int] | None = None) -> bytes | None:
        """Merge an awareness update; return the accepted entries re-encoded, or None.

        `owner` collects the client ids a connection speaks for, so they can be removed when
        it disconnects. Raises DecodeError / LimitExceeded for malformed or excessive input.
        """
        count, pos = _read_js_varuint(update, 0)
        if count > (len(update) - pos) // 3:
            raise DecodeError("implausible awareness update (entry count too large)")
        entries: list[tuple[int, int, bytes | None]] = []
        for _ in range(count):
            cid, pos = _read_js_varuint(update, pos)
            clock, pos = _read_js_varuint(update, pos)
            raw, pos = read_varbytes(update, pos)
            if len(raw) > self._max_state:
                raise LimitExceeded(f"an awareness state over {self._max_state} bytes")
            try:
                state = json.loads(raw.decode("utf-8"))
            except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
                raise DecodeError("awareness state is not UTF-8 JSON") from exc
            entries.append((cid, clock, None if state is None else raw))
        if pos != len(update):
            raise DecodeError("trailing bytes after the awareness update")
        accepted: list[tuple[int, int, bytes | None]] = []
        for cid, clock, state in entries:
            cur = self._entries.get(cid)
            if cur is not None and not (
                cur.clock < clock
                or (cur.clock == clock and state is None and cur.state is not None)
                # A reconnecting client re-announces with the clock it had when we removed it.
                or (cur.departed and cur.clock == clock and state is not None)
            ):
                continue
            if cur is None and len(self._entries) >= self._max:
                raise LimitExceeded("too many awareness states in one room")
            self._entries[cid] = _Presence(clock, state, now)
            accepted.append((cid, clock, state))
            if owner is not None:
                (owner.add if state is not None else owner.discard)(cid)
        return encode_awareness(accepted) if accepted else None

    def snapshot(self, now: float, timeout: float = 30.0) -> bytes | None:
        """Every live state not older than `timeout`, for a newcomer; None if there is none."""
        live = [
            (cid, p.clock, p.state)
            for cid, p in self._entries.items()
            if p.state is not None and now - p.seen < timeout
        ]
        return encode_awareness(live) if live else None

    def remove(self, client_ids: Iterable[int], now: float) -> bytes | None:
        """Mark these clients gone; return the update telling others they left, or None.

        The removal keeps each client's clock (y-protocols accepts a same-clock null), so the
        copies y-websocket clients echo back are ignored, while the client itself, if it
        reconnects with that same clock, is accepted again.
        """
        gone = []
        for cid in client_ids:
            presence = self._entries.get(cid)
            if presence is not None and presence.state is not None:
                self._entries[cid] = _Presence(presence.clock, None, now, departed=True)
                gone.append((cid, presence.clock, None))
        return encode_awareness(gone) if gone else None

    def expire(self, before: float) -> None:
        """Drop entries not renewed since `before` (clients renew every 15 s)."""
        for cid in [cid for cid, p in self._entries.items() if p.seen < before]:
            del self._entries[cid]


def encode_awareness(entries: Sequence[tuple[int, int, bytes | None]]) -> bytes:
    """An awareness update of (client id, clock, JSON state or None for "left") entries."""
    parts = [varuint(len(entries))]
    for cid, clock, state in entries:
        parts += (varuint(cid), varuint(clock), varbytes(b"null" if state is None else state))
    return b"".join(parts)
