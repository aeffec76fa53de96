"""#11's F5 and F14 against live nodes: a member that floods new docs, and one that never reads.

Both are members (they hold the group secret), so the handshake lets them in; what bounds them
is the sync core: a per-peer quota on docs it makes this node create (and inventories paged,
never capped, so a node with many docs partitions nobody), and a send budget per link that
closes the link of a peer that stops reading instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import time

import psutil
import pycrdt
from meshkit import Attacker, NodeFactory, eventually, string_item

from unity_crdt.ids import PeerAddress
from unity_crdt.sync import codec

MB = 2**20


async def _hello(m: Attacker) -> None:
    await m.send_message(codec.encode(codec.Hello(codec.PROTOCOL_VERSION, {})))


async def test_f5_a_flood_of_new_docs_is_held_to_a_quota_and_partitions_nobody(
    make_node: NodeFactory,
) -> None:
    a = await make_node("alice", new_docs_burst=300, new_docs_rate=50.0)
    b = await make_node("bob", peers=(a.url,))
    await a.wait_for_peers(1)
    m = await Attacker.connect(a.url)
    await _hello(m)
    started = time.monotonic()
    sent = 0
    for burst in range(10):  # 5,000 new docs in about a second, 500 at a time
        parts = [
            codec.encode(
                codec.Update(f"flood-{burst}-{i}", string_item(10_000 + sent + i, "x", "t"))
            )
            for i in range(500)
        ]
        sent += len(parts)
        await m.send_message(codec.encode_batch(parts))
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    elapsed = time.monotonic() - started
    flood = [d for d in a.docs if d.startswith("flood-")]
    allowed = 300 + 50.0 * elapsed
    print(
        f"\nF5: {sent} new docs sent in {elapsed:.1f} s; {len(flood)} created (quota {allowed:.0f})"
    )
    assert 0 < len(flood) <= allowed + 10
    assert not await m.closed_by_node(0.5)  # over the quota is skipped, not a reason to drop
    # No partition: the honest peer still syncs both ways.
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, "from alice")
    b.doc("notes").get("t", type=pycrdt.Text).insert(0, "from bob ")
    want = str(a.doc("notes").get("t", type=pycrdt.Text))
    await eventually(
        lambda: len(str(b.doc("notes").get("t", type=pycrdt.Text))) == len("from bob from alice"),
        10.0,
        "honest sync during a flood",
    )
    assert "from alice" in want
    await m.channel.close()


async def test_f14_a_member_that_never_reads_loses_its_link_and_memory_stays_bounded(
    make_node: NodeFactory,
) -> None:
    a = await make_node("alice", send_queue_bytes=2 * MB)
    b = await make_node("bob", peers=(a.url,))
    await a.wait_for_peers(1)
    for i in range(40):  # docs worth asking for: 40 x ~50 kB
        a.doc(f"big-{i}").get("t", type=pycrdt.Text).insert(0, f"{i} " + "y" * 50_000)
    proc = psutil.Process()
    before = proc.memory_info().rss
    m = await Attacker.connect(a.url)
    await _hello(m)
    sent = 0
    # Ask for every doc again and again, and ping, and never read a byte of the answers.
    closed = False
    while sent < 15 * MB and not closed:
        asks = [codec.encode(codec.SyncStep1(f"big-{i}", b"\x00")) for i in range(40)]
        pings = [codec.encode(codec.Ping(n)) for n in range(4000)]
        batch = codec.encode_batch(asks + pings)
        try:  # a cut-off socket can leave our own send waiting for a drain that never comes
            await asyncio.wait_for(m.send_message(batch), 10.0)
        except Exception:  # the node cut us off
            closed = True
        sent += len(batch)
        await asyncio.sleep(0)
    closed = closed or await m.closed_by_node(5.0)
    grown = (proc.memory_info().rss - before) / MB
    print(
        f"\nF14: {sent / MB:.1f} MiB of requests sent unread; link closed: {closed}; "
        f"node RSS +{grown:.1f} MiB"
    )
    assert closed, "the node kept queueing answers for a peer that does not read"
    # Round 1 queued every answer: ~3 M small Pongs for 15 MiB of pings, ~150 MiB of objects.
    assert grown < 80, f"memory grew by {grown:.0f} MiB"
    # The honest peer is untouched.
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, "still here")
    await eventually(
        lambda: str(b.doc("notes").get("t", type=pycrdt.Text)) == "still here", 10.0, "bob"
    )


def _item(client: int, text: str) -> bytes:
    doc = pycrdt.Doc(client_id=client)
    doc.get("t", type=pycrdt.Text).insert(0, text)
    return doc.get_update()


async def test_f6_two_versions_of_one_edit_are_detected_and_reported(
    make_node: NodeFactory,
) -> None:
    """A member sends different items under one Yjs id to two nodes. Their digests (ids and
    deletions) agree, so sync alone would call them synced forever; the content checks that
    ride on anti-entropy see the difference and both nodes report it."""
    a = await make_node("alice")
    b = await make_node("bob")  # not linked yet: each gets its own version first
    client = 4242
    for node, text in ((a, "version A"), (b, "version B")):
        m = await Attacker.connect(node.url)
        await _hello(m)
        await m.send_message(codec.encode(codec.Update("contract", _item(client, text))))
        await eventually(lambda node=node: "contract" in node.docs, 5.0, "the update lands")
        await m.channel.close()
    assert b._mesh is not None
    b._mesh.add_address(PeerAddress.parse(a.url))
    await a.wait_for_peers(1)
    # Same ids, same deletions: the digests agree and each side believes the other synced.
    assert a._replica.digest("contract") == b._replica.digest("contract")
    assert str(a.doc("contract").get("t", type=pycrdt.Text)) == "version A"
    assert str(b.doc("contract").get("t", type=pycrdt.Text)) == "version B"
    await eventually(
        lambda: (
            a.status().equivocations == ("contract",) and b.status().equivocations == ("contract",)
        ),
        15.0,
        "both nodes report the equivocation",
    )
    # Honest docs raise no such report.
    a.doc("honest").get("t", type=pycrdt.Text).insert(0, "fine")
    await asyncio.sleep(3 * a.config.anti_entropy_interval)
    assert a.status().equivocations == ("contract",)
