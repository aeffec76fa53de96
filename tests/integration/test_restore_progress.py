"""Restore progress and search through the control socket, as `unity-crdt restore/search` use."""

from __future__ import annotations

import secrets
from pathlib import Path

import pycrdt

from unity_crdt import Node, NodeConfig
from unity_crdt.cli._client import progress_line
from unity_crdt.frontends.control import ControlServer
from unity_crdt.frontends.control_client import ControlClient


def config(tmp_path: Path, name: str, secret: str, **kw: object) -> NodeConfig:
    return NodeConfig(
        name=name,
        cache_dir=tmp_path / name,
        group_secret=secret,
        mdns=False,
        checkpoint_url=f"dir://{tmp_path}/store",
        checkpoint_interval=3600,
        pull_interval=None,
        **kw,  # type: ignore[arg-type]
    )


async def test_restore_streams_progress_then_the_docs(tmp_path: Path) -> None:
    secret = secrets.token_hex(16)
    names = [f"doc-{i:02d}" for i in range(40)]
    async with Node(config(tmp_path, "writer", secret, searchable=("doc-07",))) as writer:
        for i, name in enumerate(names):
            writer.doc(name).get("t", type=pycrdt.Text).insert(0, f"text of {i}\n\nsecond {i}")
        await writer.checkpoint()
    async with Node(config(tmp_path, "fresh", secret)) as fresh:
        server = ControlServer(fresh)
        await server.start()
        try:
            seen: list[dict[str, int]] = []
            async with ControlClient(fresh.config.cache_path) as client:
                docs = await client.restore(progress=seen.append)
                assert docs == names
                assert seen and seen[-1]["done"] == seen[-1]["total"] == 40
                assert seen[-1]["listed"] == 40 and seen[-1]["nbytes"] > 0
                assert [s["done"] for s in seen] == sorted(s["done"] for s in seen)
                hits = await client.search("second", mode="keyword")
                assert [(h["doc"], h["passage"]) for h in hits] == [("doc-07", "second 7")]
                assert await client.restore() == names  # the plain (one answer) form
        finally:
            await server.close()
        assert str(fresh.doc("doc-39").get("t", type=pycrdt.Text)) == "text of 39\n\nsecond 39"


def test_progress_line_draws_a_bar_over_the_objects_to_read() -> None:
    p = {"listed": 1000, "total": 800, "done": 200, "nbytes": 3 * 2**20}
    line = progress_line("restoring", p, 2.5)
    assert line.startswith("restoring [#######.....................] 200/800 objects")
    assert line.endswith("200/800 objects, 3.0 MiB, 2.5 s")
    listing = progress_line("restoring", {"listed": 12, "total": 0, "done": 0, "nbytes": 0}, 0.4)
    assert listing == "restoring: listed 12 objects ... 0.4 s"
