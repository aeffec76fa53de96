"""Hybrid search by meaning over 2,000 passages of 200 docs held by three linked nodes."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pycrdt
import pytest

from unity_crdt import Node, NodeConfig
from unity_crdt.testing import ConceptEmbedder

pytestmark = pytest.mark.weaviate

DOCS = 200
PASSAGES = 10
FILLER = [
    "The weekly meeting notes are kept here.",
    "Remember to update the shared calendar.",
    "Coffee is in the kitchen on the second floor.",
    "The printer needs paper again.",
    "Lunch orders go out at noon.",
    "The office closes early on Friday.",
    "Backups run every night.",
    "Parking permits are renewed in March.",
]


def topic(k: int) -> list[str]:
    """Three words that mean the same thing for the test embedder (a paraphrase set)."""
    return [f"topic{k}alpha", f"topic{k}beta", f"topic{k}gamma"]


EMBEDDER = ConceptEmbedder({f"t{k}": topic(k) for k in range(DOCS)}, extra=16, noise=0.05)


def body(k: int, variant: str = "") -> str:
    paras = [f"Project {topic(k)[0]} is summarised in this passage{variant}."]
    paras += [f"{FILLER[(k + i) % len(FILLER)]} (part {i} of doc {k})" for i in range(1, PASSAGES)]
    return "\n\n".join(paras)


@pytest.fixture
async def trio(tmp_path: Path, weaviate_server: Any) -> AsyncIterator[list[Node]]:
    secret = secrets.token_hex(16)
    names = [f"doc-{k:03d}" for k in range(DOCS)]
    nodes: list[Node] = []
    for i in range(3):
        cfg = NodeConfig(
            name=f"n{i}",
            cache_dir=tmp_path / f"n{i}",
            group_secret=secret,
            mdns=False,
            peers=tuple(n.url for n in nodes),
            weaviate_url=f"{weaviate_server.url}?grpc={weaviate_server.grpc_port}",
            checkpoint_interval=3600,
            pull_interval=None,
            searchable=tuple(names),
            embedder=EMBEDDER,
        )
        node = Node(cfg)
        await node.start()
        nodes.append(node)
    try:
        yield nodes
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                await node.close()


def text_of(node: Node, name: str) -> pycrdt.Text:
    return node.doc(name).get("t", type=pycrdt.Text)


async def until(check: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.1)


async def test_paraphrases_find_the_right_doc_and_edits_replace_passages(
    trio: list[Node],
) -> None:
    a, b, c = trio
    await c.wait_for_peers(2, timeout=20)
    for k in range(DOCS):  # each node writes a third of the docs; the mesh spreads them
        text_of(trio[k % 3], f"doc-{k:03d}").insert(0, body(k))
    await until(lambda: all(len(n.docs) == DOCS for n in trio), 60)
    await until(
        lambda: all(str(text_of(n, f"doc-{k:03d}")) == body(k) for n in trio for k in range(DOCS)),
        60,
    )
    await asyncio.gather(*(n.checkpoint() for n in trio))
    # Paraphrased queries (no word in common with the passage) rank the right doc first.
    for k in (0, 57, 123, 199):
        for node in trio:
            hits = await node.search(f"what do we know about {topic(k)[1]}", limit=5)
            assert hits and hits[0].doc == f"doc-{k:03d}", (k, hits[:2])
            assert topic(k)[0] in hits[0].passage
        keyword = await a.search(topic(k)[1], mode="keyword")
        assert keyword == []  # the words differ: only meaning finds it
    vector = await b.search(topic(42)[2], mode="vector", limit=3)
    assert vector[0].doc == "doc-042"
    assert vector[0].score == pytest.approx(
        EMBEDDER.similarity(topic(42)[2], vector[0].passage), abs=1e-4
    )
    # An edit on one node: searchable in its new form after the next checkpoint, not the old.
    t = text_of(b, "doc-077")
    old = body(77).split("\n\n")[0]
    start = str(t).index(old)
    del t[start : start + len(old)]
    t.insert(start, f"Project {topic(7)[0]} replaced the old summary")
    await b.checkpoint()
    hits = await c.search(topic(7)[2], limit=DOCS)
    assert "replaced the old summary" in " ".join(h.passage for h in hits if h.doc == "doc-077")
    stale = await a.search(topic(77)[1], limit=DOCS)
    assert all(h.doc != "doc-077" for h in stale), stale[:3]
    assert await a.search("summarised in this passage", mode="keyword", limit=DOCS) and all(
        h.doc != "doc-077"
        for h in await a.search("summarised in this passage", mode="keyword", limit=DOCS)
    )
