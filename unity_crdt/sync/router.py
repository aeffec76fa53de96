"""The relay rule, sans-IO: where each committed update goes.

The replica reports every committed transaction's update with its origin. The router queues
those reports per (doc, source) until `drain()`, which the node calls once per event-loop turn,
and merges each queue into one update: a burst of keystrokes, or a received batch, costs one
cache write and one message per link instead of one per update. `fan_out` then hands a merged
update to every link's session except the one it came from. Relaying terminates because a
replica reports only *effective* changes: an update it already has changes nothing, so it is
never reported and never forwarded again.

Only live updates are pushed. What this node *pulled* from a peer (a SYNC_STEP_2 reply) is
cached but not fanned out to the other links: they learn from our next SUMMARY that our
inventory moved and pull exactly what they lack, so when several peers meet at once each of
them receives a history once, not once per path.

The node, the in-memory harness (`unity_crdt.testing`) and the property tests all route
through this one class, so the tests check the rule the node runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .codec import Awareness, Message
from .replica import RemoteOrigin, merge_small
from .session import SyncSession


def source_of(origin: object | None) -> str | None:
    """The peer an update came from (its RemoteOrigin), or None for a local edit."""
    return origin.peer if isinstance(origin, RemoteOrigin) else None


@dataclass(frozen=True, slots=True)
class Routed:
    """One merged update of a doc, and the peer it came from (None: made here)."""

    doc: str
    update: bytes
    source: str | None
    pulled: bool = False


class Router:
    """Coalesces reported updates per (doc, source) and fans them out to the other links."""

    def __init__(self) -> None:
        self._queued: dict[tuple[str, str | None, bool], list[bytes]] = {}

    @property
    def pending(self) -> bool:
        """Whether updates wait for the next `drain()`."""
        return bool(self._queued)

    def add(self, doc: str, update: bytes, origin: object | None) -> bool:
        """Queue one reported update; True if it is the first since the last drain."""
        first = not self._queued
        pulled = isinstance(origin, RemoteOrigin) and origin.pulled
        self._queued.setdefault((doc, source_of(origin), pulled), []).append(update)
        return first

    def drain(self) -> list[Routed]:
        """Everything queued, merged per (doc, source), in the order first reported."""
        queued, self._queued = self._queued, {}
        return [
            Routed(d, merge_small(ups), src, pulled) for (d, src, pulled), ups in queued.items()
        ]

    @staticmethod
    def forwards(routed: Routed, destination: str) -> bool:
        """Whether `routed` goes to `destination` (a peer or the relay): not back to its source."""
        return routed.source != destination

    @staticmethod
    def fan_out(routed: Routed, sessions: Mapping[str, SyncSession]) -> dict[str, list[Message]]:
        """The messages each linked peer gets for `routed`: every peer but its source; none
        for what was pulled."""
        out: dict[str, list[Message]] = {}
        if routed.pulled:
            return out
        for peer, session in sessions.items():
            if Router.forwards(routed, peer):
                msgs = session.local_update(routed.doc, routed.update)
                if msgs:
                    out[peer] = msgs
        return out

    @staticmethod
    def fan_out_presence(
        doc: str, update: bytes, source: str | None, peers: Iterable[str]
    ) -> dict[str, list[Message]]:
        """Presence news (already filtered to what is new) for every peer but its source."""
        msg: list[Message] = [Awareness(doc, update)]
        return {peer: msg for peer in peers if peer != source}
