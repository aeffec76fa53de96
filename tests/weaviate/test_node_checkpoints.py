"""Weaviate as the canonical store, driven through the Node API against the real server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pycrdt
import pytest
from serverkit import load_script

from unity_crdt import Node, NodeConfig

NodeMaker = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node(tmp_path: Path, weaviate_server: Any) -> AsyncIterator[NodeMaker]:
    """Nodes of one fresh group (so one fresh tenant) checkpointing to the session server."""
    secret = secrets.token_hex(16)
    nodes: list[Node] = []

    async def factory(name: str, **kw: Any) -> Node:
        values: dict[str, Any] = dict(
            name=name,
            cache_dir=tmp_path / name,
            group_secret=secret,
            mdns=False,
            weaviate_url=weaviate_server.url,
            weaviate_grpc_port=weaviate_server.grpc_port,
            checkpoint_interval=0.3,
            pull_interval=None,
        )
        values.update(kw)
        node = Node(NodeConfig(**values))
        await node.start()
        nodes.append(node)
        return node

    yield factory
    for node in reversed(nodes):
        with contextlib.suppress(Exception):
            await node.close()


def text(node: Node, doc: str = "notes") -> str:
    return str(node.doc(doc).get("t", type=pycrdt.Text))


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def test_fresh_node_restores_exactly_what_a_closed_node_checkpointed(
    make_node: NodeMaker,
) -> None:
    a = await make_node("a")
    t = a.doc("notes").get("t", type=pycrdt.Text)
    t.insert(0, "hello wörld, to be restored")
    del t[0:6]
    a.doc("settings").get("m", type=pycrdt.Map)["theme"] = "dark"
    await a.checkpoint()
    state = {d: a.doc(d).get_state() for d in ("notes", "settings")}
    await a.close()

    b = await make_node("b")
    assert b.docs == []
    restored = await b.restore()
    assert restored == ["notes", "settings"]
    assert text(b) == "wörld, to be restored"
    assert b.doc("settings").get("m", type=pycrdt.Map)["theme"] == "dark"
    assert {d: b.doc(d).get_state() for d in ("notes", "settings")} == state


async def test_concurrent_checkpoints_of_one_doc_restore_as_their_merge(
    make_node: NodeMaker,
) -> None:
    writers = [await make_node(f"w{i}") for i in range(3)]
    for i, w in enumerate(writers):
        w.doc("notes").get("m", type=pycrdt.Map)[f"from-{i}"] = i * 10
        w.doc("notes").get("t", type=pycrdt.Text).insert(0, f"<w{i}>")
    await asyncio.gather(*(w.checkpoint() for w in writers))
    fresh = await make_node("fresh")
    await fresh.restore()
    m = fresh.doc("notes").get("m", type=pycrdt.Map)
    assert {k: int(v) for k, v in m.items()} == {"from-0": 0, "from-1": 10, "from-2": 20}
    assert sorted(text(fresh)[i : i + 4] for i in range(0, 12, 4)) == ["<w0>", "<w1>", "<w2>"]


async def test_unlinked_nodes_converge_through_periodic_pull(make_node: NodeMaker) -> None:
    # No peers, no mDNS: Weaviate is the only path between them.
    a = await make_node("a", pull_interval=0.3)
    b = await make_node("b", pull_interval=0.3)
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, "from a on network one. ")
    b.doc("notes").get("t", type=pycrdt.Text).insert(0, "from b on network two. ")
    await until(
        lambda: "network two" in text(a) and "network one" in text(b),
        15.0,
        "convergence through Weaviate",
    )
    await until(lambda: text(a) == text(b), 5.0, "identical text")
    assert a.peers == [] and b.peers == []


async def test_search_finds_searchable_docs_only(make_node: NodeMaker) -> None:
    a = await make_node("a", searchable=("public",))
    a.doc("public").get("t", type=pycrdt.Text).insert(0, "the quarterly zebra migration report")
    a.doc("private").get("t", type=pycrdt.Text).insert(0, "the secret zebra plans")
    await a.checkpoint()
    hits = await a.search("zebra")
    assert [h.doc for h in hits] == ["public"]
    assert "zebra" in hits[0].snippet and hits[0].score > 0


async def test_weaviate_down_then_back_loses_nothing(
    make_node: NodeMaker, weaviate_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    a = await make_node("a")
    b = await make_node("b", peers=(a.url,))
    await b.wait_for_peers(1)
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, "before the outage. ")
    await a.checkpoint()

    weaviate_server.kill()
    try:
        a.doc("notes").get("t", type=pycrdt.Text).insert(0, "during the outage. ")
        # Peers keep syncing while the canonical store is down.
        await until(lambda: "during" in text(b), 2.0, "peer sync during the outage")
        with pytest.raises(Exception, match=r"(?i)unreachable|connect|checkpoint"):
            await a.checkpoint()
    finally:
        await asyncio.to_thread(weaviate_server.restart)
    # The periodic loop resumes by itself once the server is back.
    await until(lambda: not a._require_checkpoints().cp.dirty, 30.0, "checkpoints resumed")
    await a.close()
    await b.close()
    fresh = await make_node("fresh")
    await fresh.restore()
    assert "before the outage" in text(fresh) and "during the outage" in text(fresh)


async def test_weaviate_down_at_start_the_node_still_syncs(
    make_node: NodeMaker, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    a = await make_node(
        "a", weaviate_url=f"http://127.0.0.1:{dead}", weaviate_grpc_port=dead, restore_on_start=True
    )
    b = await make_node("b", peers=(a.url,))
    await b.wait_for_peers(1)
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, "offline from weaviate")
    await until(lambda: text(b) == "offline from weaviate", 2.0, "peer sync")
    with pytest.raises(Exception, match=r"(?i)unreachable|connect"):
        await a.checkpoint()
    status = a.status()
    assert status.checkpoints and status.docs[0].dirty
    assert "restore on start failed" in caplog.text


async def test_commit_notice_over_nats_pulls_from_weaviate_at_once(make_node: NodeMaker) -> None:
    """B gets no deltas (relay_deltas=False), never polls (pull_interval=None), has no mesh link:
    only A's commit notice over NATS makes it pull A's checkpoint from Weaviate."""
    nats_script = load_script("nats")
    with nats_script.NatsServer() as server:
        kw = dict(relay_url=server.url, relay_deltas=False, checkpoint_interval=3600.0)
        a = await make_node("a", **kw)
        b = await make_node("b", **kw)
        await until(lambda: all(n.status().relay.connected for n in (a, b)), 15.0, "relays")  # type: ignore[union-attr]
        a.doc("notes").get("t", type=pycrdt.Text).insert(0, "canonical now")
        await asyncio.sleep(0.5)
        assert text(b) == ""
        await a.checkpoint()
        started = asyncio.get_running_loop().time()
        await until(lambda: text(b) == "canonical now", 10.0, "b to pull on the notice")
        took = asyncio.get_running_loop().time() - started
        print(f"notice -> Weaviate pull -> content at b: {took * 1000:.0f} ms")
