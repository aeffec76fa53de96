"""Checkpointer + WeaviateSink against a real weaviate-server on loopback."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import weaviate
from pycrdt import Doc, Text
from weaviate.classes.query import Filter

from unity_crdt.checkpoint.format import CheckpointSink, Manifest
from unity_crdt.checkpoint.policy import Checkpointer
from unity_crdt.checkpoint.sinks import open_sink
from unity_crdt.checkpoint.weaviate import CHUNKS, MANIFESTS, PASSAGES, WeaviateSink
from unity_crdt.crypto.keys import GroupKeys, derive_group_keys, device_id_for
from unity_crdt.errors import CheckpointError
from unity_crdt.testing import check_sink

pytestmark = pytest.mark.weaviate


def new_device() -> str:
    return device_id_for(os.urandom(32))


def text_doc(content: str) -> Doc:
    doc: Doc = Doc()
    doc["body"] = body = Text()
    body += content
    return doc


def merged(states: list[bytes]) -> str:
    doc: Doc = Doc()
    doc["body"] = body = Text()
    for state in states:
        doc.apply_update(state)
    return str(body)


class Device:
    """One node's view: named pycrdt docs and its Checkpointer on a given sink."""

    def __init__(
        self,
        keys: GroupKeys,
        sink: CheckpointSink,
        searchable: frozenset[str] = frozenset(),
        **kwargs: Any,
    ) -> None:
        self.docs: dict[str, Doc] = {}
        self.cp = Checkpointer(
            keys,
            new_device(),
            sink,
            lambda name: self.docs[name].get_update(),
            lambda name: str(self.docs[name]["body"]) if name in searchable else None,
            **kwargs,
        )

    def edit(self, name: str, content: str) -> None:
        doc = self.docs.get(name)
        if doc is None:
            doc = self.docs[name] = text_doc("")
        doc["body"] += content  # type: ignore[operator]
        self.cp.mark_dirty(name)


@asynccontextmanager
async def raw_client(server: Any) -> AsyncIterator[weaviate.WeaviateAsyncClient]:
    client = weaviate.use_async_with_local(
        host="127.0.0.1", port=server.http_port, grpc_port=server.grpc_port, skip_init_checks=True
    )
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def all_objects(server: Any, tenant: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(collection, uuid, every property incl. blobs) of every object of `tenant`."""
    props = {
        MANIFESTS: ["doc_key", "device", "gen", "parts", "nbytes", "blob"],
        CHUNKS: ["owner", "gen", "idx", "blob"],
        PASSAGES: ["doc_key", "pid", "text"],
    }
    out = []
    async with raw_client(server) as client:
        for name, names in props.items():
            col = client.collections.get(name).with_tenant(tenant)
            async for obj in col.iterator(return_properties=names):
                out.append((name, str(obj.uuid), dict(obj.properties)))
    return out


async def test_roundtrip_several_docs_and_devices(
    weaviate_server: Any, sink: WeaviateSink, group_keys: GroupKeys
) -> None:
    a, b = Device(group_keys, sink), Device(group_keys, sink)
    for i in range(5):
        a.edit(f"doc-{i}", f"from a {i}. ")
        b.edit(f"doc-{i}", f"from b {i}. ")
    b.edit("only-b", "b alone")
    report = await a.cp.checkpoint()
    assert sorted(report.written) == [f"doc-{i}" for i in range(5)]
    await b.cp.checkpoint()
    fresh = Device(group_keys, WeaviateSink(weaviate_server.url, weaviate_server.grpc_port))
    try:
        states = await fresh.cp.restore()
        assert sorted(states) == sorted([*(f"doc-{i}" for i in range(5)), "only-b"])
        for i in range(5):
            assert len(states[f"doc-{i}"]) == 2
            text = merged(states[f"doc-{i}"])
            assert f"from a {i}. " in text and f"from b {i}. " in text
        assert merged(states["only-b"]) == "b alone"
        subset = await fresh.cp.restore(["doc-3", "missing"])
        assert list(subset) == ["doc-3"]
    finally:
        await fresh.cp.close()


async def test_three_devices_concurrent_edits_merge(
    weaviate_server: Any, group_keys: GroupKeys
) -> None:
    sinks = [WeaviateSink(weaviate_server.url, weaviate_server.grpc_port) for _ in range(4)]
    devices = [Device(group_keys, s) for s in sinks[:3]]
    base = text_doc("shared start. ")
    for dev in devices:
        dev.docs["notes"] = doc = Doc()
        doc["body"] = Text()
        doc.apply_update(base.get_update())
    for n, dev in enumerate(devices):
        dev.edit("notes", f"edit by device {n}. ")
    await asyncio.gather(*(dev.cp.checkpoint() for dev in devices))
    reader = Device(group_keys, sinks[3])
    states = (await reader.cp.restore())["notes"]
    assert len(states) == 3
    text = merged(states)
    assert text.startswith("shared start. ")
    for n in range(3):
        assert text.count(f"edit by device {n}. ") == 1
    # The same result as merging the three docs directly.
    direct = Doc()
    direct["body"] = Text()
    for dev in devices:
        direct.apply_update(dev.docs["notes"].get_update())
    assert text == str(direct["body"])
    for s in sinks:
        await s.close()


async def test_store_holds_no_names_and_no_text_of_private_docs(
    weaviate_server: Any, sink: WeaviateSink, group_keys: GroupKeys
) -> None:
    dev = Device(group_keys, sink, searchable=frozenset({"public-recipes"}))
    dev.edit("secret-diary-name", "zanzibar confidential payload\n\nsecond zanzibar paragraph")
    dev.edit("public-recipes", "pancakes need flour and eggs\n\nserve them warm")
    await dev.cp.checkpoint()
    dev.edit("secret-diary-name", " more zanzibar")  # a second write prunes the first
    dev.edit("public-recipes", " with syrup")
    await dev.cp.checkpoint()
    objects = await all_objects(weaviate_server, group_keys.tenant)
    assert {c for c, _, _ in objects} == {MANIFESTS, CHUNKS, PASSAGES}
    assert sum(1 for c, _, _ in objects if c == MANIFESTS) == 2
    forbidden = [
        "secret-diary-name",
        "public-recipes",
        "zanzibar",
        "confidential",
        dev.cp.device_id,
    ]
    texts = []
    for collection, _, props in objects:
        for key, value in props.items():
            if value is None:
                continue
            raw = str(value)
            texts.append(raw)
            if key == "blob":
                texts.append(base64.b64decode(raw).decode("latin-1"))
            if key == "text":
                assert collection == PASSAGES
    blob = "\n".join(texts)
    for word in forbidden:
        assert word not in blob
    # The searchable doc's passages are there, as documented, in their latest form only.
    passages = sorted(str(p["text"]) for c, _, p in objects if c == PASSAGES)
    assert passages == ["pancakes need flour and eggs", "serve them warm with syrup"]


async def test_search_finds_searchable_doc_by_word(
    weaviate_server: Any, sink: WeaviateSink, group_keys: GroupKeys
) -> None:
    dev = Device(group_keys, sink, searchable=frozenset({"recipes", "travel"}))
    dev.edit("recipes", "pancakes need flour, eggs and milk")
    dev.edit("travel", "the train to Lisbon leaves at noon")
    dev.edit("private", "pancakes are my secret")
    await dev.cp.checkpoint()
    hits = await dev.cp.search("pancakes", 5)
    assert [h.doc for h in hits] == ["recipes"]
    assert "pancakes" in hits[0].snippet and hits[0].score > 0
    # A second device that never saw the names learns them from the sealed headers.
    other = Device(group_keys, WeaviateSink(weaviate_server.url, weaviate_server.grpc_port))
    assert [h.doc for h in await other.cp.search("Lisbon", 5)] == ["travel"]
    assert await other.cp.search("secret", 5) == []
    await other.cp.close()


async def test_two_groups_never_see_each_other(weaviate_server: Any, sink: WeaviateSink) -> None:
    keys_a, keys_b = derive_group_keys("group a secret"), derive_group_keys("group b secret")
    assert keys_a.tenant != keys_b.tenant
    a = Device(keys_a, sink, searchable=frozenset({"notes"}))
    b = Device(keys_b, sink, searchable=frozenset({"notes"}))
    a.edit("notes", "alpha words only")
    b.edit("notes", "beta words only")
    await a.cp.checkpoint()
    await b.cp.checkpoint()
    assert merged((await a.cp.restore())["notes"]) == "alpha words only"
    assert merged((await b.cp.restore())["notes"]) == "beta words only"
    assert await b.cp.search("alpha", 5) == []
    assert [h.doc for h in await a.cp.search("alpha", 5)] == ["notes"]
    a_ids = {i for _, i, _ in await all_objects(weaviate_server, keys_a.tenant)}
    b_ids = {i for _, i, _ in await all_objects(weaviate_server, keys_b.tenant)}
    assert a_ids and b_ids and not a_ids & b_ids


async def test_flipped_byte_is_refused_and_others_restore(
    weaviate_server: Any,
    sink: WeaviateSink,
    group_keys: GroupKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = Device(group_keys, sink), Device(group_keys, sink)
    a.edit("notes", "from a")
    b.edit("notes", "from b")
    await a.cp.checkpoint()
    await b.cp.checkpoint()
    (victim,) = [
        m.object_id
        for m in await sink.manifests(group_keys.tenant)
        if m.device == a.cp.device_tag(a.cp.device_id)
    ]
    async with raw_client(weaviate_server) as client:
        chunks = client.collections.get(CHUNKS).with_tenant(group_keys.tenant)
        res = await chunks.query.fetch_objects(
            filters=Filter.by_property("owner").equal(victim),
            limit=10,
            return_properties=["owner", "gen", "idx", "blob"],
        )
        assert len(res.objects) == 1
        obj = res.objects[0]
        raw = bytearray(base64.b64decode(str(obj.properties["blob"])))
        raw[len(raw) // 2] ^= 0x01
        props = dict(obj.properties, blob=base64.b64encode(bytes(raw)).decode())
        await chunks.data.replace(uuid=obj.uuid, properties=props)
    with caplog.at_level(logging.WARNING, logger="unity_crdt.checkpoint"):
        states = await Device(group_keys, sink).cp.restore()
    assert [merged([s]) for s in states["notes"]] == ["from b"]
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and victim in refusals[0] and "notes" not in refusals[0]


async def test_20mb_doc_is_chunked_and_restores(
    weaviate_server: Any, sink: WeaviateSink, group_keys: GroupKeys
) -> None:
    dev = Device(group_keys, sink)
    content = os.urandom(10_000_000).hex()  # 20 MB of text
    dev.edit("big", content)
    report = await dev.cp.checkpoint()
    assert report.written == ("big",) and report.nbytes > 20_000_000
    manifests = await sink.manifests(group_keys.tenant)
    assert [m.parts for m in manifests] == [5]  # 4 MiB chunks, each its own object
    objects = await all_objects(weaviate_server, group_keys.tenant)
    assert sum(1 for c, _, _ in objects if c == CHUNKS) == 5
    states = await Device(group_keys, sink).cp.restore()
    assert merged(states["big"]) == content


async def test_only_dirty_docs_are_written(
    weaviate_server: Any, sink: WeaviateSink, group_keys: GroupKeys
) -> None:
    counter = CountingSink(sink)
    dev = Device(group_keys, counter)
    for name in ("a", "b", "c"):
        dev.edit(name, f"text of {name}")
    await dev.cp.checkpoint()
    assert sorted(counter.written) == sorted(dev.cp.doc_key(n) for n in "abc")
    before = {m.object_id: m.doc_key for m in await sink.manifests(group_keys.tenant)}
    counter.written.clear()
    assert (await dev.cp.checkpoint()).written == ()
    assert counter.written == [] and counter.calls == 1
    dev.edit("b", " more")
    assert (await dev.cp.checkpoint()).written == ("b",)
    assert counter.written == [dev.cp.doc_key("b")] and counter.calls == 2
    after = {m.object_id: m.doc_key for m in await sink.manifests(group_keys.tenant)}
    assert len(after) == 3  # b's new object replaced (pruned) its older one
    assert {after[o] for o in set(after) - set(before)} == {dev.cp.doc_key("b")}
    # The pruned object's chunks went with it.
    objects = await all_objects(weaviate_server, group_keys.tenant)
    assert sum(1 for c, _, _ in objects if c == CHUNKS) == 3


class CountingSink:
    """A real sink wrapper that counts the objects handed to `put` (no mocking)."""

    def __init__(self, inner: CheckpointSink) -> None:
        self.inner = inner
        self.written: list[str] = []
        self.calls = 0

    async def put(self, tenant: str, records: Any) -> None:
        self.calls += 1
        self.written += [r.manifest.doc_key for r in records]
        await self.inner.put(tenant, records)

    async def confirm(self, tenant: str, manifests: Any) -> set[str]:
        return await self.inner.confirm(tenant, manifests)

    async def delete(self, tenant: str, manifests: Any) -> None:
        await self.inner.delete(tenant, manifests)

    async def passage_ids(self, tenant: str, doc_keys: Any) -> dict[str, set[str]]:
        return await self.inner.passage_ids(tenant, doc_keys)

    async def put_passages(self, tenant: str, add: Any, remove: Any) -> None:
        await self.inner.put_passages(tenant, add, remove)

    async def manifests(self, tenant: str, doc_keys: Any = None) -> list[Manifest]:
        return await self.inner.manifests(tenant, doc_keys)

    async def chunks(self, tenant: str, manifests: Any) -> dict[str, list[bytes]]:
        return await self.inner.chunks(tenant, manifests)

    async def search(self, tenant: str, query: Any) -> Any:
        return await self.inner.search(tenant, query)

    async def close(self) -> None:
        await self.inner.close()


async def test_unreachable_server_is_a_clear_checkpoint_error(group_keys: GroupKeys) -> None:
    dead = WeaviateSink("http://127.0.0.1:9", 10, init_timeout=3, query_timeout=3)
    dev = Device(group_keys, dead)
    dev.edit("notes", "x")
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="unreachable"):
        await dev.cp.checkpoint()
    assert time.monotonic() - started < 10
    assert dev.cp.dirty == {"notes"}
    assert "unreachable" in (dev.cp.status["notes"].last_error or "")
    await dead.close()


async def test_server_killed_mid_run_backs_off_and_loses_nothing(
    weaviate_server: Any, group_keys: GroupKeys
) -> None:
    sink = WeaviateSink(
        weaviate_server.url,
        weaviate_server.grpc_port,
        init_timeout=2,
        query_timeout=5,
        insert_timeout=5,
    )
    dev = Device(group_keys, sink)
    dev.edit("notes", "before crash. ")
    task = asyncio.create_task(dev.cp.run(0.1, max_backoff=0.4))
    try:
        await wait_for(lambda: not dev.cp.dirty, 20)
        await asyncio.to_thread(weaviate_server.kill)
        for i in range(5):
            dev.edit("notes", f"offline edit {i}. ")
            dev.edit(f"new-{i}", f"made offline {i}")
        await wait_for(lambda: dev.cp.failures >= 2, 30)
        assert dev.cp.status["notes"].last_error is not None
        assert len(dev.cp.dirty) == 6
        await asyncio.to_thread(weaviate_server.restart)
        await wait_for(lambda: not dev.cp.dirty, 60)
        assert dev.cp.failures == 0 and dev.cp.status["notes"].last_error is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
    assert task.cancelled()
    reader_sink = WeaviateSink(weaviate_server.url, weaviate_server.grpc_port)
    states = await Device(group_keys, reader_sink).cp.restore()
    await reader_sink.close()
    assert merged(states["notes"]) == "before crash. " + "".join(
        f"offline edit {i}. " for i in range(5)
    )
    assert all(merged(states[f"new-{i}"]) == f"made offline {i}" for i in range(5))


async def wait_for(cond: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_weaviate_sink_meets_the_sink_contract_by_url(weaviate_server: Any) -> None:
    url = f"weaviate://127.0.0.1:{weaviate_server.http_port}?grpc={weaviate_server.grpc_port}"
    await check_sink(lambda: open_sink(url))
