"""`check_sink`: the acceptance suite every checkpoint sink (`checkpoint.format.CheckpointSink`)
runs, mostly through a real `Checkpointer` so the records are the ones nodes write."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any

import pycrdt

from ..checkpoint.format import CheckpointSink, Passage, SearchQuery
from ..checkpoint.policy import Checkpointer
from ..crypto.keys import derive_group_keys
from ..errors import CheckpointError

__all__ = ["check_sink"]


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"check_sink: {what}")


def _text_doc(text: str) -> pycrdt.Doc[Any]:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.get("body", type=pycrdt.Text).insert(0, text)
    return doc


def _merged(states: list[bytes]) -> str:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    for state in states:
        doc.apply_update(state)
    return str(doc.get("body", type=pycrdt.Text))


def _axis(i: int, dim: int = 4) -> tuple[float, ...]:
    return tuple(1.0 if j == i else 0.0 for j in range(dim))


async def check_sink(factory: Callable[[], CheckpointSink], *, search: bool = True) -> None:
    """Run the CheckpointSink contract against sinks from `factory()`.

    Each call must return a sink over the same store. Every check writes under a fresh random
    group secret (its own tenant), so the store may be shared with other runs. With `search`,
    the sink must find passages by word and by vector, and mix both.
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
        notes_a = _text_doc("zebra crossing at noon")
        states["notes/ü"], texts["notes/ü"] = notes_a.get_update(), "zebra crossing at noon"
        big = _text_doc("x" * 5000 + "é" * 3000)
        states["big"] = big.get_update()  # several chunks for b
        for name in states:
            a.mark_dirty(name)
        await a.checkpoint()
        states["notes/ü"] = _text_doc("written by b").get_update()  # concurrent: not merged
        big.get("body", type=pycrdt.Text).insert(0, "b was here ")
        states["big"] = big.get_update()  # b holds all of a's "big", and more
        b.mark_dirty("notes/ü")
        b.mark_dirty("big")
        report = await b.checkpoint()
        _expect(report.pruned == 1, f"b's 'big' dominates a's, yet {report.pruned} pruned")
        got = await device("c" * 26).restore()
        _expect(set(got) == {"notes/ü", "big"}, f"restore returned {sorted(got)}")
        _expect(len(got["notes/ü"]) == 2, "two unmerged writes of a doc must both survive")
        _expect(len(got["big"]) == 1, "restore read a dominated object")
        _expect(_merged(got["big"]).startswith("b was here x"), "chunked state came back wrong")
        only = await device("c" * 26).restore(["big"])
        _expect(set(only) == {"big"}, "restore of one doc returned others")
        manifests = await sink.manifests(a.tenant)
        _expect(len(manifests) == 3, f"{len(manifests)} manifests, 3 expected after pruning")
        chunks = await sink.chunks(a.tenant, manifests)
        for m in manifests:
            _expect(len(chunks.get(m.object_id, [])) == m.parts, "chunks missing")
        # confirm and delete: by object, absent objects are no error, chunks go too.
        victim = next(m for m in manifests if m.doc_key == a.doc_key("big"))
        stored = await sink.confirm(a.tenant, manifests)
        _expect(stored == {m.object_id for m in manifests}, "confirm missed stored objects")
        await sink.delete(a.tenant, [victim])
        await sink.delete(a.tenant, [victim])
        _expect(victim.object_id not in await sink.confirm(a.tenant, [victim]), "not deleted")
        _expect(await sink.chunks(a.tenant, [victim]) in ({}, {victim.object_id: []}), "chunks")
        _expect(len(await sink.manifests(a.tenant)) == 2, "delete removed other objects")
        # Another tenant sees nothing of this one.
        other = derive_group_keys("check_sink other " + secrets.token_hex(16))
        stranger = Checkpointer(other, "d" * 26, sink, states.__getitem__)
        _expect(await stranger.restore() == {}, "a tenant saw another tenant's objects")
        _expect(await sink.manifests(a.tenant, [a.doc_key("absent")]) == [], "filter leaked")
        # Passages: upsert by (doc, pid), listed per doc, removed by pid.
        k1, k2 = a.doc_key("p1"), a.doc_key("p2")
        rows = [
            Passage(k1, "pa", "apples and pears in the orchard", _axis(0)),
            Passage(k1, "pb", "the zebra grazes", _axis(1)),
            Passage(k2, "pc", "orchard ladders", _axis(2)),
        ]
        await sink.put_passages(a.tenant, rows, {})
        await sink.put_passages(a.tenant, rows[:1], {})  # the same again: no duplicate
        ids = await sink.passage_ids(a.tenant, [k1, k2, a.doc_key("none")])
        _expect(ids == {k1: {"pa", "pb"}, k2: {"pc"}}, f"passage ids: {ids}")
        if search:
            kw = await sink.search(a.tenant, SearchQuery("orchard", "keyword", limit=5))
            _expect(sorted(h.text for h in kw) == sorted([rows[0].text, rows[2].text]), "bm25")
            vec = await sink.search(a.tenant, SearchQuery("", "vector", _axis(1), limit=1))
            _expect([h.text for h in vec] == ["the zebra grazes"], f"vector search: {vec}")
            mix = await sink.search(
                a.tenant, SearchQuery("orchard", "hybrid", _axis(2), alpha=0.5, limit=3)
            )
            _expect(bool(mix) and mix[0].text == "orchard ladders", f"hybrid search: {mix}")
            blob = os.urandom(16).hex()
            none = await sink.search(a.tenant, SearchQuery(blob, "keyword", limit=5))
            _expect(none == [], "keyword search matched a word nobody wrote")
        await sink.put_passages(a.tenant, [], {k1: ["pa", "missing"]})
        ids = await sink.passage_ids(a.tenant, [k1, k2])
        _expect(ids == {k1: {"pb"}, k2: {"pc"}}, f"passage removal: {ids}")
        if search:  # through a Checkpointer: searchable docs only, names from sealed headers
            states["notes/ü"] = notes_a.get_update()
            a.mark_dirty("notes/ü")
            a.mark_dirty("big")
            await a.checkpoint()
            hits = await device("c" * 26).search("crossing", 5)
            _expect([h.doc for h in hits] == ["notes/ü"], f"search hits: {hits}")
            _expect(hits[0].passage == "zebra crossing at noon", "hit carries its passage")
    except CheckpointError as exc:
        raise AssertionError(f"check_sink: the sink failed: {exc}") from exc
    finally:
        await sink.close()
