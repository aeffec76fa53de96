"""The local_cache: contract suite on both backends, corruption, locking, key files."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
import sys
from pathlib import Path
from typing import Any

import pycrdt
import pytest

from unity_crdt.errors import CacheLockedError, ConfigError, StoreError
from unity_crdt.store._compaction import compact_updates, should_compact
from unity_crdt.store._schema import APP_ID
from unity_crdt.store.files import DB_NAME, LOCK_NAME, load_or_create_secret_file
from unity_crdt.store.memory import MemoryStore
from unity_crdt.store.sqlite import SqliteStore
from unity_crdt.testing import check_store

WRITER = Path(__file__).parents[1] / "integration" / "store_writer.py"
ROOT = Path(__file__).parents[2]


class Editor:
    """A pycrdt doc whose transactions' updates are captured."""

    def __init__(self) -> None:
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc()
        self.map = self.doc.get("map", type=pycrdt.Map)
        self.updates: list[bytes] = []
        self.doc.observe(lambda e: self.updates.append(bytes(e.update)))

    def set(self, key: str, value: str) -> bytes:
        self.map[key] = value
        return self.updates.pop()


def rebuild(blobs: list[bytes]) -> dict[str, Any]:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    for blob in blobs:
        doc.apply_update(blob)
    return doc.get("map", type=pycrdt.Map).to_py() or {}


async def test_contract_sqlite(tmp_path: Path) -> None:
    await check_store(lambda: SqliteStore(tmp_path / "cache"))


class MirroredStore(SqliteStore):
    """A SqliteStore whose snapshot source is a Doc per doc fed every appended update, as a
    node's replica is: compaction then writes that state instead of applying the log."""

    def __init__(self, path: Path) -> None:
        self.mirror: dict[str, pycrdt.Doc[Any]] = {}
        super().__init__(
            path,
            compact_min_rows=40,
            compact_min_bytes=4096,
            snapshot_source=lambda d: self.mirror[d].get_update() if d in self.mirror else None,
            state_vector_source=lambda d: self.mirror[d].get_state(),
        )

    async def append(self, doc: str, update: bytes) -> None:
        self.mirror.setdefault(doc, pycrdt.Doc()).apply_update(update)
        await super().append(doc, update)


async def test_contract_sqlite_compacting_from_memory(tmp_path: Path) -> None:
    # The contract's pending-update check matters here: the mirror holds the update whose
    # dependency is missing as pending, so its snapshot lacks it and the row must stay.
    await check_store(lambda: MirroredStore(tmp_path / "cache"))


async def test_contract_memory() -> None:
    mem = MemoryStore()
    await check_store(lambda: mem)


async def test_sqlite_file_layout_and_lock_contents(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        await store.append("a", Editor().set("k", "v"))
        holder = (tmp_path / LOCK_NAME).read_text().split()
        assert holder[0] == str(os.getpid())
        with pytest.raises(sqlite3.OperationalError, match="locked"):  # exclusive mode
            sqlite3.connect(tmp_path / DB_NAME, timeout=0).execute("SELECT 1 FROM log").fetchall()
    header = (tmp_path / DB_NAME).read_bytes()[:100]
    assert header[18:20] == b"\x02\x02"  # WAL mode is recorded in the file
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released and cleared
    assert stat.S_IMODE((tmp_path / LOCK_NAME).stat().st_mode) == 0o600


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    ed = Editor()
    updates = [ed.set(f"k{i}", "v") for i in range(64)]
    async with SqliteStore(tmp_path) as store:
        await asyncio.gather(*(store.append("doc", u) for u in updates))
        assert store.commits < 16, f"64 concurrent appends took {store.commits} commits"
        assert rebuild(await store.load("doc")) == ed.map.to_py()
        before = store.commits
        for u in updates[:5]:
            await store.append("doc", u)
        assert store.commits == before + 5  # sequential awaits: one durable commit each


async def test_event_loop_keeps_running_during_appends_and_compaction(tmp_path: Path) -> None:
    ed = Editor()
    updates = [ed.set(f"k{i % 500}", "x" * (i % 50)) for i in range(3000)]
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = loop.time()
            gaps.append(now - last)
            last = now

    async with SqliteStore(tmp_path, compact_min_rows=500) as store:
        tick = asyncio.create_task(ticker())
        for i in range(0, len(updates), 100):
            await asyncio.gather(*(store.append("doc", u) for u in updates[i : i + 100]))
        await store.compact("doc")
        stop.set()
        await tick
        assert rebuild(await store.load("doc")) == ed.map.to_py()
    assert len(gaps) > 20
    assert max(gaps) < 0.25, f"event loop blocked for {max(gaps):.3f} s"


async def test_auto_compaction_bounds_the_log(tmp_path: Path) -> None:
    ed = Editor()
    async with SqliteStore(tmp_path, compact_min_rows=50, compact_min_bytes=10**9) as store:
        for i in range(400):
            await store.append("doc", ed.set(f"k{i % 30}", f"v{i}"))
        blobs = await store.load("doc")
        assert len(blobs) <= 51, f"{len(blobs)} blobs: the log was not compacted"
        assert rebuild(blobs) == ed.map.to_py()
        # Compaction runs in steps between appends, so a few rows may outlive one: fold them
        # now, so that the tail below is all the log holds.
        await store.compact("doc")
        for i in range(20):
            await store.append("doc", ed.set(f"tail{i}", "t"))
    async with SqliteStore(tmp_path) as store:  # close compacted the 20-row tail
        blobs = await store.load("doc")
        assert len(blobs) == 1
        assert rebuild(blobs) == ed.map.to_py()


def test_compaction_policy() -> None:
    assert not should_compact(10, 500, 0, 1000, 65536)  # under the floor
    assert should_compact(1000, 20_000, 100_000, 1000, 65536)  # 1000 rows cost ~276 KB
    assert not should_compact(1000, 20_000, 10_000_000, 1000, 65536)  # huge snapshot: wait
    assert should_compact(10, 70_000, 60_000, 1000, 65536)  # bytes outgrew the snapshot


def test_compact_updates_drops_unparseable_rows(caplog: pytest.LogCaptureFixture) -> None:
    ed = Editor()
    rows = [ed.set("a", "1"), b"\xff\xfe garbage", ed.set("b", "2")]
    state, keep = compact_updates(None, rows)
    assert keep == []
    assert rebuild([state]) == {"a": "1", "b": "2"}
    assert "log row 1 does not parse" in caplog.text


async def _fill(path: Path, rows: int) -> dict[str, Any]:
    ed = Editor()
    async with SqliteStore(path, compact_min_rows=10**9, compact_min_bytes=10**12) as store:
        for i in range(rows):
            await store.append("doc", ed.set(f"k{i}", "v" * 200))
    return ed.map.to_py() or {}


def _damage(db: Path, how: str) -> bytes:
    raw = db.read_bytes()
    assert len(raw) > 40_000
    if how == "garbage":
        db.write_bytes(b"this is not a database at all" * 100)
    elif how == "truncate":
        with open(db, "r+b") as f:
            f.truncate(len(raw) // 2 + 123)
    else:
        with open(db, "r+b") as f:  # wipe pages in the middle of the b-tree
            f.seek(4096 * 3)
            f.write(b"\0" * 4096 * 4)
    return db.read_bytes()


@pytest.mark.parametrize("damage", ["garbage", "truncate", "zero-pages"])
async def test_corrupt_database_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    original = await _fill(tmp_path, 300)
    db = tmp_path / DB_NAME
    damaged = _damage(db, damage)
    caplog.set_level(logging.ERROR, logger="unity_crdt.store")
    async with SqliteStore(tmp_path) as store:
        moved = tmp_path / f"{DB_NAME}.corrupt-1"
        assert store.recovered_from == moved
        assert moved.read_bytes() == damaged  # kept for forensics, never deleted
        rec = store.recoveries[-1]
        assert rec.moved_to == str(moved)
        salvaged = rebuild(await store.load("doc"))
        # What was salvaged is the original's (nothing made up); what was not is reported.
        assert all(original[k] == v for k, v in salvaged.items())
        assert salvaged != original  # the doc's one snapshot was in the damaged range
        assert rec.everything or rec.unattributed > 0 or rec.lost  # and that is said
        ed = Editor()
        await store.append("fresh", ed.set("x", "y"))
        assert rebuild(await store.load("fresh")) == {"x": "y"}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert str(db) in errors[0].getMessage() and str(moved) in errors[0].getMessage()
    assert "damaged" in errors[0].getMessage()
    async with SqliteStore(tmp_path) as store:  # the fresh cache is healthy
        assert store.recovered_from is None and not store.recoveries
        assert rebuild(await store.load("fresh")) == {"x": "y"}


async def test_second_corruption_gets_a_new_name(tmp_path: Path) -> None:
    for n in (1, 2):
        (tmp_path / DB_NAME).write_bytes(b"garbage" * 1000)
        async with SqliteStore(tmp_path) as store:
            assert store.recovered_from == tmp_path / f"{DB_NAME}.corrupt-{n}"
    assert (tmp_path / f"{DB_NAME}.corrupt-1").exists()


async def test_newer_schema_is_an_error_not_corruption(tmp_path: Path) -> None:
    await _fill(tmp_path, 3)
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("PRAGMA user_version = 99")  # a newer version writes both copies
    conn.execute(f"PRAGMA application_id = {APP_ID | 99}")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        await SqliteStore(tmp_path).open()
    assert (tmp_path / DB_NAME).exists()
    assert not [p for p in os.listdir(tmp_path) if ".corrupt-" in p]
    with pytest.raises(StoreError, match="schema version 99"):  # not CacheLockedError
        await SqliteStore(tmp_path).open()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / (DB_NAME + suffix)).unlink(missing_ok=True)
    async with SqliteStore(tmp_path) as store:
        assert await store.docs() == []


async def test_damaged_row_is_skipped_and_the_rest_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main, other, victim = Editor(), Editor(), Editor()
    marker = "MARKER-0123456789-MARKER"
    async with SqliteStore(tmp_path) as store:
        for i in range(5):
            await store.append("doc", main.set(f"k{i}", f"v{i}"))
        await store.append("doc", victim.set("victim", marker))
        for i in range(5, 10):
            await store.append("doc", main.set(f"k{i}", f"v{i}"))
        await store.append("other ✓", other.set("o", "fine"))
    db = tmp_path / DB_NAME
    raw = bytearray(db.read_bytes())
    at = raw.find(marker.encode())
    assert at > 0 and raw.find(marker.encode(), at + 1) == -1
    raw[at + 3] ^= 0x20
    db.write_bytes(bytes(raw))
    caplog.set_level(logging.WARNING, logger="unity_crdt.store")
    async with SqliteStore(tmp_path) as store:
        assert store.recovered_from is None  # the file is sound; one row is not
        assert [(r.lost, r.quarantined) for r in store.recoveries] == [((("doc", 1),), 1)]
        blobs = await store.load("doc")
        assert len(blobs) == 10
        assert rebuild(blobs) == main.map.to_py()
        assert rebuild(await store.load("other ✓")) == {"o": "fine"}
        await store.compact("doc")  # compaction copes
        assert rebuild(await store.load("doc")) == main.map.to_py()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "lost from 1 docs: 'doc' (1 rows)" in errors[0], errors
    assert all(marker not in w for w in errors)  # never log content
    # The damaged row was moved, bytes and all, into the quarantine table: never dropped.
    conn = sqlite3.connect(tmp_path / DB_NAME)
    kept = conn.execute("SELECT source, doc, reason, data FROM quarantine").fetchall()
    conn.close()
    assert len(kept) == 1 and kept[0][1] == b"doc" and kept[0][2] == "checksum mismatch"
    assert kept[0][0].startswith("log row ") and marker.encode() not in kept[0][3]
    flipped = bytearray(marker.encode())
    flipped[3] ^= 0x20
    assert bytes(flipped) in kept[0][3]


async def test_lock_held_by_another_process(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        "hold",
        str(tmp_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"ready"
        with pytest.raises(CacheLockedError) as info:
            await SqliteStore(tmp_path).open()
        message = str(info.value)
        assert f"pid {proc.pid}" in message
        assert str(tmp_path / LOCK_NAME) in message
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 20)
    assert proc.returncode == 0
    async with SqliteStore(tmp_path) as store:  # released when the holder closed
        assert await store.docs() == []


async def test_lock_in_the_same_process(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path):
        with pytest.raises(CacheLockedError, match=f"pid {os.getpid()}"):
            await SqliteStore(tmp_path).open()
    async with SqliteStore(tmp_path):
        pass


async def test_misuse_is_reported(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    with pytest.raises(StoreError, match="not open"):
        await store.load("doc")
    async with store:
        with pytest.raises(ConfigError):
            await store.append("bad\x00name", b"\x00\x00")
        with pytest.raises(TypeError):
            await store.append("doc", "text")  # type: ignore[arg-type]
        with pytest.raises(StoreError, match="already open"):
            await store.open()
    await store.close()  # closing twice is harmless


def test_secret_file_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    key = load_or_create_secret_file(path, lambda: os.urandom(32))
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def never() -> bytes:
        raise AssertionError("create() called although the key exists")

    assert load_or_create_secret_file(path, never) == key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.key"]  # no temp files left


@pytest.mark.parametrize("damage", ["flip", "short", "empty"])
def test_damaged_secret_file_raises_and_is_kept(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "device.key"
    load_or_create_secret_file(path, lambda: os.urandom(32))
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[10] ^= 1
    elif damage == "short":
        raw = raw[:20]
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=str(path)):
        load_or_create_secret_file(path, lambda: os.urandom(32))
    assert path.read_bytes() == bytes(raw)  # never overwritten


def test_secret_file_checks_created_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected 32"):
        load_or_create_secret_file(tmp_path / "k", lambda: b"short")
    assert not list(tmp_path.iterdir())


# -- cold start: preload, docs without a round trip, the kept WAL file, cancelled open --------


async def test_preloaded_docs_match_the_file_and_writes_invalidate_them(tmp_path: Path) -> None:
    a, b = Editor(), Editor()
    async with SqliteStore(tmp_path) as store:
        await store.append("a", a.set("k", "1"))
        await store.append("b", b.set("k", "1"))
    # A budget that holds "a" but not both: "b" then loads through the worker.
    async with SqliteStore(tmp_path, preload_bytes=len(a.updates) + 40) as store:
        assert await store.docs() == ["a", "b"]
        await store.append("a", a.set("k2", "2"))  # after open: what open read is stale
        assert rebuild(await store.load("a")) == {"k": "1", "k2": "2"}
        assert rebuild(await store.load("b")) == {"k": "1"}
        await store.append("c", Editor().set("x", "y"))
        assert await store.docs() == ["a", "b", "c"]
    for budget in (0, 10**6):  # nothing or everything preloaded: the same contents
        async with SqliteStore(tmp_path, preload_bytes=budget) as store:
            assert await store.docs() == ["a", "b", "c"]
            assert rebuild(await store.load("a")) == {"k": "1", "k2": "2"}
            assert rebuild(await store.load("a")) == {"k": "1", "k2": "2"}  # twice: from disk
            assert rebuild(await store.load("c")) == {"x": "y"}


async def test_an_empty_wal_file_is_kept_between_runs(tmp_path: Path) -> None:
    ed = Editor()
    async with SqliteStore(tmp_path) as store:
        await store.append("doc", ed.set("k", "v"))
    wal = tmp_path / f"{DB_NAME}-wal"
    assert wal.exists() and wal.stat().st_size == 0
    conn = sqlite3.connect(f"file:{tmp_path / DB_NAME}?mode=ro", uri=True)
    assert conn.execute("SELECT COUNT(*) FROM log").fetchone() == (1,)  # other readers too
    conn.close()
    async with SqliteStore(tmp_path) as store:
        assert rebuild(await store.load("doc")) == {"k": "v"}
        await store.append("doc", ed.set("k2", "v2"))
    async with SqliteStore(tmp_path) as store:
        assert rebuild(await store.load("doc")) == {"k": "v", "k2": "v2"}


async def test_cancelled_open_releases_the_cache(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        # 4 MB to read at open: a cancel one loop turn after the start lands mid-open.
        await store.append("doc", Editor().set("k", "x" * 4_000_000))
    for delay in (0, 1, 2):
        store = SqliteStore(tmp_path)
        task = asyncio.create_task(store.open())
        for _ in range(delay):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(StoreError, match="not open"):
            await store.load("doc")
        async with SqliteStore(tmp_path) as other:  # the lock was released
            assert await other.docs() == ["doc"]
        async with store:  # and the cancelled store can open again
            assert await store.docs() == ["doc"]


# -- corruption met after open ----------------------------------------------------------------

MARK = "MARK-7f3a9c-"


async def _fill_big(path: Path, small: Editor, big: Editor) -> None:
    async with SqliteStore(path) as store:
        await store.append("a", small.set("k", "small"))
        # ~60 KB, so its snapshot spans a chain of overflow pages: the marker, mid-way,
        # sits on one of them (not on the table's own page, which open reads).
        filler = "".join(f"{i:05d}" for i in range(6000))
        await store.append("b", big.set("text", filler + MARK + filler))
        await store.compact("b")


def _zero_page_of(db: Path, needle: bytes) -> None:
    raw = db.read_bytes()
    at = raw.find(needle)
    assert at > 0 and raw.find(needle, at + 1) == -1
    with open(db, "r+b") as f:
        f.seek(at - at % 4096)
        f.write(b"\0" * 4096)


@pytest.mark.parametrize("source", [True, False])
@pytest.mark.parametrize("meet", ["load", "compact"])
async def test_corruption_met_after_open_recovers_and_rewrites_from_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, source: bool, meet: str
) -> None:
    small, big = Editor(), Editor()
    await _fill_big(tmp_path, small, big)
    _zero_page_of(tmp_path / DB_NAME, MARK.encode())
    memory = {"a": small.doc, "b": big.doc}  # what a node holds in its replica
    asked: list[str] = []

    def state_of(doc: str) -> bytes | None:
        asked.append(doc)
        return memory[doc].get_update() if doc in memory else None

    caplog.set_level(logging.ERROR, logger="unity_crdt.store")
    async with SqliteStore(
        tmp_path, preload_bytes=0, snapshot_source=state_of if source else None
    ) as store:
        assert store.recovered_from is None  # open reads no snapshot: nothing noticed yet
        assert rebuild(await store.load("a")) == {"k": "small"}
        await store.append("b", big.set("late", "acknowledged"))  # goes into the bad file
        if meet == "load":
            await store.load("b")  # rebuilt from what the file still holds, then read
        else:
            await store.compact("b")  # retried on the rebuilt cache
        moved = tmp_path / f"{DB_NAME}.corrupt-1"
        if meet == "compact" and source:
            # The new snapshot comes from memory: the damaged one is never read, only
            # superseded, and nothing is lost.
            assert store.recovered_from is None and not store.recoveries
        else:
            assert store.recovered_from == moved and moved.exists()
            assert [r.lost for r in store.recoveries] == [(("b", 1),)]  # b's snapshot only
        await store.append("c", Editor().set("after", "recovery"))  # the fresh cache works
        await asyncio.sleep(0.05)  # let the re-write (queued from the worker) reach the file
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    if meet == "compact" and source:
        assert errors == [] and asked == ["b"]
        async with SqliteStore(tmp_path) as store:
            assert rebuild(await store.load("b")) == big.map.to_py()
        return
    assert len(errors) == 1, errors
    assert str(tmp_path / DB_NAME) in errors[0] and str(moved) in errors[0]
    assert MARK not in errors[0]
    async with SqliteStore(tmp_path) as store:
        assert store.recovered_from is None
        assert await store.docs() == ["a", "b", "c"]
        assert rebuild(await store.load("a")) == {"k": "small"}  # never touched: all kept
        if source:
            assert asked == ["b"]  # only the doc that lost something is written again
            assert "re-written" in errors[0]
            assert rebuild(await store.load("b")) == big.map.to_py()
            assert rebuild(await store.load("b"))["late"] == "acknowledged"
        else:
            assert "only in memory" in errors[0]
            assert rebuild(await store.load("b")) != big.map.to_py()


async def test_unopenable_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).mkdir()  # a directory where the file should be
    with pytest.raises(StoreError, match="cannot open local cache"):
        await SqliteStore(tmp_path).open()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # the lock was given back
