"""Presence (y-protocols awareness) of every doc, merged across the mesh. Sans-IO.

Each doc has one awareness table; an entry wins by its clock, as in y-protocols. `apply`
returns only the entries that were new, so a node relays exactly those and relaying stops
where nothing is new. Local states are renewed every `timeout / 2` and remote ones expire
after `timeout` without renewal, so a peer that vanished fades from everyone's view.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .yprotocol import AwarenessTable, encode_awareness


@dataclass
class _Local:
    client_id: int
    clock: int
    state: bytes | None
    renewed: float


class Presence:
    """Awareness tables by doc, plus this node's own states."""

    def __init__(self, timeout: float = 30.0, max_entries: int = 1024) -> None:
        self.timeout = timeout
        self._max = max_entries
        self._tables: dict[str, AwarenessTable] = {}
        self._local: dict[str, _Local] = {}

    def _table(self, doc: str) -> AwarenessTable:
        table = self._tables.get(doc)
        if table is None:
            table = self._tables[doc] = AwarenessTable(self._max)
        return table

    def apply(self, doc: str, update: bytes, now: float) -> bytes | None:
        """Merge a peer's or front end's update; return the new entries to relay, or None.

        Raises DecodeError / LimitExceeded for malformed or excessive updates.
        """
        return self._table(doc).apply(update, now)

    def set_local(self, doc: str, client_id: int, state: Any, now: float) -> bytes:
        """Set (or clear, with None) this node's state in `doc`; return the update to send."""
        raw = None if state is None else json.dumps(state, separators=(",", ":")).encode()
        local = self._local.get(doc)
        # Clocks start at 1: y-protocols drops a clock-0 state from a client it has not seen.
        clock = 1 if local is None else local.clock + 1
        self._local[doc] = _Local(client_id, clock, raw, now)
        update = encode_awareness([(client_id, clock, raw)])
        self._table(doc).apply(update, now)
        return update

    def renew(self, now: float) -> list[tuple[str, bytes]]:
        """Updates that keep this node's live states from expiring at the peers."""
        out = []
        for doc, local in self._local.items():
            if local.state is not None and now - local.renewed >= self.timeout / 2:
                out.append(
                    (doc, self.set_local(doc, local.client_id, json.loads(local.state), now))
                )
        return out

    def expire(self, now: float) -> None:
        """Forget remote states not renewed within the timeout."""
        for table in self._tables.values():
            table.expire(now - self.timeout)

    def snapshot(self, now: float) -> list[tuple[str, bytes]]:
        """Every live state, per doc: what a newly linked peer should hear first."""
        out = []
        for doc, table in self._tables.items():
            snap = table.snapshot(now, self.timeout)
            if snap is not None:
                out.append((doc, snap))
        return out

    def states(self, doc: str) -> dict[int, Any]:
        """Live states of `doc`: client id -> the JSON value it set."""
        table = self._tables.get(doc)
        if table is None:
            return {}
        return {cid: json.loads(raw) for cid, raw in table.states().items()}
