"""The link's send queue (`sync.outbox.Outbox`): budget, bounded batches, late replies, parts."""

from __future__ import annotations

import pytest
from pycrdt import Doc, Text

from unity_crdt.errors import ErrorCode, ProtocolError
from unity_crdt.sync.codec import Batch, Part, Ping, SyncStep2, Update, decode, encode
from unity_crdt.sync.outbox import Outbox
from unity_crdt.sync.replica import Replica
from unity_crdt.sync.session import PART_SIZE, Reply, SyncSession


def _drain(box: Outbox) -> list[object]:
    out = []
    while (payload := box.next_payload()) is not None:
        msg = decode(payload)
        out.extend(msg.messages if isinstance(msg, Batch) else [msg])
    return out


def test_batches_are_bounded_by_count_and_bytes() -> None:
    box = Outbox(lambda r: [], batch_count=100, batch_bytes=10_000)
    box.put([Ping(i) for i in range(1000)])
    sizes = []
    while (payload := box.next_payload()) is not None:
        msg = decode(payload)
        sizes.append(len(msg.messages) if isinstance(msg, Batch) else 1)
    assert sum(sizes) == 1000 and max(sizes) <= 100
    box.put([Update("d", b"\x00" * 6000) for _ in range(3)])  # each over half the byte cap
    assert [len(box.next_payload() or b"") > 6000 for _ in range(3)] == [True] * 3


def test_a_peer_that_does_not_read_overloads_the_queue_instead_of_growing_it() -> None:
    box = Outbox(lambda r: [], budget=64 * 1024)
    with pytest.raises(ProtocolError) as info:
        for _ in range(100):
            box.put([Update("d", b"\x00" * 1024)])
    assert info.value.code == ErrorCode.OVERLOADED
    assert box.queued_bytes <= 64 * 1024 + 2048


def test_replies_are_computed_late_one_per_doc_and_big_ones_stream_in_parts() -> None:
    replica = Replica(lambda *_: None)
    replica.doc("big").get("t", type=Text).insert(0, "é" * PART_SIZE)  # 2 bytes each: parts
    replica.doc("small").get("t", type=Text).insert(0, "tiny")
    session = SyncSession(replica, peer="p", now=0.0)
    made: list[str] = []

    def make(reply: Reply) -> list:  # type: ignore[type-arg]
        made.append(reply.doc)
        return session.reply(reply)

    box = Outbox(make)
    # Three requests, two for the same doc: the later one wins, nothing is computed yet.
    box.put([Reply("big", b"\x00"), Reply("small", b"\x00"), Reply("small", b"\x00")])
    assert made == [] and box.queued_bytes < 1000
    box.put([Ping(1)])
    msgs = _drain(box)
    assert made == ["big", "small"]
    parts = [m for m in msgs if isinstance(m, Part)]
    assert len(parts) >= 2 and parts[-1].final and not any(p.final for p in parts[:-1])
    assert Ping(1) in msgs and msgs.index(Ping(1)) < len(msgs) - 1  # live traffic interleaves
    whole = b"".join(p.data for p in parts)
    doc: Doc = Doc()
    doc.apply_update(whole)
    assert str(doc.get("t", type=Text)) == "é" * PART_SIZE
    assert SyncStep2("small", replica.diff("small", b"\x00")) in msgs
    assert encode(Ping(1))  # the queue only ever holds encodable messages
