"""The secure mesh end to end: real nodes, real sockets on 127.0.0.1, real caches."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path

import pycrdt
import pytest
from meshkit import NodeFactory, eventually, node_config

from unity_crdt import Node


def text(node: Node, doc: str = "notes") -> str:
    return str(node.doc(doc).get("t", type=pycrdt.Text))


def edit(node: Node, s: str, doc: str = "notes", at: int | None = None) -> None:
    t = node.doc(doc).get("t", type=pycrdt.Text)
    t.insert(len(str(t).encode()) if at is None else at, s)


async def test_two_nodes_sync_both_ways_within_a_second(make_node: NodeFactory) -> None:
    a = await make_node("alice")
    b = await make_node("bob", peers=(a.url,))
    await b.wait_for_peers(1)
    await a.wait_for_peers(1)
    assert {p.name for p in a.peers} == {"bob"} and {p.name for p in b.peers} == {"alice"}
    assert a.peers[0].device_id == b.device_id

    edit(a, "hello from alice. ")
    took = await eventually(lambda: "alice" in text(b), 1.0, "alice's edit on bob")
    edit(b, "héllo from bob ✓")
    took = max(took, await eventually(lambda: "bob" in text(a), 1.0, "bob's edit on alice"))
    assert text(a) == text(b)
    assert took < 1.0


async def test_restart_keeps_edits_and_resyncs(tmp_path: Path, make_node: NodeFactory) -> None:
    a = await make_node("alice")
    b = await make_node("bob", peers=(a.url,))
    await b.wait_for_peers(1)
    edit(a, "one ")
    edit(b, "two ")
    await eventually(lambda: text(a) == text(b) and "two" in text(a), 2.0)
    await b.close()

    edit(a, "three (while bob is down) ")
    b2 = Node(node_config(tmp_path, "bob", peers=(a.url,)))
    async with b2:
        # Bob's own edits survived his restart, before any peer is back.
        assert "two" in text(b2) and "one" in text(b2)
        edit(b2, "four ")
        await b2.wait_for_peers(1)
        await eventually(
            lambda: text(a) == text(b2) and "three" in text(b2) and "four" in text(a), 3.0
        )


async def test_line_of_five_relays_inserts_and_deletes(make_node: NodeFactory) -> None:
    nodes = [await make_node("n0")]
    for i in range(1, 5):
        nodes.append(await make_node(f"n{i}", peers=(nodes[-1].url,)))
    for n in nodes[1:-1]:
        await n.wait_for_peers(2)
    first, last = nodes[0], nodes[-1]
    edit(first, "abcdef")
    await eventually(lambda: text(last) == "abcdef", 3.0, "insert across 4 hops")
    # A deletion does not move the state vector: it must travel the line too.
    first.doc("notes").get("t", type=pycrdt.Text).__delitem__(slice(1, 3))
    await eventually(lambda: text(last) == "adef", 3.0, "delete across 4 hops")

    # Stop the middle node; edit on both sides; restart it: everyone converges.
    # It comes back on the same port, so its neighbours' dialers find it again.
    mid_cfg = replace(nodes[2].config, port=int(nodes[2].url.rsplit(":", 1)[1]))
    await nodes[2].close()
    edit(first, "<left>", at=0)
    edit(last, "<right>")
    await asyncio.sleep(0.2)
    assert "<right>" not in text(first)
    async with Node(mid_cfg) as mid:
        await mid.wait_for_peers(2, timeout=10)
        await eventually(
            lambda: (
                text(first) == text(last) and "<right>" in text(first) and "<left>" in text(last)
            ),
            10.0,
            "convergence after the middle returns",
        )
        assert text(mid) == text(first)


@pytest.mark.slow
async def test_eight_nodes_random_edits_converge(make_node: NodeFactory) -> None:
    rng = random.Random(8)
    nodes: list[Node] = [await make_node("m0")]
    for i in range(1, 8):
        # A sparse random mesh: each node dials one or two earlier nodes.
        targets = rng.sample(nodes, k=min(len(nodes), rng.choice((1, 2))))
        nodes.append(await make_node(f"m{i}", peers=tuple(n.url for n in targets)))
    markers: set[str] = set()
    loop = asyncio.get_running_loop()
    end = loop.time() + 30.0
    i = 0
    while loop.time() < end:
        node = rng.choice(nodes)
        marker = f"<{node.config.name}:{i}>"
        i += 1
        t = node.doc(rng.choice(("d1", "d2"))).get("t", type=pycrdt.Text)
        if rng.random() < 0.15 and len(str(t)) > 40:
            del t[0:3]  # deletions too; markers are only checked in the map below
        t.insert(0, marker)
        node.doc("log").get("m", type=pycrdt.Map)[marker] = node.config.name
        markers.add(marker)
        await asyncio.sleep(rng.uniform(0.0, 0.02))

    def converged() -> bool:
        states = {
            (
                str(n.doc("d1").get("t", type=pycrdt.Text)),
                str(n.doc("d2").get("t", type=pycrdt.Text)),
                frozenset(n.doc("log").get("m", type=pycrdt.Map).keys()),
            )
            for n in nodes
        }
        return len(states) == 1

    await eventually(converged, 15.0, "8 nodes identical")
    assert set(nodes[0].doc("log").get("m", type=pycrdt.Map).keys()) == markers
    for n in nodes:
        await n.flush()
    assert len(markers) > 300


async def test_presence_crosses_the_mesh_and_expires(make_node: NodeFactory) -> None:
    a = await make_node("a", presence_timeout=1.5)
    b = await make_node("b", peers=(a.url,), presence_timeout=1.5)
    c = await make_node("c", peers=(b.url,), presence_timeout=1.5)  # c never links to a
    await b.wait_for_peers(2)
    # Presence is kept and relayed only by nodes that hold the doc.
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, "held everywhere")
    await eventually(lambda: "notes" in c.docs, 3.0, "notes reached c")
    a.set_presence("notes", {"user": "alice", "cursor": 3})
    a_id = a.doc("notes").client_id
    await eventually(
        lambda: c.presence("notes").get(a_id) == {"user": "alice", "cursor": 3},
        2.0,
        "a's presence at c, two hops away",
    )
    c.set_presence("notes", {"user": "carol"})
    c_id = c.doc("notes").client_id
    await eventually(lambda: c_id in a.presence("notes"), 2.0, "c's presence at a")
    # Renewals keep a live state alive past the timeout...
    await asyncio.sleep(2.0)
    assert a_id in c.presence("notes")
    # ...and a state that is no longer renewed fades everywhere.
    await a.close()
    await eventually(lambda: a_id not in c.presence("notes"), 4.0, "a's presence expired at c")
    assert c.presence("notes")[c_id] == {"user": "carol"}


async def test_crossing_dials_keep_exactly_one_link(tmp_path: Path) -> None:
    # Both nodes dial each other at the same moment: each end must settle on the same link.
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    a_cfg = node_config(tmp_path, "a", port=ports[0], peers=(f"ws://127.0.0.1:{ports[1]}",))
    b_cfg = node_config(tmp_path, "b", port=ports[1], peers=(f"ws://127.0.0.1:{ports[0]}",))
    async with Node(a_cfg) as a, Node(b_cfg) as b:
        await a.wait_for_peers(1)
        await b.wait_for_peers(1)
        await asyncio.sleep(1.5)  # any duplicate would have been resolved (or flapped) by now
        assert len(a.peers) == 1 and len(b.peers) == 1
        got: list[bytes] = []
        b.doc("d").observe(lambda e: got.append(bytes(e.update)))
        a.doc("d").get("t", type=pycrdt.Text).insert(0, "once")
        await eventually(lambda: text(b, "d") == "once", 2.0)
        await asyncio.sleep(0.3)
        assert len(got) == 1, "an update was delivered twice"


async def test_a_stalled_process_does_not_drop_its_links(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A long GC pause or a suspended laptop stops every timer; when the process runs again,
    the peer's frames wait unread in the socket. The link must read them before it judges the
    peer silent, not close on the first tick."""
    import time

    a = await make_node("a", ping_interval=0.5, idle_timeout=2.0)
    b = await make_node("b", peers=(a.url,), ping_interval=0.5, idle_timeout=2.0)
    await b.wait_for_peers(1)
    await asyncio.sleep(1.0)
    time.sleep(3.0)  # the whole process stops for longer than the idle timeout
    await asyncio.sleep(2.0)
    closes = [r.getMessage() for r in caplog.records if "closed" in r.getMessage()]
    assert not closes, closes
    assert len(a.peers) == 1 and len(b.peers) == 1
