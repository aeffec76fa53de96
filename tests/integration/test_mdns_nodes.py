"""Zero-configuration: nodes with mDNS on loopback and no static peers find each other."""

from __future__ import annotations

import logging
import secrets
import time

import pycrdt
import pytest
from meshkit import SECRET, NodeFactory, eventually
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from unity_crdt.crypto.keys import derive_group_keys
from unity_crdt.net.mdns import SERVICE_TYPE


async def test_three_nodes_discover_each_other_and_converge(make_node: NodeFactory) -> None:
    nodes = [await make_node(f"n{i}", mdns=True) for i in range(3)]
    for i, n in enumerate(nodes):
        n.doc("shared").get("t", type=pycrdt.Text).insert(0, f"<from n{i}>")
    for n in nodes:
        await n.wait_for_peers(2, timeout=15)

    def texts() -> set[str]:
        return {str(n.doc("shared").get("t", type=pycrdt.Text)) for n in nodes}

    await eventually(lambda: len(texts()) == 1, 5.0, "identical text on all three")
    (final,) = texts()
    assert all(f"<from n{i}>" in final for i in range(3))


async def test_other_group_on_the_same_lan_is_never_linked(make_node: NodeFactory) -> None:
    a = await make_node("a", mdns=True)
    b = await make_node("b", mdns=True)
    stranger = await make_node("stranger", mdns=True, group_secret="another group entirely")
    stranger.doc("shared").get("t", type=pycrdt.Text).insert(0, "stranger's text")
    await a.wait_for_peers(1, timeout=15)
    await b.wait_for_peers(1, timeout=15)
    assert {p.name for p in a.peers} == {"b"}
    assert stranger.peers == []
    assert "shared" not in a.docs


async def test_replayed_announcement_to_a_wrong_address_is_backed_off(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A member's announcement replayed with a non-member's address: handshakes fail there,
    the address is dropped after a few tries, and real peers keep syncing."""
    caplog.set_level(logging.INFO)
    a = await make_node("a", mdns=True, reconnect_max=0.2)
    stranger = await make_node("stranger", group_secret="not the same group at all")
    beacon = derive_group_keys(SECRET).beacons(time.time())[0]
    port = int(stranger.url.rsplit(":", 1)[1])
    aiozc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    try:
        await aiozc.zeroconf.async_wait_for_start()
        label = secrets.token_hex(8)
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=port,
            properties={"v": "1", "g": beacon},
            server=f"{label}.local.",
            parsed_addresses=["127.0.0.1"],
        )
        aiozc.zeroconf.async_send(aiozc.zeroconf.generate_service_broadcast(info, None))
        await eventually(
            lambda: "different sync group" in caplog.text,
            5.0,
            "a handshake attempt against the replayed address",
        )
        b = await make_node("b", mdns=True)
        await a.wait_for_peers(1, timeout=10)
        assert [p.name for p in a.peers] == ["b"] and stranger.peers == []
        b.doc("d").get("t", type=pycrdt.Text).insert(0, "honest")
        await eventually(lambda: str(a.doc("d").get("t", type=pycrdt.Text)) == "honest", 3.0)
        await eventually(
            lambda: f"forgetting discovered address ws://127.0.0.1:{port}" in caplog.text,
            10.0,
            "the bad address dropped",
        )
    finally:
        await aiozc.async_close()
