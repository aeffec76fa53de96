"""An in-memory network of sans-IO nodes: the two-party / N-party test harness.

Each `Party` is a node without I/O: a Replica, one SyncSession per link, and the node's own
relay rule (`sync.router.Router`). A `Net` joins parties by directed queues of *encoded*
messages, so everything crosses `codec.encode`/`decode` as it would on a socket, and `pump()`
delivers until nothing is in flight (h11's tests/helpers.py in spirit). Tests drop, reorder or
partition by acting on the queues directly.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from pycrdt import Array, Map, Text

from ..sync import codec
from ..sync.codec import Batch, Message, flatten
from ..sync.nodewide import PullGate, SeenFilter
from ..sync.replica import Replica
from ..sync.router import Router
from ..sync.session import Reply, SyncSession

__all__ = ["Net", "Party"]

_ids = itertools.count(1)


class Party:
    """A node without I/O: a replica, its sessions, and the router that relays its updates."""

    def __init__(self, name: str, seen: SeenFilter | None = None) -> None:
        self.name = name
        self.replica = Replica(self._on_update, client_id_factory=lambda: next(_ids))
        self.seen = seen if seen is not None else SeenFilter()
        self.pulls = PullGate()
        self.sessions: dict[str, SyncSession] = {}
        self.router = Router()
        self.reports: list[tuple[str, bytes, object | None]] = []

    def _on_update(self, doc: str, update: bytes, origin: object | None) -> None:
        self.router.add(doc, update, origin)
        self.reports.append((doc, update, origin))

    def text(self, doc: str) -> Text:
        """Root "t" of `doc` as a Text."""
        text: Text = self.replica.doc(doc).get("t", type=Text)
        return text

    def content(self, doc: str) -> tuple[str, dict[str, Any], list[Any]]:
        """Roots "t" (Text), "m" (Map) and "a" (Array) of `doc` as plain values."""
        d = self.replica.doc(doc)
        return (
            str(d.get("t", type=Text)),
            d.get("m", type=Map).to_py() or {},
            d.get("a", type=Array).to_py() or [],
        )


class Net:
    """Directed in-memory links carrying encoded bytes; `pump` runs to quiescence."""

    def __init__(self, *parties: Party, now: float = 1000.0, **session_kw: Any) -> None:
        self.parties = {p.name: p for p in parties}
        self.queues: dict[tuple[str, str], deque[bytes]] = {}
        self.now = now
        self.session_kw = session_kw
        self.sent: Counter[str] = Counter()
        self.log: list[tuple[str, str, Message]] = []

    def connect(self, a: str, b: str, a_kw: dict[str, Any] | None = None) -> None:
        """Link `a` and `b`; `a_kw` are extra SyncSession arguments for `a`'s side only."""
        for party in self.parties.values():  # earlier edits went to the links of that time
            self.relay(party)
        for x, y in ((a, b), (b, a)):
            px = self.parties[x]
            kw = {**self.session_kw, **((a_kw or {}) if x == a else {})}
            px.sessions[y] = SyncSession(
                px.replica, peer=y, now=self.now, seen=px.seen, pulls=px.pulls, **kw
            )
            self.queues[(x, y)] = deque()
        for x, y in ((a, b), (b, a)):
            self.send(x, y, self.parties[x].sessions[y].start())

    def disconnect(self, a: str, b: str) -> None:
        """Drop the link between `a` and `b`, with whatever it had in flight."""
        for x, y in ((a, b), (b, a)):
            self.parties[x].sessions.pop(y).close()
            del self.queues[(x, y)]

    def send(self, src: str, dst: str, items: Sequence[Message | Reply]) -> None:
        """Queue `items` from `src` to `dst` as one encoded message (a BATCH if several);
        owed replies are computed on the spot (this harness has no send budget)."""
        if not items or (src, dst) not in self.queues:
            return
        session = self.parties[src].sessions[dst]
        msgs: list[Message] = []
        for item in items:
            msgs.extend(session.reply(item) if isinstance(item, Reply) else [item])
        for m in flatten(msgs):
            self.sent[type(m).__name__] += 1
            self.log.append((src, dst, m))
        payload = msgs[0] if len(msgs) == 1 else Batch(tuple(msgs))
        self.queues[(src, dst)].append(codec.encode(payload))

    def relay(self, party: Party) -> None:
        """Route what `party`'s replica reported to its links, by the node's rule."""
        for routed in party.router.drain():
            for peer, msgs in Router.fan_out(routed, party.sessions).items():
                self.send(party.name, peer, msgs)

    def deliver(self, src: str, dst: str) -> None:
        """Deliver the oldest message from `src` to `dst`, and route what it changed."""
        data = self.queues[(src, dst)].popleft()
        party = self.parties[dst]
        replies = party.sessions[src].receive(codec.decode(data), self.now)
        self.send(dst, src, replies)
        self.relay(party)

    def pump(self, limit: int = 10_000) -> int:
        """Deliver until every queue is empty; return the number of messages delivered."""
        for party in self.parties.values():
            self.relay(party)
        delivered = 0
        while any(self.queues.values()):
            for key in [k for k, q in self.queues.items() if q]:
                if self.queues.get(key):
                    self.deliver(*key)
                    delivered += 1
            if delivered >= limit:
                raise AssertionError("gossip did not terminate")
        return delivered

    def tick(self, dt: float) -> None:
        """Advance the clock by `dt` and run every session's timers."""
        self.now += dt
        for party in self.parties.values():
            for peer, session in list(party.sessions.items()):
                self.send(party.name, peer, session.tick(self.now))

    def drop_in_flight(self, src: str, dst: str) -> int:
        """Lose everything queued from `src` to `dst`; return how many messages that was."""
        q = self.queues[(src, dst)]
        n = len(q)
        q.clear()
        return n
