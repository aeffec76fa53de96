"""Prometheus text exposition (format 0.0.4) of a NodeStatus: stdlib only, no client library.

    unity_crdt_peers 1
    unity_crdt_peer_bytes_in_total{peer="bob",device="abcd..."} 5120
    unity_crdt_doc_state_bytes{doc="trip"} 812

Peers are labelled by name and device id (names need not be unique). Doc names are user data:
only totals are published unless `doc_labels=True` (`unity-crdt run --metrics-doc-names`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from ..status import NodeStatus, PeerStatus

__all__ = ["CONTENT_TYPE", "escape_label", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]
Sample = tuple[Labels, float | int]


def escape_label(value: str) -> str:
    """Escape a label value: backslash, double quote and line feed, as the format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float | int) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Exposition:
    """Accumulates metric families; each family is written once with its HELP and TYPE."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels)
                self.lines.append(f"{name}{{{inner}}} {_number(value)}")
            else:
                self.lines.append(f"{name} {_number(value)}")

    def gauge(self, name: str, help_text: str, value: float | int) -> None:
        self.family(name, "gauge", help_text, [((), value)])


def render(status: NodeStatus, *, doc_labels: bool = False) -> str:
    """The whole exposition for one status snapshot, ending with a newline."""
    out = _Exposition()
    node: Labels = (("name", status.name), ("device", status.device_id))
    out.family(
        "unity_crdt_node_info",
        "gauge",
        "Constant 1, labelled with this node's identity.",
        [(node, 1)],
    )
    out.gauge("unity_crdt_uptime_seconds", "Seconds since the node started.", status.uptime)
    out.gauge("unity_crdt_peers", "Peers with a live, authenticated link.", len(status.peers))
    out.gauge("unity_crdt_docs", "Documents this node holds.", len(status.docs))
    out.gauge(
        "unity_crdt_pending_writes",
        "Edits not yet durable in the local cache.",
        status.pending_writes,
    )
    out.gauge(
        "unity_crdt_checkpoints_enabled",
        "1 when checkpoints to Weaviate are on.",
        int(status.checkpoints),
    )
    out.gauge(
        "unity_crdt_checkpoint_failing",
        "1 when the last checkpoint round failed.",
        int(status.checkpoint_error is not None),
    )
    out.gauge(
        "unity_crdt_checkpoint_warnings",
        "Checkpoint objects the store served older than seen before, or lost.",
        len(status.checkpoint_warnings),
    )

    out.gauge(
        "unity_crdt_equivocating_docs",
        "Docs a peer holds with other content under the same ids (a member equivocated).",
        len(status.equivocations),
    )
    cache = status.cache
    out.gauge(
        "unity_crdt_cache_failing",
        "1 while writes to the local cache fail (edits are kept in memory meanwhile).",
        int(cache.store_error is not None),
    )
    out.gauge(
        "unity_crdt_cache_unsaved_docs",
        "Docs with edits only in memory until cache writes work again.",
        len(cache.unsaved_docs),
    )
    out.family(
        "unity_crdt_cache_failed_writes_total",
        "counter",
        "Cache writes that failed since start.",
        [((), cache.failed_writes)],
    )
    out.family(
        "unity_crdt_cache_recoveries_total",
        "counter",
        "Recoveries of a damaged local cache since start.",
        [((), cache.recoveries)],
    )
    if status.relay is not None:
        relay = status.relay
        out.gauge("unity_crdt_relay_connected", "1 when the NATS relay is up.", relay.connected)
        out.gauge("unity_crdt_relay_lag_messages", "Stream messages not applied yet.", relay.lag)
        out.gauge(
            "unity_crdt_relay_outbox_messages",
            "Messages made here the stream has not acknowledged yet.",
            relay.outbox,
        )

    peers = [((("peer", p.name), ("device", p.device_id)), p) for p in status.peers]
    per_peer: list[tuple[str, str, str, Callable[[PeerStatus], float | int]]] = [
        (
            "unity_crdt_peer_bytes_in_total",
            "counter",
            "Bytes received on this link.",
            lambda p: p.bytes_in,
        ),
        (
            "unity_crdt_peer_bytes_out_total",
            "counter",
            "Bytes sent on this link.",
            lambda p: p.bytes_out,
        ),
        (
            "unity_crdt_peer_messages_in_total",
            "counter",
            "Messages received on this link.",
            lambda p: p.messages_in,
        ),
        (
            "unity_crdt_peer_messages_out_total",
            "counter",
            "Messages sent on this link.",
            lambda p: p.messages_out,
        ),
        (
            "unity_crdt_peer_pending_bytes",
            "gauge",
            "Bytes queued for this peer, not yet sent.",
            lambda p: p.pending,
        ),
        (
            "unity_crdt_peer_last_seen_seconds",
            "gauge",
            "Seconds since this peer was last heard.",
            lambda p: p.last_seen_ago,
        ),
        (
            "unity_crdt_peer_connected_seconds",
            "gauge",
            "Seconds this link has been up.",
            lambda p: p.connected_for,
        ),
        (
            "unity_crdt_peer_synced_docs",
            "gauge",
            "Docs whose current state this peer acknowledged.",
            lambda p: len(p.synced_docs),
        ),
    ]
    for name, kind, help_text, get in per_peer:
        out.family(name, kind, help_text, [(labels, get(p)) for labels, p in peers])
    out.family(
        "unity_crdt_peer_rtt_seconds",
        "gauge",
        "Last measured round trip to this peer.",
        [(labels, p.rtt) for labels, p in peers if p.rtt is not None],
    )

    out.gauge(
        "unity_crdt_docs_state_bytes",
        "Encoded state of every doc, summed.",
        sum(d.state_bytes for d in status.docs),
    )
    out.gauge(
        "unity_crdt_docs_dirty",
        "Docs changed since their last checkpoint.",
        sum(1 for d in status.docs if d.dirty),
    )
    if doc_labels:
        docs = [((("doc", d.name),), d) for d in status.docs]
        out.family(
            "unity_crdt_doc_state_bytes",
            "gauge",
            "Encoded state of this doc.",
            [(labels, d.state_bytes) for labels, d in docs],
        )
        out.family(
            "unity_crdt_doc_peers_synced",
            "gauge",
            "Peers that acknowledged this doc's current state.",
            [(labels, d.peers_synced) for labels, d in docs],
        )
        out.family(
            "unity_crdt_doc_dirty",
            "gauge",
            "1 when this doc changed since its checkpoint.",
            [(labels, int(d.dirty)) for labels, d in docs],
        )
        out.family(
            "unity_crdt_doc_last_checkpoint_timestamp_seconds",
            "gauge",
            "Wall-clock time (Unix seconds) of this doc's last good checkpoint.",
            [(labels, d.last_checkpoint) for labels, d in docs if d.last_checkpoint is not None],
        )
        failing = [(labels, int(d.checkpoint_error is not None)) for labels, d in docs]
        out.family(
            "unity_crdt_doc_checkpoint_failing",
            "gauge",
            "1 when this doc's last checkpoint failed.",
            failing,
        )
    return "\n".join(out.lines) + "\n"
