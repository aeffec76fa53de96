"""Nodes with no route between them converge through a real nats-server (JetStream).

Loopback variant of the issue's cross-network proof: mDNS off, no static peers, so the only
path between the nodes is the relay.
"""

from __future__ import annotations

import asyncio

import pytest
from relaykit import (
    NodeFactory,
    append,
    eventually,
    relay_up,
    server_subscriptions,
    stream_messages,
    text,
)

pytestmark = pytest.mark.nats


async def test_live_edits_cross_through_nats_and_a_latecomer_catches_up(
    make_node: NodeFactory, nats_server: object
) -> None:
    a = await make_node("a", nats_server)
    b = await make_node("b", nats_server)
    await relay_up(a, b)
    assert a.peers == [] and b.peers == []  # no mesh link: the relay is the only path
    append(a, "hello from a. ")
    await eventually(lambda: text(b) == "hello from a. ", what="a's edit at b")
    append(b, "hi from b.")
    await eventually(lambda: text(a) == "hello from a. hi from b.", what="b's edit at a")
    subscriptions = await server_subscriptions(nats_server)

    for i in range(1000):
        append(a if i % 2 else b, f"{i},")
        await asyncio.sleep(0)  # one loop turn per edit
    expected = "hello from a. hi from b." + "".join(f"{i}," for i in range(1000))
    # Concurrent appends interleave by CRDT rules; both sides hold the same text.
    await eventually(lambda: text(a) == text(b) and len(text(a)) == len(expected), 20.0)
    assert sorted(text(a)[len("hello from a. hi from b.") :].split(",")[:-1], key=int) == [
        str(i) for i in range(1000)
    ]
    # A thousand publishes cost no subscriptions: acknowledgements share one reply subject.
    assert await server_subscriptions(nats_server) <= subscriptions + 2

    # Edits made while acknowledgements are pending go out merged: fewer messages than edits.
    assert 1 < await stream_messages(nats_server.url) <= 1002  # type: ignore[attr-defined]
    want = text(a)
    await a.close()
    await b.close()  # nobody is left to answer c: it must catch up from the stream alone
    c = await make_node("c", nats_server)
    await relay_up(c)
    await eventually(lambda: text(c) == want, 20.0, "c to catch up from the stream")
    st = c.status().relay
    assert st is not None and st.connected and st.error is None and st.lag == 0
    assert st.server == nats_server.url  # type: ignore[attr-defined]
