"""The node's status snapshot, built from its parts (see `unity_crdt.status` for the fields)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..status import DocStatus, NodeStatus, PeerStatus

if TYPE_CHECKING:
    from . import Node

__all__ = ["node_status"]


def node_status(node: Node) -> NodeStatus:
    """Links, docs, checkpoints and the relay of `node`, at one moment."""
    now = node._now()
    links = list(node._mesh.links.values()) if node._mesh else []
    peers = []
    for link in links:
        if link.remote is None or link.session is None:
            continue
        st, session = link.stats, link.session
        peers.append(
            PeerStatus(
                name=link.remote.name,
                device_id=link.remote.device_id,
                url=link.address.url,
                connected_for=now - st.connected_at,
                last_seen_ago=now - st.last_seen,
                bytes_in=st.bytes_in,
                bytes_out=st.bytes_out,
                messages_in=st.messages_in,
                messages_out=st.messages_out,
                rtt=session.stats.rtt,
                synced_docs=tuple(sorted(session.synced_docs)),
                pending=link.queued_bytes,
            )
        )
    cp = node._checkpoints.cp if node._checkpoints else None
    docs = []
    for name in node._replica.names():
        cst = cp.status.get(name) if cp else None
        docs.append(
            DocStatus(
                name=name,
                state_bytes=len(node._replica.doc(name).get_update()),
                peers_synced=sum(1 for lk in links if lk.session and lk.session.is_synced(name)),
                last_checkpoint=cst.last_ok if cst else None,
                checkpoint_error=cst.last_error if cst else None,
                dirty=bool(cp and name in cp.dirty),
            )
        )
    return NodeStatus(
        name=node.config.name,
        device_id=node.device_id,
        url=node.url,
        uptime=now - node._started_at,
        peers=tuple(peers),
        docs=tuple(docs),
        checkpoints=cp is not None,
        checkpoint_error=cp.last_error if cp else None,
        pending_writes=node._writer.pending,
        yjs_url=node._endpoint.base_url if node._endpoint else None,
        checkpoint_warnings=cp.warnings if cp else (),
        relay=node._relay.status() if node._relay else None,
        cache=node._writer.status(),
        membership=node._members.status() if node._members else None,
        equivocations=tuple(sorted(node._traffic.equivocations)),
        work=node._work.status(),
    )
