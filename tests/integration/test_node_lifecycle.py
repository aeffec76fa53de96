"""Node start/stop edge cases: a locked cache, a damaged cache, a failed start leaves nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pycrdt
import pytest
from meshkit import NodeFactory, eventually, node_config

from unity_crdt import CacheLockedError, ConfigError, Node, NodeConfig


async def test_second_node_on_a_locked_cache_fails_cleanly(
    tmp_path: Path, make_node: NodeFactory
) -> None:
    a = await make_node("a")
    a.doc("d").get("t", type=pycrdt.Text).insert(0, "still here")
    tasks_before = len(asyncio.all_tasks())
    twin = Node(node_config(tmp_path, "a"))  # same cache dir
    with pytest.raises(CacheLockedError, match="in use by pid"):
        await twin.start()
    await asyncio.sleep(0.05)
    assert len(asyncio.all_tasks()) <= tasks_before
    # The first node is untouched and still syncs.
    b = await make_node("b", peers=(a.url,))
    await eventually(lambda: str(b.doc("d").get("t", type=pycrdt.Text)) == "still here", 3.0)


async def test_damaged_cache_is_moved_aside_and_resynced_from_a_peer(
    tmp_path: Path, make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    a = await make_node("a")
    b_cfg = node_config(tmp_path, "b", peers=(a.url,))
    async with Node(b_cfg) as b:
        b.doc("d").get("t", type=pycrdt.Text).insert(0, "written by b")
        await eventually(lambda: "written by b" in str(a.doc("d").get("t", type=pycrdt.Text)), 3.0)
    db = Path(b_cfg.cache_dir) / "store.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    async with Node(b_cfg) as b2:
        assert any(p.name.startswith("store.sqlite3.corrupt") for p in db.parent.iterdir())
        assert "damaged" in caplog.text
        await eventually(
            lambda: str(b2.doc("d").get("t", type=pycrdt.Text)) == "written by b",
            5.0,
            "re-sync from the peer",
        )


def test_config_rejects_unprintable_names_and_bad_peers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="printable"):
        NodeConfig(name="bad\nname", cache_dir=tmp_path, group_secret="x" * 16)
    with pytest.raises(ConfigError, match="ws://host:port"):
        NodeConfig(name="ok", cache_dir=tmp_path, group_secret="x" * 16, peers=("x:1",))
    # A well-formed URL of a scheme no transport speaks is refused when the node is built.
    odd = NodeConfig(name="ok", cache_dir=tmp_path, group_secret="x" * 16, peers=("http://x:1",))
    with pytest.raises(ConfigError, match=r"no transport for http://"):
        Node(odd)
    assert "secret" not in repr(
        NodeConfig(name="ok", cache_dir=tmp_path, group_secret="secret-value-123")
    )


async def test_close_returns_when_a_task_swallows_its_cancellation(
    make_node: NodeFactory,
) -> None:
    """asyncio.wait_for (3.11) and some nats-py calls can drop a cancellation; close() must
    still return, cancelling again what is left, and keep what was written."""
    node = await make_node("a")
    stopped = asyncio.Event()

    async def stubborn() -> None:
        for _ in range(2):
            # What a dropped cancellation looks like from outside.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)
        stopped.set()

    node.spawn(stubborn(), "stubborn")
    node.doc("d").get("t", type=pycrdt.Text).insert(0, "kept")
    await asyncio.wait_for(node.close(), 10)
    assert stopped.is_set()
    again = Node(node.config)
    await again.start()
    try:
        assert str(again.doc("d").get("t", type=pycrdt.Text)) == "kept"
    finally:
        await again.close()
