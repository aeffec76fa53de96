"""Fixtures of the NATS tier: real nats-server processes (scripts/nats.py) on loopback ports.

A server is cheap (~0.1 s to start), so each test gets its own: no test sees another's
stream. The cluster fixture starts three routed servers (Raft JetStream, ~0.5 s).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from relaykit import NodeFactory, load_script, relay_config

from unity_crdt import Node


@pytest.fixture
def nats_server() -> Iterator[Any]:
    """One nats-server with JetStream on a free loopback port, stopped after the test."""
    with load_script().NatsServer() as server:
        yield server


@pytest.fixture
def nats_cluster() -> Iterator[Any]:
    """Three routed nats-servers (one JetStream cluster), stopped after the test."""
    with load_script().NatsCluster() as cluster:
        yield cluster


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Start nodes on demand (loopback, no mDNS, no peers unless given); all closed after."""
    nodes: list[Node] = []

    async def factory(name: str, relay: Any, **kw: Any) -> Node:
        node = Node(relay_config(tmp_path, name, relay, **kw))
        await node.start()
        nodes.append(node)
        return node

    yield factory
    for node in reversed(nodes):
        with contextlib.suppress(Exception):
            await node.close()
