"""Zero-configuration: nodes with mDNS on loopback and no static peers find each other."""

from __future__ import annotations

import pycrdt
from meshkit import NodeFactory, eventually


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
