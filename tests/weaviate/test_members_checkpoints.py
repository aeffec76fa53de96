"""A revocation on Weaviate: checkpoints after it go to a new tenant under new keys; the revoked
device's keys open none of them, and what it writes to the old tenant restores nowhere."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pycrdt
import pytest
from test_sink import all_objects

from unity_crdt import Node, NodeConfig
from unity_crdt.checkpoint.policy import Checkpointer
from unity_crdt.checkpoint.weaviate import WeaviateSink
from unity_crdt.crypto.keys import derive_group_keys
from unity_crdt.errors import SecurityError

pytestmark = [pytest.mark.weaviate, pytest.mark.slow]

NodeMaker = Callable[..., Awaitable[Node]]
T = 20.0


@pytest.fixture
async def group(tmp_path: Path, weaviate_server: Any) -> AsyncIterator[tuple[str, NodeMaker]]:
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
            checkpoint_interval=0.5,
            pull_interval=None,
            ping_interval=1.0,
            idle_timeout=5.0,
            reconnect_max=1.0,
        )
        values.update(kw)
        node = Node(NodeConfig(**values))
        await node.start()
        nodes.append(node)
        return node

    yield secret, factory
    for node in reversed(nodes):
        with contextlib.suppress(Exception):
            await node.close()


def text(node: Node) -> str:
    return str(node.doc("notes").get("t", type=pycrdt.Text))


def write(node: Node, value: str) -> None:
    t = node.doc("notes").get("t", type=pycrdt.Text)
    t.insert(len(str(t)), value)


async def until(check: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(T):
            while not check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_after_a_revocation_weaviate_holds_nothing_the_old_keys_open(
    group: tuple[str, NodeMaker], weaviate_server: Any
) -> None:
    secret, make = group
    a = await make("alice")
    b = await make("bob", peers=(a.url,))
    c = await make("carol", peers=(a.url, b.url))
    await until(lambda: all(len(n.members) == 3 for n in (a, b, c)), "rosters")
    write(a, "before-words ")
    await until(lambda: "before-words" in text(c), "sync")
    for n in (a, b, c):
        await n.checkpoint()
    c_id = c.device_id
    await c.close()
    await a.revoke(c_id)
    await until(lambda: b.status().membership.epoch == 1, "bob in epoch 1")  # type: ignore[union-attr]
    write(a, "zanzibar-after ")
    await until(lambda: "zanzibar-after" in text(b), "sync after")
    await a.checkpoint()
    await b.checkpoint()

    old_keys = derive_group_keys(secret)
    assert a._keys is not None and a._keys.tenant != old_keys.tenant  # a new tenant
    sink = WeaviateSink(weaviate_server.url, weaviate_server.grpc_port)
    try:
        thief = Checkpointer(old_keys, c_id, sink, lambda name: b"")
        states = await thief.restore()
        doc = pycrdt.Doc()
        for blob in states["notes"]:
            doc.apply_update(blob)
        assert "before-words" in str(doc.get("t", type=pycrdt.Text))
        assert "zanzibar-after" not in str(doc.get("t", type=pycrdt.Text))
        # The new tenant's objects, even named, open with none of the old keys.
        new = await sink.manifests(a._keys.tenant)
        assert new
        for m in new:
            with pytest.raises(SecurityError):
                thief._sealer.header(m)
        objects = await all_objects(weaviate_server, a._keys.tenant)
        dump = []
        for _, _, props in objects:
            for key, value in props.items():
                dump.append(str(value))
                if key == "blob" and value:
                    dump.append(base64.b64decode(str(value)).decode("latin-1"))
        for word in ("zanzibar", "alice", "bob", "carol", a.device_id, c_id):
            assert word not in "\n".join(dump)
    finally:
        await sink.close()

    # Carol comes back as a thief (its membership state dropped, no peers: nobody tells it):
    # what it writes to the old tenant is merged by no member's restore.
    (a.config.cache_path.parent / "carol" / "membership.json").unlink()
    c = await make("carol")
    write(c, "carol-later ")
    await c.checkpoint()
    assert "notes" in await b.restore()
    assert "carol-later" not in text(b) and "zanzibar-after" not in text(c)
