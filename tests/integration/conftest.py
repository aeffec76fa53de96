"""Fixtures for tests that run real nodes on 127.0.0.1 with real caches in tmp dirs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from meshkit import NodeFactory, node_config

from unity_crdt import Node


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Start nodes on demand; every node still open is closed at the end of the test."""
    nodes: list[Node] = []

    async def factory(name: str, **kw: Any) -> Node:
        node = Node(node_config(tmp_path, name, **kw))
        await node.start()
        nodes.append(node)
        return node

    yield factory
    for node in reversed(nodes):
        with contextlib.suppress(Exception):
            await node.close()
