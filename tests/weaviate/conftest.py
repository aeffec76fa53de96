"""One real weaviate-server for the whole session (scripts/weaviate.py), on loopback ports.

The server binary is built by `python scripts/weaviate.py install` (`make setup`); if it is
missing the fixture installs it rather than skipping. Each test uses fresh group keys, so
each test gets its own tenant and tests never see each other's objects.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import pytest
import serverkit

from unity_crdt.checkpoint.weaviate import WeaviateSink
from unity_crdt.crypto.keys import GroupKeys, derive_group_keys


def load_script() -> ModuleType:
    """scripts/weaviate.py (serverkit.load_script)."""
    return serverkit.load_script("weaviate")


@pytest.fixture(scope="session")
def weaviate_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A running WeaviateServer (stopped at the end of the session)."""
    script = load_script()
    if not script.binary_path().exists():
        script.install()
    server = script.WeaviateServer(tmp_path_factory.mktemp("weaviate-data"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def weaviate_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A running 3-server WeaviateCluster (stopped at the end of the session)."""
    script = load_script()
    if not script.binary_path().exists():
        script.install()
    # Async replication compares replicas every 30 s by default; Weaviate's own cluster tests
    # run it every 5 s, and so do these (a restarted server then catches up in seconds).
    fast = {
        "ASYNC_REPLICATION_FREQUENCY": "5s",
        "ASYNC_REPLICATION_FREQUENCY_WHILE_PROPAGATING": "1s",
        "ASYNC_REPLICATION_PROPAGATION_DELAY": "1s",
    }
    cluster = script.WeaviateCluster(3, tmp_path_factory.mktemp("weaviate-cluster"), env=fast)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def group_keys() -> GroupKeys:
    """Fresh keys, hence a fresh tenant, per test."""
    return derive_group_keys(secrets.token_hex(16))


@pytest.fixture
async def sink(weaviate_server: Any) -> AsyncIterator[WeaviateSink]:
    """A WeaviateSink on the session server, closed after the test."""
    s = WeaviateSink(weaviate_server.url, weaviate_server.grpc_port)
    try:
        yield s
    finally:
        await s.close()
