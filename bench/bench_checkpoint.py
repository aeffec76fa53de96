"""Checkpoints to Weaviate: 100 docs of ~100 KB state, checkpoint then restore (goal < 2 s each).

Ours: `Checkpointer` + `WeaviateSink` (seal, chunk, manifest written last, stale-chunk cleanup;
restore verifies every header and chunk). Anchor, same server and same bytes: the bare async
client writing each state as ONE plain base64 BLOB object with `insert_many` and reading them
back with one `fetch_objects` (no encryption, no manifest, no verification).
A real weaviate-server is started on loopback ports by scripts/weaviate.py.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pycrdt
import weaviate
from weaviate.classes.config import Configure, DataType, Property
from weaviate.classes.data import DataObject

from unity_crdt.checkpoint.policy import Checkpointer
from unity_crdt.checkpoint.weaviate import WeaviateSink
from unity_crdt.crypto.keys import derive_group_keys, device_id_for

DOCS = 100
DOC_BYTES = 100_000
ROUNDS = 3
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "weaviate.py"


def _script() -> ModuleType:
    # scripts/weaviate.py would shadow the weaviate client if imported by its file name.
    spec = importlib.util.spec_from_file_location("unity_crdt_weaviate_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
