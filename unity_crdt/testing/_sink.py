"""`check_sink`: the acceptance suite every checkpoint sink (`checkpoint.format.CheckpointSink`)
runs, through a real `Checkpointer` so the records are the ones nodes write."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any

import pycrdt

from ..checkpoint.format import CheckpointSink
from ..checkpoint.policy import Checkpointer
from ..crypto.keys import derive_group_keys
from ..errors import CheckpointError

__all__ = ["check_sink"]


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"check_sink: {what}")


def _text_state(text: str) -> bytes:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.get("body", type=pycrdt.Text).insert(0, text)
    return doc.get_update()


def _merged(states: list[bytes]) -> str:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    for state in states:
        doc.apply_update(state)
    return str(doc.get("body", type=pycrdt.Text))


async def check_sink(factory: Callable[[], CheckpointSink], *, search: bool = True) -> None:
    """Run the CheckpointSink contract against sinks from `factory()`.

    Each call must return a sink over the same store. Every check writes under a fresh random
    group secret (its own tenant), so the store may be shared with other runs. With `search`,
    the sink must find a searchable doc by a word of its text.
    """
    keys = derive_group_keys("check_sink " + secrets.token_hex(16))
    sink = factory()
    try:
        states: dict[str, bytes] = {}
        texts: dict[str, str] = {}

        def device(dev: str, chunk_size: int = 64 * 1024) -> Checkpointer:
            return Checkpointer(
                keys, dev, sink, states.__getitem__, texts.get, chunk_size=chunk_size
            )

        a, b = device("a" * 26), device("b" * 26, chunk_size=1000)
        states["notes/ü"], texts["notes/ü"] = _text_state("zebra crossing at noon"), "zebra"
        states["big"] = _text_state("x" * 5000 + "é" * 3000)  # several chunks for b
        for name in states:
            a.mark_dirty(name)
        await a.checkpoint()
        states["notes/ü"] = _text_state("written by b")
        b.mark_dirty("notes/ü")
        b.mark_dirty("big")
        await b.checkpoint()
        got = await device("c" * 26).restore()
        _expect(set(got) == {"notes/ü", "big"}, f"restore returned {sorted(got)}")
        _expect(len(got["notes/ü"]) == 2, "one object per (doc, device) expected")
        _expect("x" * 5000 in _merged(got["big"]), "chunked state came back wrong")
        only = await device("c" * 26).restore(["big"])
        _expect(set(only) == {"big"}, "restore of one doc returned others")
        # Rewriting an object replaces it: one object per (doc, device), stale chunks gone.
        states["big"] = _text_state("short now")
        b.mark_dirty("big")
        await b.checkpoint()
        again = await device("c" * 26).restore(["big"])
        _expect(len(again["big"]) == 2, "a rewrite added an object instead of replacing it")
        manifests = await sink.manifests(a.tenant)
        _expect(len(manifests) == 4, f"{len(manifests)} manifests for 2 docs x 2 devices")
        chunks = await sink.chunks(a.tenant, manifests)
        for m in manifests:
            _expect(len(chunks.get(m.object_id, [])) == m.parts, "chunks missing or stale")
        # Another tenant sees nothing of this one.
        other = derive_group_keys("check_sink other " + secrets.token_hex(16))
        stranger = Checkpointer(other, "d" * 26, sink, states.__getitem__)
        _expect(await stranger.restore() == {}, "a tenant saw another tenant's objects")
        _expect(await sink.manifests(a.tenant, [a.doc_key("absent")]) == [], "filter leaked")
        if search:
            hits = await device("c" * 26).search("zebra", 5)
            _expect(any(h.doc == "notes/ü" for h in hits), "search missed a searchable doc")
            _expect(all(h.doc != "big" for h in hits), "search returned a private doc")
        blob = os.urandom(16).hex()
        _expect(await device("c" * 26).search(blob, 5) == [], "search matched nothing-words")
    except CheckpointError as exc:
        raise AssertionError(f"check_sink: the sink failed: {exc}") from exc
    finally:
        await sink.close()
