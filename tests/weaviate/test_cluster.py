"""A 3-server Weaviate cluster: replication factor 3, QUORUM, one server killed mid-burst.

Three nodes checkpoint a burst of edits, each talking to a different server first; one server
is SIGKILLed in the middle. Every checkpoint either succeeds or fails and is retried until it
succeeds; a fresh node restores exactly; the killed server, restarted, catches up (its own
local index lists every object again). About 40-70 s on the 2-core box.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pycrdt
import pytest
import weaviate
from weaviate.classes.config import ConsistencyLevel

from unity_crdt import Node, NodeConfig
from unity_crdt.checkpoint.weaviate import MANIFESTS
from unity_crdt.errors import CheckpointError

pytestmark = [pytest.mark.weaviate, pytest.mark.slow]

DOCS = 12
ROUNDS = 8


def rotated(urls: list[str], i: int) -> tuple[str, ...]:
    return tuple(urls[i:] + urls[:i])


@contextlib.asynccontextmanager
async def local_client(server: Any) -> AsyncIterator[weaviate.WeaviateAsyncClient]:
    client = weaviate.use_async_with_local(
        host="127.0.0.1", port=server.http_port, grpc_port=server.grpc_port, skip_init_checks=True
    )
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def local_ids(server: Any, tenant: str) -> set[str]:
    """Manifest ids in the given server's own index (consistency ONE, served locally)."""
    async with local_client(server) as client:
        col = client.collections.get(MANIFESTS).with_tenant(tenant)
        col = col.with_consistency_level(ConsistencyLevel.ONE)
        return {str(o.uuid) async for o in col.iterator(return_properties=[])}


async def test_one_server_down_mid_burst_loses_nothing(
    weaviate_cluster: Any, tmp_path: Path
) -> None:
    cluster = weaviate_cluster
    started = time.monotonic()
    secret = secrets.token_hex(16)
    nodes: list[Node] = []
    for i in range(3):
        cfg = NodeConfig(
            name=f"n{i}",
            cache_dir=tmp_path / f"n{i}",
            group_secret=secret,
            mdns=False,
            weaviate_url=rotated(cluster.urls, i),
            checkpoint_interval=3600,  # the test drives checkpoints itself
            pull_interval=None,
        )
        node = Node(cfg)
        await node.start()
        nodes.append(node)
    retries = 0
    halfway = asyncio.Barrier(3)
    try:

        async def burst(i: int, node: Node) -> None:
            nonlocal retries
            for r in range(ROUNDS):
                for d in range(DOCS):
                    doc = node.doc(f"doc-{d}")
                    doc.get("t", type=pycrdt.Text).insert(0, f"<{i}.{r}.{d}>")
                    doc.get("m", type=pycrdt.Map)[f"n{i}"] = r
                while True:  # a checkpoint either succeeds, or fails and is retried
                    try:
                        await node.checkpoint()
                        break
                    except CheckpointError:
                        retries += 1
                        await asyncio.sleep(0.3)
                if r == ROUNDS // 2:  # all three mid-burst: server 1 dies under them
                    await halfway.wait()
                    if i == 0:
                        await asyncio.to_thread(cluster.servers[1].kill)
                    await halfway.wait()

        await asyncio.wait_for(
            asyncio.gather(*(burst(i, n) for i, n in enumerate(nodes))), timeout=180
        )
        assert cluster.servers[1].proc.poll() is not None  # it really died mid-burst
        assert all(not n._require_checkpoints().cp.dirty for n in nodes)
        # Node 1 talked to server 1 first: it moved on to another server.
        assert nodes[1]._require_checkpoints().cp.sink.failovers >= 1  # type: ignore[attr-defined]
        expected = {
            f"doc-{d}": sorted(f"<{i}.{r}.{d}>" for i in range(3) for r in range(ROUNDS))
            for d in range(DOCS)
        }
        tenant = nodes[0]._require_checkpoints().cp.tenant
    finally:
        for n in nodes:
            await n.close()
    burst_s = time.monotonic() - started

    # A fresh node, told only the two live servers... and the dead one first.
    fresh = Node(
        NodeConfig(
            name="fresh",
            cache_dir=tmp_path / "fresh",
            group_secret=secret,
            mdns=False,
            weaviate_url=rotated(cluster.urls, 1),
            pull_interval=None,
        )
    )
    await fresh.start()
    try:
        assert sorted(await fresh.restore()) == sorted(expected)
        for name, markers in expected.items():
            text = str(fresh.doc(name).get("t", type=pycrdt.Text))
            assert all(text.count(m) == 1 for m in markers)
            assert len(text) == sum(map(len, markers))
            m = fresh.doc(name).get("m", type=pycrdt.Map)
            assert {k: int(v) for k, v in m.items()} == {f"n{i}": ROUNDS - 1 for i in range(3)}
    finally:
        await fresh.close()

    # The killed server comes back and catches up: its own index lists every object.
    live = await local_ids(cluster.servers[0], tenant)
    assert live
    await asyncio.to_thread(cluster.servers[1].restart)
    back = time.monotonic()
    while (behind := await local_ids(cluster.servers[1], tenant)) != live:
        assert time.monotonic() < back + 90, f"{len(live - behind)} objects still missing"
        await asyncio.sleep(1)
    print(
        f"burst {burst_s:.1f} s, {retries} retried checkpoint(s); "
        f"caught up {time.monotonic() - back:.1f} s after restart"
    )
