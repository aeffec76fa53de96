"""The relay under faults: NATS killed mid-burst, offline edits across a restart, wrong
credentials, a cluster losing its stream leader. Real nats-server processes throughout."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import nats
import pytest
from relaykit import (
    NodeFactory,
    append,
    eventually,
    relay_config,
    relay_up,
    stream_msg_ids,
    text,
)

from unity_crdt import Node

pytestmark = pytest.mark.nats


def tokens(value: str) -> list[str]:
    return [t for t in value.split(",") if t]


async def burst(node: Node, tag: str, start: int, stop: int) -> None:
    """Appends `tag<i>,` for i in [start, stop), one loop turn each."""
    for i in range(start, stop):
        append(node, f"{tag}{i},")
        await asyncio.sleep(0.002)


async def test_nats_killed_mid_burst_lans_keep_syncing_and_catch_up_after(
    make_node: NodeFactory, nats_server: Any
) -> None:
    a1 = await make_node("a1", nats_server)
    a2 = await make_node("a2", nats_server, peers=(a1.url,))
    b1 = await make_node("b1", nats_server)
    b2 = await make_node("b2", nats_server, peers=(b1.url,))
    await a2.wait_for_peers(1)
    await b2.wait_for_peers(1)
    await relay_up(a1, a2, b1, b2)

    await asyncio.gather(burst(a1, "a", 0, 100), burst(b1, "b", 0, 100))
    nats_server.kill()
    await asyncio.gather(burst(a1, "a", 100, 200), burst(b1, "b", 100, 200))
    # Each LAN keeps syncing on its own while NATS is down.
    await eventually(lambda: text(a2) == text(a1), 10.0, "a2 to follow a1 over the LAN")
    await eventually(lambda: text(b2) == text(b1), 10.0, "b2 to follow b1 over the LAN")
    assert {t for t in tokens(text(a1)) if t.startswith("a")} == {f"a{i}" for i in range(200)}
    st = a1.status().relay
    assert st is not None and not st.connected and st.error
    assert st.outbox > 0  # a's offline edits wait in the outbox

    nats_server.restart()
    await relay_up(a1, a2, b1, b2, timeout=30.0)
    want = {f"a{i}" for i in range(200)} | {f"b{i}" for i in range(200)}
    for node in (a1, a2, b1, b2):
        await eventually(
            lambda n=node: set(tokens(text(n))) == want, 30.0, f"{node.config.name} to converge"
        )
        assert sorted(tokens(text(node))) == sorted(want)  # none lost, none duplicated
    await eventually(lambda: all(n.status().relay.outbox == 0 for n in (a1, a2, b1, b2)), 10.0)  # type: ignore[union-attr]
    ids = await stream_msg_ids(nats_server.url)
    assert len(ids) == len(set(ids)), "a part was stored twice"


async def test_offline_edits_survive_a_restart_in_the_outbox(
    tmp_path: Path, make_node: NodeFactory, nats_server: Any
) -> None:
    b = await make_node("b", nats_server)
    await relay_up(b)
    nats_server.kill()
    cfg = relay_config(tmp_path, "a", nats_server)
    async with Node(cfg) as a:  # NATS is down: start() does not wait for it
        for i in range(5):
            append(a, f"offline{i},")
            await asyncio.sleep(0.01)
        await a.flush()
        st = a.status().relay
        assert st is not None and not st.connected and st.outbox >= 5
    with contextlib.closing(sqlite3.connect(tmp_path / "a" / "relay.sqlite3")) as db:
        waiting = [row[0] for row in db.execute("SELECT msg_id FROM outbox")]
    assert len(waiting) >= 5
    nats_server.restart()
    async with Node(cfg) as a:  # a restarted process: the outbox comes from disk
        await relay_up(a, b, timeout=30.0)
        want = [f"offline{i}" for i in range(5)]
        await eventually(lambda: tokens(text(b)) == want, 20.0, "the offline edits at b")
        await eventually(lambda: a.status().relay.outbox == 0, 10.0)  # type: ignore[union-attr]
    ids = await stream_msg_ids(nats_server.url)
    assert len(ids) == len(set(ids)), "a part was stored twice"
    assert set(waiting) <= set(ids), "the outbox parts went out under their own ids"


async def test_wrong_credentials_give_a_clear_error_and_the_lan_keeps_working(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    from relaykit import load_script

    with load_script().NatsServer(user="group", password="right") as server:
        a = await make_node("a", server.url, relay_credentials="group:wrong")
        b = await make_node("b", server.url, relay_credentials="group:right", peers=(a.url,))
        await b.wait_for_peers(1)
        await relay_up(b)
        append(a, "over the LAN")
        await eventually(lambda: text(b) == "over the LAN", 10.0, "the LAN edit at b")

        def refused() -> bool:
            st = a.status().relay
            return st is not None and "Authorization Violation" in (st.error or "")

        await eventually(refused, 10.0, "a's relay to say the server refused it")
        st = a.status().relay
        assert st is not None and not st.connected and "credentials" in (st.error or "")


async def test_cluster_loses_its_stream_leader_mid_burst_and_nothing_is_lost(
    make_node: NodeFactory, nats_cluster: Any
) -> None:
    a = await make_node("a", nats_cluster)
    b = await make_node("b", nats_cluster)
    await relay_up(a, b)
    await burst(a, "x", 0, 100)
    nc = await nats.connect(list(nats_cluster.urls))
    try:
        streams = [s async for s in _streams(nc)]
        assert len(streams) == 1 and streams[0].config.num_replicas == 3
        leader = streams[0].cluster.leader
    finally:
        await nc.close()
    nats_cluster.kill(nats_cluster.index_of(leader))
    await burst(a, "x", 100, 300)
    want = [f"x{i}" for i in range(300)]
    await eventually(lambda: tokens(text(b)) == want, 45.0, "b to hold every edit once")
    await eventually(lambda: a.status().relay.outbox == 0, 30.0)  # type: ignore[union-attr]


async def _streams(nc: Any) -> Any:
    for info in await nc.jetstream().streams_info():
        yield info
