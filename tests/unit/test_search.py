"""Passages, embeddings and search modes through a Checkpointer on DirectorySink."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from pycrdt import Doc, Text

from unity_crdt.checkpoint._vectors import VectorCache, embed
from unity_crdt.checkpoint.directory import DirectorySink
from unity_crdt.checkpoint.format import split_passages
from unity_crdt.checkpoint.policy import Checkpointer
from unity_crdt.crypto.keys import GroupKeys, derive_group_keys, device_id_for
from unity_crdt.errors import CheckpointError
from unity_crdt.testing import ConceptEmbedder

CONCEPTS = {
    "car": ["car", "cars", "automobile", "vehicle", "engine", "driving", "garage"],
    "food": ["pancakes", "flour", "eggs", "breakfast", "cooking", "recipe", "meal"],
    "travel": ["train", "lisbon", "journey", "trip", "station", "ticket"],
    "money": ["invoice", "payment", "budget", "cost", "bank"],
}


@pytest.fixture(scope="module")
def keys() -> GroupKeys:
    return derive_group_keys("search test group secret")


class Node:
    """Text docs, a searchable subset, and a Checkpointer with an embedder."""

    def __init__(self, keys: GroupKeys, sink: DirectorySink, embedder: object, **kw: object):
        self.docs: dict[str, Doc] = {}
        self.searchable: set[str] = set()
        self.cp = Checkpointer(
            keys,
            device_id_for(os.urandom(32)),
            sink,
            lambda n: self.docs[n].get_update(),
            lambda n: str(self.docs[n]["t"]) if n in self.searchable else None,
            embedder=embedder,  # type: ignore[arg-type]
            **kw,  # type: ignore[arg-type]
        )

    def write(self, name: str, text: str, searchable: bool = True) -> None:
        doc = self.docs.get(name)
        if doc is None:
            doc = self.docs[name] = Doc()
            doc["t"] = Text()
        t = doc["t"]
        del t[0 : len(t)]
        t += text
        if searchable:
            self.searchable.add(name)
        self.cp.mark_dirty(name)


def test_passages_are_blank_line_paragraphs() -> None:
    text = "first para\nstill first\n\n\n  second  \n \t\nthird\n\nfirst para\nstill first"
    assert split_passages(text) == ["first para\nstill first", "second", "third"]
    assert split_passages("") == [] and split_passages("\n\n \n") == []


async def test_vector_ranking_follows_the_embedder(tmp_path: Path, keys: GroupKeys) -> None:
    emb = ConceptEmbedder(CONCEPTS)
    node = Node(keys, DirectorySink(tmp_path), emb)
    node.write("garage", "The automobile needs a new engine.\n\nThe garage closes at six.")
    node.write("kitchen", "Pancakes need flour and eggs.\n\nBreakfast is the best meal.")
    node.write("trip", "The train to Lisbon leaves the station at noon.")
    node.write("accounts", "Pay the invoice before the budget review.", searchable=False)
    await node.cp.checkpoint()
    query = "fixing my car before driving"
    hits = await node.cp.search(query, limit=5, mode="vector")
    passages = [
        p
        for name in ("garage", "kitchen", "trip")
        for p in split_passages(str(node.docs[name]["t"]))
    ]
    sims = sorted((emb.similarity(query, p) for p in passages), reverse=True)
    # The hits are the top passages by the embedder's similarity, in its order.
    assert [round(h.score, 5) for h in hits] == [round(x, 5) for x in sims[: len(hits)]]
    assert [round(emb.similarity(query, h.passage), 5) for h in hits] == [
        round(h.score, 5) for h in hits
    ]
    assert hits[0].doc == "garage" and sims[0] > sims[2]
    assert all(h.doc != "accounts" for h in hits)  # never searchable, never indexed
    # No embedder needed for keywords; hybrid is the default with an embedder.
    assert [h.doc for h in await node.cp.search("Lisbon", mode="keyword")] == ["trip"]
    mixed = await node.cp.search("a cooking recipe for breakfast")
    assert mixed[0].doc == "kitchen"
    raw = b"".join(p.read_bytes() for p in (tmp_path / keys.tenant).rglob("*") if p.is_file())
    assert b"invoice" not in raw and b"Pancakes need flour" in raw


async def test_only_changed_passages_are_embedded_and_old_ones_go(
    tmp_path: Path, keys: GroupKeys
) -> None:
    emb = ConceptEmbedder(CONCEPTS)
    node = Node(keys, DirectorySink(tmp_path), emb, vector_file=tmp_path / "vectors.bin")
    paras = [f"Paragraph {i} about the train journey." for i in range(10)]
    node.write("notes", "\n\n".join(paras))
    await node.cp.checkpoint()
    assert emb.texts == 11  # the probe and ten passages
    paras[3] = "Paragraph 3 is now about pancakes."
    node.write("notes", "\n\n".join(paras))
    await node.cp.checkpoint()
    assert emb.texts == 12  # only the edited passage
    hits = await node.cp.search("pancakes", mode="keyword")
    assert [h.passage for h in hits] == ["Paragraph 3 is now about pancakes."]
    assert await node.cp.search("Paragraph 3 about", mode="keyword", limit=20) and all(
        h.passage != "Paragraph 3 about the train journey."
        for h in await node.cp.search("Paragraph 3 about", mode="keyword", limit=20)
    )
    # A restarted node (new cache object, same file) embeds nothing it embedded before.
    again = Node(keys, DirectorySink(tmp_path), emb, vector_file=tmp_path / "vectors.bin")
    paras.append("A new paragraph about the bank.")
    again.write("notes", "\n\n".join(paras))
    await again.cp.checkpoint()
    assert emb.texts == 12 + 1 + 1  # the probe again, and the one new passage


async def test_vector_cache_survives_a_torn_tail_and_forgets_another_model(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v.bin"
    emb = ConceptEmbedder(CONCEPTS)
    cache = VectorCache(path)
    first = await cache.vectors(emb, ["cars", "trains"])
    path.write_bytes(path.read_bytes() + b"\x01\x02\x03")  # a crash mid-append
    again = VectorCache(path)
    assert await again.vectors(emb, ["cars", "trains"]) == first
    assert again.embedded == 0 and path.stat().st_size % 4 == 0
    other = ConceptEmbedder({"x": ["cars"]})  # another model answers the probe differently
    swapped = VectorCache(path)
    await swapped.vectors(other, ["cars"])
    assert swapped.embedded == 1 and len(swapped) == 1


def boom(texts: list[str]) -> list[list[float]]:
    raise RuntimeError("boom")


async def test_embedders_may_be_sync_or_async_and_are_checked() -> None:
    emb = ConceptEmbedder(CONCEPTS)

    async def async_embedder(texts: list[str]) -> list[list[float]]:
        await asyncio.sleep(0)
        return emb(texts)

    assert await embed(async_embedder, ["car"]) == await embed(emb, ["car"])
    with pytest.raises(CheckpointError, match="2 vectors for 2 texts"):
        await embed(lambda texts: [[1.0]], ["a", "b"])
    with pytest.raises(CheckpointError, match="different sizes"):
        await embed(lambda texts: [[1.0], [1.0, 2.0]], ["a", "b"])
    with pytest.raises(CheckpointError, match="NaN"):
        await embed(lambda texts: [[float("nan")]], ["a"])
    with pytest.raises(CheckpointError, match="the embedder failed: boom"):
        await embed(boom, ["a"])


async def test_search_modes_are_checked(tmp_path: Path, keys: GroupKeys) -> None:
    node = Node(keys, DirectorySink(tmp_path), None)
    node.write("n", "plain words")
    await node.cp.checkpoint()
    assert [h.doc for h in await node.cp.search("words")] == ["n"]  # keyword without embedder
    with pytest.raises(CheckpointError, match="needs an embedder"):
        await node.cp.search("words", mode="vector")
    with pytest.raises(ValueError, match="mode"):
        await node.cp.search("words", mode="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        await node.cp.search("words", alpha=2.0)


async def test_a_failing_embedder_keeps_the_doc_dirty(tmp_path: Path, keys: GroupKeys) -> None:
    calls = 0

    def flaky(texts: list[str]) -> list[list[float]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("model not loaded yet")
        return [[1.0, float(len(t))] for t in texts]

    node = Node(keys, DirectorySink(tmp_path), flaky)
    node.write("n", "some words")
    with pytest.raises(CheckpointError, match="model not loaded yet"):
        await node.cp.checkpoint()
    assert node.cp.dirty == {"n"}
    report = await node.cp.checkpoint()  # the state is stored already; the index catches up
    assert report.already_stored == ("n",) and node.cp.dirty == frozenset()
    assert [h.doc for h in await node.cp.search("some", mode="keyword")] == ["n"]
