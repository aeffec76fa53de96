"""Compaction on DirectorySink: the cover order, pruning, and racing pruners losing nothing."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Text

from unity_crdt.checkpoint._cover import Cover, precedes, state_cover
from unity_crdt.checkpoint.directory import DirectorySink
from unity_crdt.checkpoint.format import Manifest, SinkRecord
from unity_crdt.checkpoint.policy import Checkpointer
from unity_crdt.crypto.keys import GroupKeys, derive_group_keys, device_id_for


@pytest.fixture(scope="module")
def keys() -> GroupKeys:
    return derive_group_keys("compaction test group secret")


def cover(doc: Doc) -> Cover:
    return Cover.parse(*state_cover(doc.get_update()))


def text_doc(content: str = "") -> Doc:
    doc: Doc = Doc()
    doc["t"] = t = Text()
    t += content
    return doc


def merged_text(states: Sequence[bytes]) -> str:
    doc = text_doc()
    for s in states:
        doc.apply_update(s)
    return str(doc["t"])


def test_cover_sees_items_and_deletions() -> None:
    a = text_doc("hello world")
    b: Doc = Doc()
    b.apply_update(a.get_update())
    assert cover(a).within(cover(b)) and cover(b).within(cover(a))
    del b.get("t", type=Text)[0:6]  # a deletion changes no state vector, only the delete set
    assert cover(a).within(cover(b)) and not cover(b).within(cover(a))
    a["t"] += "!"  # now each holds something the other lacks
    assert not cover(a).within(cover(b)) and not cover(b).within(cover(a))
    empty = text_doc()
    assert cover(empty).within(cover(a))


def test_precedes_is_a_strict_order_even_between_equal_states() -> None:
    a = text_doc("same")
    same, more = cover(a), None
    a["t"] += " and more"
    more = cover(a)
    assert precedes(same, "1", more, "0") and not precedes(more, "0", same, "1")
    # Equal states: exactly one direction holds, decided by id; never both, never to itself.
    assert precedes(same, "a", same, "b") and not precedes(same, "b", same, "a")
    assert not precedes(same, "a", same, "a")


class Device:
    """A replica of a few docs and its Checkpointer on a shared sink."""

    def __init__(self, keys: GroupKeys, sink: Any, docs: Sequence[str]) -> None:
        self.docs = {name: text_doc() for name in docs}
        self.cp = Checkpointer(keys, device_id_for(os.urandom(32)), sink, self.state)

    def state(self, name: str) -> bytes:
        return self.docs[name].get_update()

    def edit(self, name: str, rng: random.Random, marker: str) -> None:
        t = self.docs[name]["t"]
        if len(t) > 6 and rng.random() < 0.5:  # a deletion alone moves no state vector
            start = rng.randrange(len(t) - 3)
            del t[start : start + 3]
        else:
            t.insert(rng.randrange(len(t) + 1), marker)
        self.cp.mark_dirty(name)

    def merge_from(self, other: Device, name: str) -> None:
        self.docs[name].apply_update(other.docs[name].get_update())
        self.cp.mark_dirty(name)


class JitterSink(DirectorySink):
    """A real DirectorySink whose calls wait a random moment first, to interleave pruners."""

    def __init__(self, path: Path, rng: random.Random) -> None:
        super().__init__(path)
        self.rng = rng
        self.deleted = 0

    async def _jitter(self) -> None:
        await asyncio.sleep(self.rng.random() * 0.004)

    async def put(self, tenant: str, records: Sequence[SinkRecord]) -> None:
        await self._jitter()
        await super().put(tenant, records)

    async def manifests(self, tenant: str, doc_keys: Sequence[str] | None = None) -> list[Manifest]:
        await self._jitter()
        return await super().manifests(tenant, doc_keys)

    async def confirm(self, tenant: str, manifests: Sequence[Manifest]) -> set[str]:
        await self._jitter()
        return await super().confirm(tenant, manifests)

    async def delete(self, tenant: str, manifests: Sequence[Manifest]) -> None:
        await self._jitter()
        self.deleted += len(manifests)
        await super().delete(tenant, manifests)


async def test_racing_pruners_never_lose_an_item_or_a_deletion(
    tmp_path: Path, keys: GroupKeys
) -> None:
    rng = random.Random(15)
    sink = JitterSink(tmp_path, rng)
    names = ["alpha", "beta", "gamma"]
    devices = [Device(keys, sink, names) for _ in range(5)]
    stored: dict[str, list[bytes]] = {n: [] for n in names}  # every state a checkpoint kept
    for round_ in range(25):
        for i, dev in enumerate(devices):
            for name in names:
                if rng.random() < 0.5:
                    dev.edit(name, rng, f"<{round_}.{i}>")
                if rng.random() < 0.4:  # gossip: some devices hold merged states
                    dev.merge_from(rng.choice(devices), name)
        states = {id(d): {n: d.state(n) for n in names} for d in devices}
        reports = await asyncio.gather(*(d.cp.checkpoint() for d in devices))
        for dev, report in zip(devices, reports, strict=True):
            for name in (*report.written, *report.already_stored):
                stored[name].append(states[id(dev)][name])
        if round_ % 5 == 4:
            reader = Checkpointer(keys, device_id_for(os.urandom(32)), sink, lambda n: b"")
            restored = await reader.restore()
            for name in names:
                assert merged_text(restored[name]) == merged_text(stored[name]), name
    assert sink.deleted > 50  # pruning really ran, concurrently, many times
    manifests = await sink.manifests(keys.tenant)
    # Everyone merges, everyone checkpoints: one object per doc is left.
    for dev in devices:
        for other in devices:
            for name in names:
                dev.merge_from(other, name)
    for dev in devices:
        await dev.cp.checkpoint()
    manifests = await sink.manifests(keys.tenant)
    assert sorted(m.doc_key for m in manifests) == sorted(devices[0].cp.doc_key(n) for n in names)
    reader = Checkpointer(keys, device_id_for(os.urandom(32)), sink, lambda n: b"")
    restored = await reader.restore()
    for name in names:
        assert merged_text(restored[name]) == merged_text(stored[name])
        assert merged_text(restored[name]) == str(devices[0].docs[name]["t"])


async def test_a_node_holding_the_merged_state_leaves_one_object(
    tmp_path: Path, keys: GroupKeys
) -> None:
    sink = DirectorySink(tmp_path)
    writers = [Device(keys, sink, ["doc"]) for _ in range(6)]
    for i, w in enumerate(writers):
        w.docs["doc"]["t"] += f"from {i}. "
        w.cp.mark_dirty("doc")
        await w.cp.checkpoint()
    assert len(await sink.manifests(keys.tenant)) == 6  # concurrent states: all kept
    merger = Device(keys, sink, ["doc"])
    restored = await merger.cp.restore()
    assert len(restored["doc"]) == 6
    for s in restored["doc"]:
        merger.docs["doc"].apply_update(s)
    merger.cp.mark_dirty("doc")
    report = await merger.cp.checkpoint()
    assert report.written == ("doc",) and report.pruned == 6
    (only,) = await sink.manifests(keys.tenant)
    # A fresh restore reads exactly that object; a writer with nothing new writes nothing.
    assert len((await Device(keys, sink, ["doc"]).cp.restore())["doc"]) == 1
    writers[0].cp.mark_dirty("doc")
    writers[0].docs["doc"].apply_update(merger.state("doc"))
    again = await writers[0].cp.checkpoint()
    assert again.written == () and again.already_stored == ("doc",)
    assert [m.object_id for m in await sink.manifests(keys.tenant)] == [only.object_id]


async def test_pull_skips_objects_this_node_already_holds(tmp_path: Path, keys: GroupKeys) -> None:
    sink = DirectorySink(tmp_path)
    a, b = Device(keys, sink, ["doc"]), Device(keys, sink, ["doc"])
    a.docs["doc"]["t"] += "shared"
    a.cp.mark_dirty("doc")
    await a.cp.checkpoint()
    got = await b.cp.restore(changed_only=True, include_own=False)
    assert merged_text(got["doc"]) == "shared"
    b.merge_from(a, "doc")
    await b.cp.checkpoint()  # holds nothing new: writes nothing
    assert await b.cp.restore(changed_only=True) == {}
    b.docs["doc"]["t"] += " more"
    b.cp.mark_dirty("doc")
    await b.cp.checkpoint()  # b's object now dominates a's, which goes
    assert await a.cp.restore(changed_only=True) != {}
    assert await a.cp.restore(changed_only=True) == {}


async def test_objects_without_a_cover_are_never_pruned(tmp_path: Path, keys: GroupKeys) -> None:
    sink = DirectorySink(tmp_path)
    states = {"raw": b"not a yjs update"}
    cp = Checkpointer(keys, device_id_for(os.urandom(32)), sink, states.__getitem__)
    cp.mark_dirty("raw")
    await cp.checkpoint()
    states["raw"] = b"another opaque state"
    cp.mark_dirty("raw")
    report = await cp.checkpoint()
    assert report.written == ("raw",) and report.pruned == 0
    assert sorted(await cp.restore()) == ["raw"]
    assert len((await cp.restore())["raw"]) == 2
