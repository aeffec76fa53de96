"""`check_store`: the acceptance suite every local-cache backend (`store.base.Store`) runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pycrdt

from ..errors import StoreError
from ..store.base import Store


class _Editor:
    """A pycrdt Doc whose every transaction's update is captured, like the replica does."""

    def __init__(self) -> None:
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc()
        self.text = self.doc.get("text", type=pycrdt.Text)
        self.map = self.doc.get("map", type=pycrdt.Map)
        self.array = self.doc.get("array", type=pycrdt.Array)
        self.updates: list[bytes] = []
        self._sub = self.doc.observe(lambda event: self.updates.append(bytes(event.update)))

    def take(self) -> list[bytes]:
        """The updates captured since the last call."""
        out, self.updates = self.updates, []
        return out

    def edits(self, n: int, tag: str = "") -> None:
        """Make `n` small transactions: text inserts and deletes, map sets, array pushes."""
        for i in range(n):
            if i % 7 == 3 and str(self.text)[:1].isascii() and len(str(self.text)) > 4:
                # Text lengths count UTF-8 bytes; delete a whole leading ASCII char only.
                del self.text[0:1]
            elif i % 5 == 0:
                self.map[f"{tag}k{i}"] = f"v{i}-ü"
            elif i % 11 == 0:
                self.array.append(f"{tag}{i}")
            else:
                self.text += f"{tag}{i}."

    def content(self) -> tuple[str, dict[str, Any], list[Any]]:
        """What a reader sees: the text, the map and the array."""
        return str(self.text), self.map.to_py() or {}, self.array.to_py() or []


def _rebuild(blobs: list[bytes]) -> tuple[str, dict[str, Any], list[Any]]:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    for blob in blobs:
        doc.apply_update(blob)
    text = doc.get("text", type=pycrdt.Text)
    map_ = doc.get("map", type=pycrdt.Map)
    array = doc.get("array", type=pycrdt.Array)
    return str(text), map_.to_py() or {}, array.to_py() or []


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"check_store: {what}")


async def _append_all(store: Store, doc: str, updates: list[bytes]) -> None:
    for update in updates:
        await store.append(doc, update)


async def check_store(factory: Callable[[], Store], *, reopens: bool = True) -> None:
    """Run the Store contract against `factory()`.

    `factory()` returns an unopened store; with `reopens`, a later call must return a store
    over the same data (a persistent backend, or the same in-memory instance). Doc names are
    unique to each check, so the data may be shared with other checks.
    """
    store = factory()
    await store.open()
    _expect(not store.recoveries, "a fresh store reports a recovery")
    try:
        reopen_state = await _check_roundtrip(store)
        await _check_empty_and_docs(store)
        await _check_compaction(store)
        await _check_appends_during_compaction(store)
        await _check_pending_survives_compaction(store)
    finally:
        await store.close()
    with _raises_store_error("append after close"):
        await store.append("after-close", b"\x00\x00")
    if reopens:
        again = factory()
        async with again:
            name, expected = reopen_state
            _expect(_rebuild(await again.load(name)) == expected, "content lost on reopen")
            _expect(name in await again.docs(), "docs() forgot a doc after reopen")
            more = _Editor()
            for blob in await again.load(name):
                more.doc.apply_update(blob)
            more.take()
            more.edits(20, "r")
            await _append_all(again, name, more.take())
            _expect(_rebuild(await again.load(name)) == more.content(), "append after reopen")


class _raises_store_error:
    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: Any) -> bool:
        _expect(et is not None and issubclass(et, StoreError), f"{self.what} did not raise")
        return True


async def _check_roundtrip(store: Store) -> tuple[str, tuple[str, dict[str, Any], list[Any]]]:
    name = "notes/日本語 ✓ roundtrip"
    ed = _Editor()
    ed.edits(60)
    ed.text += "héllo wörld 🌍 日本 "
    ed.map["nested"] = pycrdt.Map({"a": "b"})
    ed.array.extend(["x", "ÿ"])
    del ed.array[0]
    updates = ed.take()
    await _append_all(store, name, updates)
    blobs = await store.load(name)
    _expect(all(isinstance(b, bytes) for b in blobs), "load() must return bytes")
    _expect(_rebuild(blobs) == ed.content(), "roundtrip changed the content")
    _expect("héllo wörld 🌍 日本" in ed.content()[0], "editor lost non-ASCII text")
    # Concurrent appends: each await returns only once its own update is stored.
    ed.edits(100, "c")
    await asyncio.gather(*(store.append(name, u) for u in ed.take()))
    _expect(_rebuild(await store.load(name)) == ed.content(), "concurrent appends lost updates")
    return name, ed.content()


async def _check_empty_and_docs(store: Store) -> None:
    _expect(await store.load("never-written ✗") == [], "load() of an unknown doc is not []")
    a, b = _Editor(), _Editor()
    a.edits(5, "a")
    b.edits(7, "b")
    await _append_all(store, "docs/ä", a.take())
    await _append_all(store, "docs/日", b.take())
    names = await store.docs()
    _expect(names == sorted(names), "docs() is not sorted")
    _expect({"docs/ä", "docs/日"} <= set(names), "docs() misses written docs")
    _expect("never-written ✗" not in names, "docs() lists an unwritten doc")
    _expect(_rebuild(await store.load("docs/ä")) == a.content(), "doc ä mixed with another")
    _expect(_rebuild(await store.load("docs/日")) == b.content(), "doc 日 mixed with another")


async def _check_compaction(store: Store) -> None:
    name = "compact/ünïcode"
    ed = _Editor()
    ed.edits(300)
    await _append_all(store, name, ed.take())
    await store.compact(name)
    blobs = await store.load(name)
    _expect(len(blobs) == 1, f"compaction left {len(blobs)} blobs, expected one snapshot")
    _expect(_rebuild(blobs) == ed.content(), "compaction changed the content")
    ed.edits(40, "post")
    await _append_all(store, name, ed.take())
    _expect(_rebuild(await store.load(name)) == ed.content(), "append after compaction lost")
    await store.compact(name)
    await store.compact(name)  # idempotent, and fine with an empty log
    _expect(_rebuild(await store.load(name)) == ed.content(), "second compaction lost content")


async def _check_appends_during_compaction(store: Store) -> None:
    name = "compact/concurrent"
    ed = _Editor()
    ed.edits(400)
    await _append_all(store, name, ed.take())
    ed.edits(200, "during")
    late = ed.take()
    tasks = [store.compact(name)] + [store.append(name, u) for u in late[:100]]
    tasks += [store.compact(name)] + [store.append(name, u) for u in late[100:]]
    await asyncio.gather(*tasks)
    _expect(_rebuild(await store.load(name)) == ed.content(), "appends during compaction lost")


async def _check_pending_survives_compaction(store: Store) -> None:
    name = "compact/pending"
    ed = _Editor()
    ed.edits(10)
    first = ed.take()
    ed.text += "gap"
    gap = ed.take()
    ed.text += "after"
    after = ed.take()
    # The update after the gap arrives first; its dependency only after a compaction.
    await _append_all(store, name, first + after)
    await store.compact(name)
    await _append_all(store, name, gap)
    _expect(_rebuild(await store.load(name)) == ed.content(), "compaction dropped a pending update")
