"""What flows through a running node: committed updates, presence, commit notices, link events.

The replica, the links, the relay, the front ends and the checkpointer never call each other;
each hands what it has to `Traffic`, which applies the `sync.router.Router` rule to send it on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..net.link import Link
from ..net.relay import RELAY_ORIGIN
from ..sync.codec import Awareness, Members, Notice
from ..sync.router import Router
from ..sync.session import SyncSession

if TYPE_CHECKING:
    from . import Node

__all__ = ["FRONTEND", "Traffic"]

log = logging.getLogger(__name__)

REFRESH_MIN_INTERVAL = 5.0
FRONTEND = "frontend"  # the source tag of presence set by y-websocket clients


class Traffic:
    """The node's callbacks: each takes one event from a part and sends it where it belongs."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._router = Router()
        self.equivocations: set[str] = set()  # docs a peer holds differently under one id
        self._last_refresh = float("-inf")

    def settle(self) -> float:
        """One sync round with every linked peer (for LAN leases): twice the slowest RTT."""
        mesh = self._node._mesh
        rtts = [
            lk.session.stats.rtt or 0.0
            for lk in (mesh.links.values() if mesh else ())
            if lk.session
        ]
        return min(1.0, max(0.05, 2 * max(rtts, default=0.0) + 0.03))

    def make_session(self, link: Link) -> SyncSession:
        """The sync session of a link that just authenticated its peer."""
        assert link.remote is not None
        node = self._node
        cfg = node.config
        peer = link.remote.device_id
        session = SyncSession(
            node._replica,
            peer=peer,
            now=node._now(),
            seen=node._seen,
            pulls=node._pulls,
            anti_entropy_interval=cfg.anti_entropy_interval,
            ping_interval=cfg.ping_interval,
            idle_timeout=cfg.idle_timeout,
            on_awareness=lambda doc, update: self.spread_presence(doc, update, source=peer),
            max_doc_bytes=cfg.max_doc_bytes,
            quota=node._quota,
            on_notice=self.on_notice,
            allow=node._members.gate.allow(link) if node._members else None,
            on_members=lambda msg: self.receive_members(link, msg),
            on_equivocation=lambda doc: self.equivocation(doc, link),
        )
        # After the HELLO the link queues next: tell the newcomer who is here.
        snapshot = [Awareness(doc, snap) for doc, snap in node._presence.snapshot(node._now())]
        if snapshot:
            asyncio.get_running_loop().call_soon(link.send, snapshot)
        return session

    def equivocation(self, doc: str, link: Link) -> None:
        """A peer holds other content than ours under the same ids: someone equivocated."""
        if doc not in self.equivocations:
            log.error(
                "doc %r: %s holds different content under the same ids (a member sent two "
                "versions of one edit); the copies will not converge on their own",
                doc,
                link.label,
            )
        self.equivocations.add(doc)

    def spread_presence(self, doc: str, update: bytes, source: str | None) -> None:
        """Merge presence from a peer, a front end or this node; relay only what is new.

        Only for docs this node holds or a front end has open: presence for made-up names is
        kept aside (bounded) and relayed nowhere.
        """
        node = self._node
        endpoint = node._endpoint
        held = doc in node._replica or bool(endpoint and endpoint.clients(doc))
        now = node._now()
        fresh = node._presence.apply(doc, update, now, held=held) if source is not None else update
        if fresh is None:
            return
        if node._mesh is not None:
            mesh = node._mesh
            for peer, msgs in Router.fan_out_presence(doc, fresh, source, mesh.sessions).items():
                mesh.send(peer, msgs)
        if endpoint is not None and source != FRONTEND:
            endpoint.apply_peer_awareness(doc, fresh)

    def front_end_joined(self, doc: str) -> None:
        """A front end opened `doc`: show it what peers said before anyone here held it."""
        node = self._node
        snapshot = node._presence.promote(doc, node._now())
        if snapshot is not None and node._endpoint is not None:
            node._endpoint.apply_peer_awareness(doc, snapshot)

    async def presence_loop(self) -> None:
        """Expire stale presence and renew this node's own, forever."""
        presence = self._node._presence
        while True:
            await asyncio.sleep(presence.timeout / 6)
            now = self._node._now()
            presence.expire(now)
            for doc, update in presence.renew(now):
                self.spread_presence(doc, update, source=None)

    def on_update(self, doc: str, update: bytes, origin: object | None) -> None:
        """Take one committed transaction from the replica's observer.

        The doc is borrowed here, so this only queues: the router coalesces updates per
        (doc, source) until `drain` runs at the end of this loop turn.
        """
        node = self._node
        if self._router.add(doc, update, origin):
            asyncio.get_running_loop().call_soon(self.drain)
        if node._checkpoints is not None:
            node._checkpoints.cp.mark_dirty(doc)
        if node._endpoint is not None:
            node._endpoint.publish(doc, update, origin)

    def drain(self) -> None:
        """Cache each merged update, and send it to every link (and the relay) but its source."""
        node = self._node
        for routed in self._router.drain():
            node._writer.persist(routed.doc, routed.update)
            if node._relay is not None and Router.forwards(routed, RELAY_ORIGIN.peer):
                node._relay.send(routed.doc, routed.update)
            if node._mesh is not None:
                mesh = node._mesh
                for peer, msgs in Router.fan_out(routed, mesh.sessions).items():
                    mesh.send(peer, msgs)

    def notify(self, notice: Notice) -> None:
        """Tell linked peers and the relay that a doc was just checkpointed at this state."""
        node = self._node
        if node._mesh is not None:
            for peer in node._mesh.sessions:
                node._mesh.send(peer, [notice])
        if node._relay is not None:
            node._relay.notify(notice)

    def on_notice(self, notice: Notice) -> None:
        """A member checkpointed a doc (heard on a link or the relay): checkpoints may pull it."""
        if self._node._checkpoints is not None:
            self._node._checkpoints.on_notice(notice)

    def receive_members(self, link: Link, msg: Members) -> None:
        """Roster ops from a linked peer."""
        if self._node._members is not None:
            self._node._members.receive(link, msg)

    def on_joined(self, link: Link) -> None:
        """A link authenticated its peer."""
        node = self._node
        if node._members is not None:
            node._members.gate.on_joined(link)
        # A link coming back often means a network came back: peers that appeared meanwhile
        # are not re-announced by mDNS on their own, so ask again (at most every few seconds).
        now = node._now()
        if node._discovery is not None and now - self._last_refresh > REFRESH_MIN_INTERVAL:
            self._last_refresh = now
            node.spawn(node._discovery.refresh(), "mdns refresh")
