"""Presence (y-protocols awareness) of every doc, merged across the mesh. Sans-IO.

Each doc has one awareness table; an entry wins by its clock, as in y-protocols. `apply`
returns only the entries that were new, so a node relays exactly those and relaying stops
where nothing is new. Local states are renewed every `timeout / 2` and remote ones expire
after `timeout` without renewal, so a peer that vanished fades from everyone's view.

Presence is kept and relayed only for docs the node *holds* (the caller says which): a member
naming made-up docs must not grow a table per name on every node of the mesh. Presence for a
doc not held yet (a peer's snapshot often arrives before the doc's first sync) is kept in a
small table of its own, never relayed, readable by `states`, and promoted when the doc is held.
Tables that empty are deleted, and both kinds are capped.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..errors import LimitExceeded
from .yprotocol import AwarenessTable, encode_awareness


@dataclass
class _Local:
    client_id: int
    clock: int
    state: bytes | None
    renewed: float


class Presence:
    """Awareness tables by doc, plus this node's own states."""

    def __init__(
        self,
        timeout: float = 30.0,
        max_entries: int = 1024,
        *,
        max_tables: int = 10_000,
        max_unheld: int = 64,
    ) -> None:
        self.timeout = timeout
        self._max = max_entries
        self._max_tables = max_tables
        self._max_unheld = max_unheld
        self._tables: dict[str, AwarenessTable] = {}
        self._unheld: OrderedDict[str, AwarenessTable] = OrderedDict()
        self._local: dict[str, _Local] = {}

    def __len__(self) -> int:
        """How many tables exist (held and not), for bounds in tests and metrics."""
        return len(self._tables) + len(self._unheld)

    def _table(self, doc: str) -> AwarenessTable:
        table = self._tables.get(doc)
        if table is None:
            if len(self._tables) >= self._max_tables:
                raise LimitExceeded(f"presence kept for {self._max_tables} docs already")
            table = self._unheld.pop(doc, None) or AwarenessTable(self._max)
            self._tables[doc] = table
        return table

    def apply(self, doc: str, update: bytes, now: float, *, held: bool = True) -> bytes | None:
        """Merge a peer's or front end's update; return the new entries to relay, or None.

        For a doc not `held`, the entries are kept aside (bounded, oldest doc dropped first)
        and nothing is relayed. Raises DecodeError / LimitExceeded for malformed or excessive
        updates, and LimitExceeded past `max_tables` held docs.
        """
        if held or doc in self._tables:
            return self._table(doc).apply(update, now)
        table = self._unheld.pop(doc, None) or AwarenessTable(self._max)
        table.apply(update, now)  # raises before a new table is kept
        self._unheld[doc] = table
        while len(self._unheld) > self._max_unheld:
            self._unheld.popitem(last=False)
        return None

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
        """Forget remote states not renewed within the timeout, and tables left empty."""
        for tables in (self._tables, self._unheld):
            for doc, table in list(tables.items()):
                table.expire(now - self.timeout)
                if not table and doc not in self._local:
                    del tables[doc]

    def promote(self, doc: str, now: float) -> bytes | None:
        """`doc` is held now (a front end opened it): keep its states with the others, and
        return them all (live ones), to show the newcomer; None if there are none."""
        table = self._table(doc)
        return table.snapshot(now, self.timeout)

    def snapshot(self, now: float) -> list[tuple[str, bytes]]:
        """Every live state of held docs, per doc: what a newly linked peer should hear first."""
        out = []
        for doc, table in self._tables.items():
            snap = table.snapshot(now, self.timeout)
            if snap is not None:
                out.append((doc, snap))
        return out

    def states(self, doc: str) -> dict[int, Any]:
        """Live states of `doc`: client id -> the JSON value it set."""
        table = self._tables.get(doc) or self._unheld.get(doc)
        if table is None:
            return {}
        return {cid: json.loads(raw) for cid, raw in table.states().items()}
