"""Compaction on a real Weaviate: racing pruners, and 50 devices restored from ~1 object/doc."""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import pytest
from pycrdt import Doc, Text

from unity_crdt.checkpoint.policy import Checkpointer, RestoreProgress
from unity_crdt.checkpoint.weaviate import WeaviateSink
from unity_crdt.crypto.keys import GroupKeys, device_id_for

pytestmark = pytest.mark.weaviate


def text_doc() -> Doc:
    doc: Doc = Doc()
    doc["t"] = Text()
    return doc


def merged_text(states: list[bytes]) -> str:
    doc = text_doc()
    for s in states:
        doc.apply_update(s)
    return str(doc["t"])


class Device:
    def __init__(self, keys: GroupKeys, sink: WeaviateSink, names: list[str]) -> None:
        self.docs = {n: text_doc() for n in names}
        self.cp = Checkpointer(keys, device_id_for(os.urandom(32)), sink, self.state)

    def state(self, name: str) -> bytes:
        return self.docs[name].get_update()


async def test_racing_checkpointers_on_weaviate_lose_nothing(
    weaviate_server: Any, group_keys: GroupKeys
) -> None:
    rng = random.Random(7)
    names = ["one", "two"]
    sinks = [WeaviateSink(weaviate_server.url, weaviate_server.grpc_port) for _ in range(4)]
    devices = [Device(group_keys, s, names) for s in sinks]
    stored: dict[str, list[bytes]] = {n: [] for n in names}
    pruned = 0
    try:
        for round_ in range(12):
            for i, dev in enumerate(devices):
                for name in names:
                    t = dev.docs[name]["t"]
                    if len(t) > 8 and rng.random() < 0.4:
                        start = rng.randrange(len(t) - 4)
                        del t[start : start + 4]
                    else:
                        t.insert(rng.randrange(len(t) + 1), f"<{round_}.{i}>")
                    if rng.random() < 0.5:
                        other = rng.choice(devices)
                        dev.docs[name].apply_update(other.docs[name].get_update())
                    dev.cp.mark_dirty(name)
            states = [{n: d.state(n) for n in names} for d in devices]
            reports = await asyncio.gather(*(d.cp.checkpoint() for d in devices))
            for st, report in zip(states, reports, strict=True):
                pruned += report.pruned
                for name in (*report.written, *report.already_stored):
                    stored[name].append(st[name])
        reader = Device(group_keys, sinks[0], names)
        restored = await reader.cp.restore()
        for name in names:
            assert merged_text(restored[name]) == merged_text(stored[name])
        assert pruned > 20
    finally:
        for s in sinks:
            await s.close()


@pytest.mark.slow
async def test_fifty_devices_restore_from_one_object_per_doc(
    weaviate_server: Any, group_keys: GroupKeys
) -> None:
    docs = [f"doc-{d:04d}" for d in range(1000)]
    sink = WeaviateSink(weaviate_server.url, weaviate_server.grpc_port)
    started = time.monotonic()
    try:
        devices = [Device(group_keys, sink, []) for _ in range(50)]
        expected: dict[str, list[str]] = {d: [] for d in docs}
        for d, name in enumerate(docs):  # every doc written by three of the fifty devices
            for i in (d % 50, (d + 17) % 50, (d + 31) % 50):
                dev = devices[i]
                dev.docs[name] = doc = text_doc()
                doc["t"] += f"[{name} by {i}]"
                dev.cp.mark_dirty(name)
                expected[name].append(f"[{name} by {i}]")
        for batch in range(0, 50, 10):
            await asyncio.gather(*(d.cp.checkpoint() for d in devices[batch : batch + 10]))
        assert len(await sink.manifests(group_keys.tenant)) == 3000
        # A node restores everything, holds the merged state, checkpoints: it compacts.
        merger = Device(group_keys, sink, [])
        for name, states in (await merger.cp.restore()).items():
            merger.docs[name] = doc = text_doc()
            for s in states:
                doc.apply_update(s)
            merger.cp.mark_dirty(name)
        report = await merger.cp.checkpoint()
        assert len(report.written) == 1000 and report.pruned == 3000
        # A fresh device reads about one object per doc, and the result is exact.
        seen: list[RestoreProgress] = []
        fresh = Device(group_keys, sink, [])
        restored = await fresh.cp.restore(progress=seen.append)
        assert seen[-1].done == seen[-1].total and seen[-1].total <= 1.1 * len(docs)
        assert sorted(restored) == docs
        for name in docs:
            text = merged_text(restored[name])
            assert sorted(text.replace("][", "]\n[").split("\n")) == sorted(expected[name])
        print(
            f"50 devices x 1,000 docs, compacted and restored in {time.monotonic() - started:.1f} s"
        )
    finally:
        await sink.close()
