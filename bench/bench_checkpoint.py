"""Checkpoints to Weaviate: write/restore, hybrid search, restore after many devices.

1. 100 docs of ~100 KB state, checkpoint then restore (goal < 2 s each). Ours: `Checkpointer`
   + `WeaviateSink` (seal, chunk, list and compact, manifest written last; restore opens every
   header, reads only undominated objects, verifies every chunk). Anchor, same server and same
   bytes: the bare async client writing each state as ONE plain base64 BLOB object with
   `insert_many` and reading them back with one `fetch_objects` (no encryption, no manifest).
2. Hybrid query p50 over 2,000 passages of 200 docs (goal <= 1.2x): `Checkpointer.search`
   (embed the query, hybrid query, names from sealed headers) against the bare client's
   `query.hybrid` on the same collection and tenant, with the same embedder, query and limit.
3. Restore of 1,000 docs written by 50 devices (3 devices per doc, then compacted by a node
   holding the merged state) against a restore of the same 1,000 docs written by 1 device
   (goal <= 1.2x).
A real weaviate-server is started on loopback ports by scripts/weaviate.py.
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import time
import uuid
from types import ModuleType
from typing import Any

import pycrdt
import weaviate
from weaviate.classes.config import Configure, DataType, Property
from weaviate.classes.data import DataObject
from weaviate.classes.query import MetadataQuery

from unity_crdt.checkpoint.policy import Checkpointer
from unity_crdt.checkpoint.weaviate import PASSAGES, WeaviateSink
from unity_crdt.crypto.keys import derive_group_keys, device_id_for
from unity_crdt.testing import ConceptEmbedder

from ._scripts import load

DOCS = 100
DOC_BYTES = 100_000
ROUNDS = 3
SEARCH_DOCS = 200
QUERIES = 300
RESTORE_DOCS = 1000
DEVICES = 50


def _script() -> ModuleType:
    return load("weaviate")


def _docs() -> dict[str, bytes]:
    states = {}
    for i in range(DOCS):
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        doc["body"] = text = pycrdt.Text()
        text += os.urandom(DOC_BYTES // 2).hex()
        states[f"bench/doc-{i:03d}"] = doc.get_update()
    return states


async def _ours(server: Any, states: dict[str, bytes]) -> tuple[float, float]:
    keys = derive_group_keys(os.urandom(16).hex())
    sink = WeaviateSink(server.url, server.grpc_port)
    cp = Checkpointer(keys, device_id_for(os.urandom(32)), sink, states.__getitem__)
    for name in states:
        cp.mark_dirty(name)
    await sink.manifests(keys.tenant)  # connect and create the tenant outside the timing
    started = time.perf_counter()
    report = await cp.checkpoint()
    write_s = time.perf_counter() - started
    assert len(report.written) == DOCS
    reader_sink = WeaviateSink(server.url, server.grpc_port)
    reader = Checkpointer(keys, device_id_for(os.urandom(32)), reader_sink, states.__getitem__)
    await reader_sink.manifests(keys.tenant)
    started = time.perf_counter()
    restored = await reader.restore()
    read_s = time.perf_counter() - started
    assert all(restored[n] == [s] for n, s in states.items())
    await sink.close()
    await reader_sink.close()
    return write_s, read_s


async def _anchor(server: Any, states: dict[str, bytes], name: str) -> tuple[float, float]:
    client = weaviate.use_async_with_local(
        host="127.0.0.1", port=server.http_port, grpc_port=server.grpc_port, skip_init_checks=True
    )
    await client.connect()
    try:
        col = await client.collections.create(
            name,
            properties=[Property(name="blob", data_type=DataType.BLOB)],
            vector_config=Configure.Vectors.self_provided(
                vector_index_config=Configure.VectorIndex.none()
            ),
        )
        objs = [
            DataObject(properties={"blob": base64.b64encode(s).decode()}, uuid=uuid.uuid4())
            for s in states.values()
        ]
        started = time.perf_counter()
        result = await col.data.insert_many(objs)
        write_s = time.perf_counter() - started
        assert not result.has_errors
        started = time.perf_counter()
        res = await col.query.fetch_objects(limit=DOCS, return_properties=["blob"])
        got = [base64.b64decode(str(o.properties["blob"])) for o in res.objects]
        read_s = time.perf_counter() - started
        assert len(got) == DOCS
    finally:
        await client.close()
    return write_s, read_s


def _topic(k: int) -> list[str]:
    return [f"topic{k}alpha", f"topic{k}beta", f"topic{k}gamma"]


async def _search(server: Any) -> dict[str, Any]:
    """p50 of our hybrid search vs the bare client's hybrid query on the same collection."""
    embedder = ConceptEmbedder({f"t{k}": _topic(k) for k in range(SEARCH_DOCS)}, extra=16)
    keys = derive_group_keys(os.urandom(16).hex())
    texts = {
        f"notes/{k:03d}": "\n\n".join(
            [f"Project {_topic(k)[0]} is summarised here."]
            + [f"Filler paragraph {i} of doc {k} about meetings and lunch." for i in range(9)]
        )
        for k in range(SEARCH_DOCS)
    }
    states = {}
    for name, text in texts.items():
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        doc["t"] = t = pycrdt.Text()
        t += text
        states[name] = doc.get_update()
    sink = WeaviateSink(server.url, server.grpc_port)
    cp = Checkpointer(
        keys, device_id_for(os.urandom(32)), sink, states.__getitem__, texts.get, embedder=embedder
    )
    for name in states:
        cp.mark_dirty(name)
    await cp.checkpoint()
    queries = [f"anything on {_topic(k % SEARCH_DOCS)[1]}" for k in range(QUERIES)]
    await cp.search(queries[0])  # warm: connection, names
    ours = []
    for q in queries:
        started = time.perf_counter()
        hits = await cp.search(q, limit=10)
        ours.append(time.perf_counter() - started)
        assert hits
    client = weaviate.use_async_with_local(
        host="127.0.0.1", port=server.http_port, grpc_port=server.grpc_port, skip_init_checks=True
    )
    await client.connect()
    bare = []
    try:
        col = client.collections.get(PASSAGES).with_tenant(keys.tenant)
        for q in queries:
            started = time.perf_counter()
            res = await col.query.hybrid(
                query=q,
                vector=embedder([q])[0],
                alpha=0.5,
                query_properties=["text"],
                limit=10,
                return_metadata=MetadataQuery(score=True),
                return_properties=["doc_key", "text"],
            )
            bare.append(time.perf_counter() - started)
            assert res.objects
    finally:
        await client.close()
        await sink.close()
    p50, b50 = statistics.median(ours), statistics.median(bare)
    print(
        f"  {'hybrid query p50 (2,000 passages)':<40} {p50 * 1000:6.2f} ms  "
        f"{p50 / b50:5.2f}x bare client ({b50 * 1000:.2f} ms)  goal <= 1.2x"
    )
    return {
        "metric": "hybrid_query_p50_ms",
        "value": round(p50 * 1000, 3),
        "ratio_vs_bare_client": round(p50 / b50, 2),
        "bare_client_ms": round(b50 * 1000, 3),
        "goal": "<= 1.2x",
    }


async def _restore_devices(server: Any) -> dict[str, Any]:
    """Restore 1,000 docs written by 50 devices (compacted) vs written by one device."""
    names = [f"doc-{d:04d}" for d in range(RESTORE_DOCS)]
    merged: dict[str, bytes] = {}
    per_device: list[dict[str, bytes]] = [{} for _ in range(DEVICES)]
    for d, name in enumerate(names):
        full: pycrdt.Doc[Any] = pycrdt.Doc()
        full["t"] = pycrdt.Text()
        for i in (d % DEVICES, (d + 17) % DEVICES, (d + 31) % DEVICES):
            part: pycrdt.Doc[Any] = pycrdt.Doc()
            part["t"] = t = pycrdt.Text()
            t += f"[{name} written by device {i}: " + os.urandom(200).hex() + "]"
            per_device[i][name] = part.get_update()
            full.apply_update(part.get_update())
        merged[name] = full.get_update()

    async def restore_s(keys: Any) -> float:
        sink = WeaviateSink(server.url, server.grpc_port)
        reader = Checkpointer(keys, device_id_for(os.urandom(32)), sink, merged.__getitem__)
        await sink.manifests(keys.tenant, ["warm-up"])
        started = time.perf_counter()
        got = await reader.restore()
        took = time.perf_counter() - started
        assert len(got) == RESTORE_DOCS
        await sink.close()
        return took

    many = derive_group_keys(os.urandom(16).hex())
    sink = WeaviateSink(server.url, server.grpc_port)
    for states in per_device:
        cp = Checkpointer(many, device_id_for(os.urandom(32)), sink, states.__getitem__)
        for name in states:
            cp.mark_dirty(name)
        await cp.checkpoint()
    merger = Checkpointer(many, device_id_for(os.urandom(32)), sink, merged.__getitem__)
    for name in names:
        merger.mark_dirty(name)
    report = await merger.checkpoint()  # the node holding the merged state compacts
    assert report.pruned == 3 * RESTORE_DOCS
    one = derive_group_keys(os.urandom(16).hex())
    single = Checkpointer(one, device_id_for(os.urandom(32)), sink, merged.__getitem__)
    for name in names:
        single.mark_dirty(name)
    await single.checkpoint()
    await sink.close()
    many_s = min([await restore_s(many) for _ in range(ROUNDS)])
    one_s = min([await restore_s(one) for _ in range(ROUNDS)])
    print(
        f"  {'restore 1,000 docs by 50 devices':<40} {many_s:6.2f} s  "
        f"{many_s / one_s:5.2f}x by 1 device ({one_s:.2f} s)  goal <= 1.2x"
    )
    return {
        "metric": "restore_1000_docs_50_devices_s",
        "value": round(many_s, 3),
        "ratio_vs_one_device": round(many_s / one_s, 2),
        "one_device_s": round(one_s, 3),
        "goal": "<= 1.2x",
    }


async def _main(server: Any) -> list[dict[str, Any]]:
    states = _docs()
    mb = sum(map(len, states.values())) / 1e6
    print(f"{DOCS} docs, {mb:.1f} MB of pycrdt state in all; best of {ROUNDS} rounds")
    ours = [await _ours(server, states) for _ in range(ROUNDS)]
    anchor = [await _anchor(server, states, f"BenchPlain{i}") for i in range(ROUNDS)]
    ow, orr = min(w for w, _ in ours), min(r for _, r in ours)
    aw, ar = min(w for w, _ in anchor), min(r for _, r in anchor)
    lines = [
        ("checkpoint (Checkpointer+WeaviateSink)", ow, aw, "goal < 2 s"),
        ("restore (Checkpointer+WeaviateSink)", orr, ar, "goal < 2 s"),
    ]
    for label, ours_s, anchor_s, goal in lines:
        print(
            f"  {label:<40} {ours_s:6.2f} s {mb / ours_s:7.1f} MB/s  "
            f"{ours_s / anchor_s:5.2f}x bare client ({anchor_s:.2f} s)  {goal}"
        )
    return [
        {
            "metric": "checkpoint_100x100KB_s",
            "value": round(ow, 3),
            "mb_per_s": round(mb / ow, 1),
            "ratio_vs_bare_client": round(ow / aw, 2),
            "goal": "< 2 s",
        },
        {
            "metric": "restore_100x100KB_s",
            "value": round(orr, 3),
            "mb_per_s": round(mb / orr, 1),
            "ratio_vs_bare_client": round(orr / ar, 2),
            "goal": "< 2 s",
        },
        {"metric": "bare_client_insert_many_s", "value": round(aw, 3)},
        {"metric": "bare_client_fetch_s", "value": round(ar, 3)},
        await _search(server),
        await _restore_devices(server),
    ]


def main() -> list[dict[str, Any]]:
    """Start a loopback Weaviate, run the checkpoint benchmark, return its rows."""
    script = _script()
    if not script.binary_path().exists():
        script.install()
    with script.WeaviateServer() as server:
        return asyncio.run(_main(server))


if __name__ == "__main__":
    main()
