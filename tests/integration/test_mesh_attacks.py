"""The attack list of SECURITY.md against a running node: each attack loses only its own
link; the node keeps every accepted update and keeps syncing with honest peers."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
from collections.abc import Awaitable, Callable

import aiohttp
import psutil
import pycrdt
import pytest
from meshkit import SECRET, Attacker, NodeFactory, eventually, string_item
from tcp_proxy import RecordingProxy

from unity_crdt import Node
from unity_crdt.sync import codec

HONEST_TEXT = "the honest content"


def text(node: Node, doc: str = "notes") -> str:
    return str(node.doc(doc).get("t", type=pycrdt.Text))


async def still_syncs(a: Node, b: Node, tag: str) -> None:
    """A fresh edit on each side reaches the other."""
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, f"[a:{tag}]")
    b.doc("notes").get("t", type=pycrdt.Text).insert(0, f"[b:{tag}]")
    await eventually(
        lambda: f"[a:{tag}]" in text(b) and f"[b:{tag}]" in text(a), 5.0, f"honest sync after {tag}"
    )


async def test_wrong_group_secret_learns_nothing(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a = await make_node("alice")
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, HONEST_TEXT)
    proxy = await RecordingProxy("127.0.0.1", int(a.url.rsplit(":", 1)[1])).start()
    try:
        eve = await make_node("eve", group_secret="some other group's secret", peers=(proxy.url,))
        await asyncio.sleep(1.5)
        assert a.peers == [] and eve.peers == []
        assert "notes" not in eve.docs
        assert proxy.connections >= 1
        assert "different sync group" in caplog.text
        # The dialling side is told why, without learning anything else.
        assert "refused our handshake" in caplog.text and "same group secret" in caplog.text
        assert HONEST_TEXT.encode() not in proxy.captured
    finally:
        await proxy.close()


async def test_wire_carries_no_text_names_or_secret(make_node: NodeFactory) -> None:
    a = await make_node("alice")
    proxy = await RecordingProxy("127.0.0.1", int(a.url.rsplit(":", 1)[1])).start()
    try:
        b = await make_node("bob", peers=(proxy.url,))
        await b.wait_for_peers(1)
        secret_doc, secret_text = "classified-plans-ünïcode", "TOP-SECRET-PAYLOAD-4242"
        a.doc(secret_doc).get("t", type=pycrdt.Text).insert(0, secret_text)
        b.doc("other").get("m", type=pycrdt.Map)["key-name-xyz"] = "value-xyz"
        await eventually(
            lambda: secret_text in text(b, secret_doc) and "other" in a.docs,
            3.0,
            "sync through the proxy",
        )
        wire = bytes(proxy.captured)
        assert len(wire) > 500
        for needle in (
            secret_text,
            secret_doc,
            "key-name-xyz",
            "value-xyz",
            SECRET,
            "alice",
            "bob",
            a.device_id,
            b.device_id,
        ):
            assert needle.encode() not in wire, f"{needle!r} crossed the wire in clear"
    finally:
        await proxy.close()


async def test_slowloris_handshake_is_cut_and_slot_freed(make_node: NodeFactory) -> None:
    a = await make_node("alice", handshake_timeout=1.0, max_handshakes_per_ip=2)
    async with aiohttp.ClientSession() as http:
        socks = [await http.ws_connect(a.url + "/unity-crdt/v1") for _ in range(2)]
        # The third is refused while two sit silently in the handshake.
        third = await http.ws_connect(a.url + "/unity-crdt/v1")
        msg = await asyncio.wait_for(third.receive(), 2.0)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for ws in socks:
            msg = await asyncio.wait_for(ws.receive(), 3.0)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert loop.time() - start < 2.5
    b = await make_node("bob", peers=(a.url,))
    await b.wait_for_peers(1, timeout=5)
    await still_syncs(a, b, "slowloris")


async def test_connection_flood_is_bounded(make_node: NodeFactory) -> None:
    a = await make_node("alice", handshake_timeout=1.0, max_handshakes=32, max_handshakes_per_ip=8)
    b = await make_node("bob", peers=(a.url,))
    await b.wait_for_peers(1)
    proc = psutil.Process(os.getpid())
    rss0 = proc.memory_info().rss
    # 500 attempts from another loopback address, so the honest peer's address is untouched.
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.5", 0), limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:

        async def attempt() -> None:
            try:
                ws = await http.ws_connect(
                    a.url + "/unity-crdt/v1", timeout=aiohttp.ClientWSTimeout(ws_close=1)
                )
                await ws.send_bytes(os.urandom(48))
                await asyncio.wait_for(ws.receive(), 3.0)
                await ws.close()
            except (aiohttp.ClientError, TimeoutError):
                pass

        await asyncio.gather(*(attempt() for _ in range(500)))
    assert proc.memory_info().rss - rss0 < 80 * 2**20
    assert len(a.peers) == 1
    await still_syncs(a, b, "flood")


async def attack_garbage(m: Attacker) -> None:
    await m.send_message(os.urandom(200))


async def attack_allocation_bomb_update(m: Attacker) -> None:
    # A real header with an implausible client count: pycrdt would reserve ~512 MB.
    bomb = bytes([0x02, 5]) + b"notes" + bytes([0, 2, 8]) + b"\xff\xff\xff\xff\x01\x00\x00\x00"
    await m.send_message(bomb)


async def attack_bomb_state_vector(m: Attacker) -> None:
    bomb = bytes([0x02, 5]) + b"notes" + bytes([0, 0, 7]) + b"\xff\xff\xff\xff\x01\x00\x00"
    await m.send_message(bomb)


async def attack_update_before_hello(m: Attacker) -> None:
    await m.send_message(codec.encode(codec.Update("notes", b"\x00\x00")))


async def attack_tampered_frame(m: Attacker) -> None:
    frame = m.session.seal(codec.encode(codec.Ping(1)))[0]
    await m.channel.send(frame[:-1] + bytes([frame[-1] ^ 1]))


async def attack_replayed_frame(m: Attacker) -> None:
    frame = m.session.seal(codec.encode(codec.Hello(codec.PROTOCOL_VERSION, {})))[0]
    await m.channel.send(frame)
    await m.channel.send(frame)


async def attack_oversized_frame(m: Attacker) -> None:
    await m.channel.send(b"\x01\x01\x00\x00" + os.urandom(2**20 + 64))


async def attack_update_under_a_non_type_parent(m: Attacker) -> None:
    """F3: an item whose parent is a string item sent in an earlier update (pycrdt raises)."""
    client = random.randrange(1, 2**31)
    await m.send_message(codec.encode(codec.Hello(codec.PROTOCOL_VERSION, {})))
    await m.send_message(codec.encode(codec.Update("junk", string_item(client, "abc", "t"))))
    poison = string_item(client + 1, "x", (client, 0))
    await m.send_message(codec.encode(codec.Update("junk", poison)))


async def attack_flood_of_new_docs(m: Attacker) -> None:
    """F5: 2,000 new docs at once; a per-peer quota holds the node to its burst."""
    await m.send_message(codec.encode(codec.Hello(codec.PROTOCOL_VERSION, {})))
    base = random.randrange(1, 2**31)
    parts = [
        codec.encode(codec.Update(f"flood-{base}-{i}", string_item(base + i, "x", "t")))
        for i in range(2000)
    ]
    await m.send_message(codec.encode_batch(parts))


async def attack_never_reads(m: Attacker) -> None:
    """F14: ask for everything, ping without end, never read an answer."""
    await m.send_message(codec.encode(codec.Hello(codec.PROTOCOL_VERSION, {})))
    for _ in range(20):
        pings = [codec.encode(codec.Ping(n)) for n in range(4000)]
        try:
            await asyncio.wait_for(m.send_message(codec.encode_batch(pings)), 2.0)
        except Exception:
            return


async def attack_made_up_presence(m: Attacker) -> None:
    """F4: presence for 2,000 doc names nobody holds (kept aside, bounded, never relayed)."""
    from unity_crdt.sync.yprotocol import encode_awareness

    tag = random.randrange(2**32)
    await m.send_message(codec.encode(codec.Hello(codec.PROTOCOL_VERSION, {})))
    parts = [
        codec.encode(codec.Awareness(f"made-up-{tag}-{i}", encode_awareness([(i + 1, 0, b"1")])))
        for i in range(2000)
    ]
    await m.send_message(codec.encode_batch(parts))


ATTACKS: list[Callable[[Attacker], Awaitable[None]]] = [
    attack_garbage,
    attack_allocation_bomb_update,
    attack_bomb_state_vector,
    attack_update_before_hello,
    attack_tampered_frame,
    attack_replayed_frame,
    attack_oversized_frame,
    attack_update_under_a_non_type_parent,
]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda f: f.__name__)
async def test_member_attacks_lose_only_their_link(
    make_node: NodeFactory, attack: Callable[[Attacker], Awaitable[None]]
) -> None:
    a = await make_node("alice")
    b = await make_node("bob", peers=(a.url,))
    await b.wait_for_peers(1)
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, HONEST_TEXT)
    await eventually(lambda: text(b) == HONEST_TEXT, 2.0)
    before = a.doc("notes").get_state()
    rss0 = psutil.Process(os.getpid()).memory_info().rss

    m = await Attacker.connect(a.url)
    try:
        await attack(m)
        assert await m.closed_by_node(), "the node kept a link that misbehaved"
    finally:
        await m.channel.close()
    assert a.doc("notes").get_state() == before
    assert text(a) == HONEST_TEXT
    assert psutil.Process(os.getpid()).memory_info().rss - rss0 < 60 * 2**20
    await eventually(lambda: {p.name for p in a.peers} == {"bob"}, 2.0, "attacker dropped")
    await still_syncs(a, b, attack.__name__)


async def test_replayed_session_is_rejected(make_node: NodeFactory) -> None:
    a = await make_node("alice")
    m = await Attacker.connect(a.url)
    await m.send_message(codec.encode(codec.Hello(codec.PROTOCOL_VERSION, {})))
    await m.send_message(
        codec.encode(codec.Update("replayed", _one_update("this must not appear twice")))
    )
    await eventually(lambda: "replayed" in a.docs, 2.0)
    await m.channel.close()
    await eventually(lambda: a.peers == [], 2.0)
    a.doc("replayed").get("t", type=pycrdt.Text).insert(0, "x")
    state = a.doc("replayed").get_state()

    from unity_crdt.net import websocket as transport

    raw = await transport.dial(a.url)
    try:
        for data in m.sent:
            await raw.send(data)
        await asyncio.sleep(0.5)
    except Exception:  # the node may cut the replay off mid-way: that is the point
        pass
    finally:
        await raw.close()
    assert a.peers == []
    assert a.doc("replayed").get_state() == state


def _one_update(s: str) -> bytes:
    d = pycrdt.Doc()
    d.get("t", type=pycrdt.Text).insert(0, s)
    return d.get_update()


@pytest.mark.slow
async def test_soak_ten_peers_with_a_junk_sender(make_node: NodeFactory) -> None:
    """10 honest peers edit for a minute while a member keeps sending junk to one of them:
    the honest peers converge with every edit, and more junk grows no memory."""
    import random

    rng = random.Random(10)
    # F5: the target lets peers make it create few new docs (5 a second after a burst of 300).
    nodes = [await make_node("h0", new_docs_burst=300, new_docs_rate=5.0)]
    for i in range(1, 10):
        nodes.append(await make_node(f"h{i}", peers=(rng.choice(nodes).url,)))
    target = nodes[0]
    proc = psutil.Process(os.getpid())
    junk_links = 0

    refused = [
        attack_garbage,
        attack_allocation_bomb_update,
        attack_bomb_state_vector,
        attack_tampered_frame,
        attack_update_before_hello,
        attack_update_under_a_non_type_parent,
        attack_made_up_presence,
        attack_never_reads,
    ]

    async def junk_sender(
        stop: asyncio.Event, attacks: list[Callable[[Attacker], Awaitable[None]]]
    ) -> None:
        nonlocal junk_links
        while not stop.is_set():
            m = await Attacker.connect(target.url)
            junk_links += 1
            try:
                await rng.choice(attacks)(m)
                await m.closed_by_node(2.0)
            finally:
                await m.channel.close()

    stop = asyncio.Event()
    sender = asyncio.ensure_future(junk_sender(stop, [*refused, attack_flood_of_new_docs]))
    markers: set[str] = set()
    loop = asyncio.get_running_loop()
    end = loop.time() + 60.0
    i = 0
    while loop.time() < end:
        node = rng.choice(nodes)
        marker = f"{node.config.name}:{i}"
        i += 1
        node.doc("soak").get("m", type=pycrdt.Map)[marker] = i
        markers.add(marker)
        await asyncio.sleep(0.01)
    stop.set()
    await sender

    def converged() -> bool:
        return all(set(n.doc("soak").get("m", type=pycrdt.Map).keys()) == markers for n in nodes)

    await eventually(converged, 20.0, "10 honest peers converged")
    assert junk_links > 20
    # F4: made-up presence left no table behind anywhere but the bounded side table.
    assert all(len(n._presence) <= 64 + 1 for n in nodes), [len(n._presence) for n in nodes]
    # Flat memory. The honest edits grow the docs, the caches (SQLite's page cache) and the
    # bounded dedupe tables, all legitimately, and so do the docs a flood creates at the
    # rate its quota allows (~5 KB per doc on each of the ten nodes); with those done, 25
    # more seconds of refused junk must grow nothing but noise.
    stop = asyncio.Event()
    before = junk_links
    sender = asyncio.ensure_future(junk_sender(stop, refused))
    await asyncio.sleep(5.0)  # the junk paths' first allocations
    gc.collect()
    start = proc.memory_info().rss
    samples = []
    for _ in range(25):
        await asyncio.sleep(1.0)
        samples.append(proc.memory_info().rss - start)
    stop.set()
    await sender
    assert junk_links - before > 10
    assert max(samples) < 8 * 2**20, [round(x / 2**20, 1) for x in samples]
