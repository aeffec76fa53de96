"""Model-based test of the local cache: real nodes on real SqliteStores, with injected write
failures (a full disk, I/O errors) and restarts, many small docs and a few large ones.

The model is what the node promised: every edit made before a `flush()` that returned is
acknowledged, and must be there after every restart, whatever failed in between (a failed
append, a failed compaction, a close that could not write). A `flush()` may only raise while
writes fail. Nothing may hang: every call runs under a timeout.

Open for more: `CacheModel` keeps its nodes in a list and each rule picks one; a link layer
(peers exchanging updates under real batch/frame/queue limits) adds rules that connect two of
them, with the same acknowledged-edits check.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pycrdt
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from unity_crdt import Node, NodeConfig, StoreError
from unity_crdt.store.sqlite import SqliteStore

pytestmark = pytest.mark.slow

SMALL_DOCS = [f"doc-{i:02d}" for i in range(16)] + ["ノート/ü"]
LARGE_DOCS = ["large-a", "large-b"]
TIMEOUT = 60.0
_T = TypeVar("_T")


class Crash(BaseException):
    """Raised at a commit: the store's worker stops there, as if the process died."""


def _fault(kind: str) -> BaseException:
    if kind == "CRASH":
        return Crash()
    if kind == "ENOSPC":
        return sqlite3.OperationalError("database or disk is full")
    return OSError(errno.EIO, "Input/output error")


class NodeUnderTest:
    """One real node on its own cache dir, with a failpoint in its store's engine."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.cache = root / name
        self.node: Node | None = None
        self.store: SqliteStore | None = None
        self.fault: str | None = None  # "ENOSPC" or "EIO": every commit fails
        self.fail_next = 0  # this many commits fail, then writes work again
        self.acked: dict[str, dict[str, str]] = {}
        self.unacked: dict[str, dict[str, str]] = {}
        self.counter = 0
        self.failed_since_flush = False  # a commit failed since the last flush

    def _failpoint(self, what: str) -> None:
        if self.fault is not None:
            self.failed_since_flush = True
            raise _fault(self.fault)
        if self.fail_next > 0:
            self.fail_next -= 1
            self.failed_since_flush = True
            raise _fault("EIO")

    async def start(self) -> None:
        def state(name: str) -> bytes | None:
            node = self.node
            return node.doc(name).get_update() if node is not None and name in node.docs else None

        def vector(name: str) -> bytes:
            assert self.node is not None
            return self.node.doc(name).get_state()

        # Small thresholds: compactions (from memory, in steps) happen all the time.
        self.store = SqliteStore(
            self.cache,
            compact_min_rows=8,
            compact_min_bytes=16_384,
            snapshot_source=state,
            state_vector_source=vector,
        )
        self.store.failpoint = self._failpoint
        cfg = NodeConfig(
            name=self.name, cache_dir=self.cache, group_secret="model " * 4, mdns=False
        )
        self.node = Node(cfg, store=self.store)
        await self.node.start()

    def edit(self, doc: str, size: int) -> None:
        assert self.node is not None
        self.counter += 1
        key, value = f"k{self.counter}", f"{self.counter}:" + "é" * size
        self.node.doc(doc).get("m", type=pycrdt.Map)[key] = value
        self.unacked.setdefault(doc, {})[key] = value

    async def flush(self) -> None:
        assert self.node is not None
        try:
            await self.node.flush()
        except StoreError:  # only while writes fail, and status says so
            assert self.failed_since_flush
            assert self.node.status().cache.store_error is not None
            return
        finally:
            self.failed_since_flush = self.fault is not None
        for doc, entries in self.unacked.items():
            self.acked.setdefault(doc, {}).update(entries)
        self.unacked = {}
        assert self.node.status().cache.unsaved_docs == ()

    async def restart(self, crash: bool = False) -> None:
        """Close and start again; with `crash`, nothing more reaches the file from the next
        commit on (no final compaction, no last writes), as if the process had died."""
        assert self.node is not None
        if crash:
            self.fault = "CRASH"
        try:
            await self.node.close()  # StoreError if the last writes could not be made
        except StoreError:
            assert self.failed_since_flush
        if crash:
            self.fault = None
        self.node = None
        self.unacked = {}  # never acknowledged: the model promises nothing about them
        await self.start()
        self.check()

    def check(self) -> None:
        """Every acknowledged edit is in the node (loaded from its cache after a restart)."""
        assert self.node is not None
        for doc, entries in self.acked.items():
            have = self.node.doc(doc).get("m", type=pycrdt.Map).to_py() or {}
            missing = [k for k, v in entries.items() if have.get(k) != v]
            assert not missing, f"{self.name}: {doc!r} lost {len(missing)} acknowledged edits"

    async def stop(self) -> None:
        self.fault, self.fail_next = None, 0
        if self.node is not None:
            try:
                await self.node.close()
            finally:
                self.node = None


class CacheModel(RuleBasedStateMachine):
    """Edits, flushes, write failures and restarts on real nodes; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.root = Path(tempfile.mkdtemp(prefix="cache-model-"))
        self.nodes = [NodeUnderTest("a", self.root)]
        for n in self.nodes:
            self.run(n.start())

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        async def bounded() -> _T:
            async with asyncio.timeout(TIMEOUT):  # a hang fails the example
                return await coro

        return self.loop.run_until_complete(bounded())

    def teardown(self) -> None:
        try:
            for n in self.nodes:
                self.run(n.stop())
        finally:
            self.loop.close()
            shutil.rmtree(self.root, ignore_errors=True)

    def edits(self, i: int, docs: list[str], size: int) -> None:
        async def on_the_loop() -> None:  # as an app does: edits on the node's loop
            for doc in docs:
                self.nodes[i].edit(doc, size)
                await asyncio.sleep(0)  # and the node persists them as they come

        self.run(on_the_loop())

    @rule(i=st.integers(0, 0), doc=st.sampled_from(SMALL_DOCS), size=st.integers(0, 300))
    def edit_small(self, i: int, doc: str, size: int) -> None:
        self.edits(i, [doc], size)

    @rule(i=st.integers(0, 0), doc=st.sampled_from(LARGE_DOCS))
    def edit_large(self, i: int, doc: str) -> None:
        self.edits(i, [doc], 150_000)  # 300 KB of UTF-8 per edit: multi-part snapshots

    @rule(i=st.integers(0, 0), n=st.integers(2, 40))
    def burst(self, i: int, n: int) -> None:
        self.edits(i, [SMALL_DOCS[k % len(SMALL_DOCS)] for k in range(n)], 20)

    @rule(i=st.integers(0, 0))
    def flush(self, i: int) -> None:
        self.run(self.nodes[i].flush())

    @rule(i=st.integers(0, 0), kind=st.sampled_from(["ENOSPC", "EIO"]))
    def writes_start_failing(self, i: int, kind: str) -> None:
        self.nodes[i].fault = kind

    @rule(i=st.integers(0, 0), count=st.integers(1, 3))
    def a_few_writes_fail(self, i: int, count: int) -> None:
        self.nodes[i].fail_next = count

    @rule(i=st.integers(0, 0))
    def writes_work_again(self, i: int) -> None:
        self.nodes[i].fault = None

    @rule(i=st.integers(0, 0), crash=st.booleans())
    def restart(self, i: int, crash: bool) -> None:
        self.run(self.nodes[i].restart(crash))

    @invariant()
    def acknowledged_edits_are_in_memory(self) -> None:
        for n in self.nodes:
            n.check()


CacheModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("CACHE_MODEL_EXAMPLES", "25")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheModel = CacheModel.TestCase
