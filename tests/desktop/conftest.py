"""Fixtures for the desktop tier: a private Xvfb display, nodes, and the Tk notes demo in it."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from desk import TkNotes, xvfb

from unity_crdt.config import NodeConfig
from unity_crdt.node import Node

SECRET = "desktop tier group secret: correct horse battery staple"


@pytest.fixture(scope="session")
def display() -> Iterator[str]:
    """An Xvfb display shared by the tier (each test's windows are closed by the test)."""
    for tool in ("Xvfb", "xdotool"):
        assert shutil.which(tool), f"{tool} is required (scripts/system-deps.sh)"
    with xvfb() as name:
        yield name


MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[MakeNode]:
    """`await make_node(name, **config)`: a started in-process node on 127.0.0.1."""
    nodes: list[Node] = []

    async def make(name: str, **kw: Any) -> Node:
        kw.setdefault("mdns", False)
        node = Node(NodeConfig(name=name, cache_dir=tmp_path / name, group_secret=SECRET, **kw))
        await node.start()
        nodes.append(node)
        return node

    yield make
    for node in reversed(nodes):
        await node.close()


StartApp = Callable[..., Awaitable[TkNotes]]


@pytest.fixture
async def start_app(display: str, tmp_path: Path) -> AsyncIterator[StartApp]:
    """`await start_app(name, *args)`: demos/tk_notes.py as `name` on the display."""
    apps: list[TkNotes] = []

    async def start(name: str, *args: str) -> TkNotes:
        cache = str(tmp_path / f"app-{name}")
        app = await TkNotes.start(
            display, "--name", name, "--secret", SECRET, "--no-mdns", "--cache-dir", cache, *args
        )
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.kill()
