"""Damaged caches: what is salvaged, repaired, quarantined and reported, and the schema-1
upgrade. Real SqliteStores on real files, damaged byte by byte."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import zlib
from pathlib import Path
from typing import Any

import pycrdt
import pytest

from unity_crdt.store._compaction import row_crc
from unity_crdt.store._engine import CacheDb
from unity_crdt.store._schema import APP_ID, SCHEMA_1, SCHEMA_VERSION
from unity_crdt.store.files import DB_NAME
from unity_crdt.store.sqlite import SqliteStore


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


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


def quarantined(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT source, doc, reason, data FROM quarantine").fetchall()
    conn.close()
    return rows


def pages_of(path: Path, table: str, kind: str = "leaf") -> list[int]:
    conn = sqlite3.connect(path)
    pages = [
        p
        for (p,) in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = ? ORDER BY pageno",
            (table, kind),
        )
    ]
    conn.close()
    return pages


async def many_docs(path: Path, docs: int = 200, rows: int = 5) -> dict[str, dict[str, Any]]:
    """Docs small enough that no compaction folds them: every row stays a log row."""
    out = {}
    async with SqliteStore(path) as store:
        for d in range(docs):
            ed = Editor()
            for r in range(rows):
                await store.append(f"doc-{d:03d}", ed.set(f"k{r}", f"value {d}/{r} " * 3))
            out[f"doc-{d:03d}"] = ed.map.to_py() or {}
    return out


async def contents(store: SqliteStore) -> dict[str, dict[str, Any]]:
    return {doc: rebuild(await store.load(doc)) for doc in await store.docs()}


# -- the schema-1 upgrade -----------------------------------------------------------------------


def write_schema_1(path: Path, docs: dict[str, list[bytes]], snapshots: dict[str, bytes]) -> None:
    """A cache as the previous version wrote it (its DDL, WAL, CRCs, no application id)."""
    path.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path / DB_NAME)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA_1 + "PRAGMA user_version = 1;")
    for doc, state in snapshots.items():
        conn.execute("INSERT INTO snapshot VALUES (?, ?, ?)", (doc, state, row_crc(doc, state)))
    for doc, rows in docs.items():
        for data in rows:
            conn.execute(
                "INSERT INTO log (doc, data, crc) VALUES (?, ?, ?)", (doc, data, row_crc(doc, data))
            )
    conn.commit()
    conn.close()


async def test_a_schema_1_cache_is_upgraded_with_every_doc(tmp_path: Path) -> None:
    a, b = Editor(), Editor()
    a_rows = [a.set(f"k{i}", "ä" * i) for i in range(30)]
    for i in range(10):
        b.set(f"s{i}", "in the snapshot")
    b_tail = [b.set("t", "in the log")]
    write_schema_1(tmp_path, {"a ✓": a_rows, "b": b_tail}, {"b": b.doc.get_update()})
    async with SqliteStore(tmp_path) as store:
        assert not store.recoveries and store.recovered_from is None
        assert await contents(store) == {"a ✓": a.map.to_py(), "b": b.map.to_py()}
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert conn.execute("PRAGMA application_id").fetchone() == (APP_ID | SCHEMA_VERSION,)
    assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental, from now on
    indexes = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'index'")
    assert indexes.fetchone() == (0,)
    conn.close()
    assert not any("corrupt" in name for name in os.listdir(tmp_path))


async def test_a_schema_1_cache_with_a_damaged_row_is_upgraded_and_kept(tmp_path: Path) -> None:
    ed = Editor()
    rows = [ed.set(f"k{i}", f"v{i}") for i in range(5)]
    write_schema_1(tmp_path, {"doc": rows}, {})
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("UPDATE log SET crc = crc + 1 WHERE id = 3")
    conn.commit()
    conn.close()
    async with SqliteStore(tmp_path) as store:
        (rec,) = store.recoveries
        assert rec.lost == (("doc", 1),) and rec.quarantined == 1
        assert store.recovered_from is not None and store.recovered_from.exists()  # kept
        assert len(await store.load("doc")) == 4


# -- damage SQLite cannot read past by itself ----------------------------------------------


@pytest.mark.parametrize("where", ["column name", "keyword", "user_version", "page size"])
async def test_a_damaged_header_or_schema_loses_nothing(tmp_path: Path, where: str) -> None:
    original = await many_docs(tmp_path, docs=20)
    db = tmp_path / DB_NAME
    raw = db.read_bytes()
    offset = {
        "column name": raw.find(b"crc INTEGER NOT NULL, data"),  # the "no such column"
        "keyword": raw.find(b"CREATE TABLE snapshot"),
        "user_version": 63,
        "page size": 16,
    }[where]
    flip(db, offset, 0x04)
    async with SqliteStore(tmp_path) as store:
        (rec,) = store.recoveries
        assert rec.moved_to is not None and rec.moved_to.endswith(".corrupt-1")  # kept
        assert (rec.lost, rec.unattributed, rec.everything) == ((), 0, False)
        assert await contents(store) == original


async def test_a_flipped_bit_in_a_doc_name_is_repaired(tmp_path: Path) -> None:
    original = await many_docs(tmp_path, docs=3)
    db = tmp_path / DB_NAME
    at = db.read_bytes().find(b"doc-001")
    flip(db, at + 4, 0x02)  # "doc-001" -> "doc-201"... in one row only
    async with SqliteStore(tmp_path) as store:
        (rec,) = store.recoveries
        assert (rec.repaired, rec.lost, rec.unattributed) == (1, (), 0)
        assert await contents(store) == original  # no phantom doc, no lost row
    kept = quarantined(db)
    assert [(k[1], k[2]) for k in kept] == [(b"doc-201", "doc name repaired")]
    async with SqliteStore(tmp_path) as store:  # repaired for good
        assert not store.recoveries


async def test_an_unreadable_page_costs_only_its_rows(tmp_path: Path) -> None:
    original = await many_docs(tmp_path)
    db = tmp_path / DB_NAME
    leaves = pages_of(db, "log")
    assert len(leaves) > 10
    victim = leaves[len(leaves) // 2]
    conn = sqlite3.connect(db)
    (cells,) = conn.execute("SELECT ncell FROM dbstat WHERE pageno = ?", (victim,)).fetchone()
    conn.close()
    raw = bytearray(db.read_bytes())
    raw[(victim - 1) * 4096 : victim * 4096] = b"\xff" * 4096  # not a b-tree page at all
    db.write_bytes(bytes(raw))
    async with SqliteStore(tmp_path) as store:
        (rec,) = store.recoveries
        assert rec.unattributed >= 1 and not rec.everything
        found = await contents(store)
    hurt = [d for d in original if found.get(d) != original[d]]
    assert len(hurt) <= cells // 5 + 2, hurt  # the docs with rows on that page, no more
    for doc in hurt:  # what is left of a hurt doc is the original's, never made up
        assert all(original[doc][k] == v for k, v in found.get(doc, {}).items())


async def test_rows_a_damaged_cell_count_hides_are_noticed(tmp_path: Path) -> None:
    original = await many_docs(tmp_path)
    db = tmp_path / DB_NAME
    victim = pages_of(db, "log")[3]
    at = (victim - 1) * 4096 + 3  # a leaf's cell count: SQLite just sees fewer rows
    raw = bytearray(db.read_bytes())
    count = int.from_bytes(raw[at : at + 2], "big")
    raw[at : at + 2] = (count - 4).to_bytes(2, "big")
    db.write_bytes(bytes(raw))
    async with SqliteStore(tmp_path) as store:
        (rec,) = store.recoveries
        assert rec.unattributed >= 1 and "vanished" in rec.reason + str(store.recoveries)
        found = await contents(store)
    assert found != original


# -- damaged snapshots ----------------------------------------------------------------------------


async def test_a_damaged_snapshot_is_quarantined_and_never_overwritten(tmp_path: Path) -> None:
    ed = Editor()
    marker = "SNAPSHOT-MARKER-" * 4
    async with SqliteStore(tmp_path) as store:
        for i in range(40):
            await store.append("doc", ed.set(f"k{i}", marker if i == 7 else f"v{i}"))
        await store.compact("doc")
    db = tmp_path / DB_NAME
    raw = db.read_bytes()
    at = raw.find(marker.encode())
    flip(db, at + 5)
    damaged = bytearray(raw)[at : at + len(marker)]
    damaged[5] ^= 1
    async with SqliteStore(tmp_path) as store:  # found when read (here, by the preload)
        assert await store.load("doc") == []
        (rec,) = store.recoveries
        assert rec.lost == (("doc", 1),) and rec.moved_to is None
        for i in range(5):  # the doc lives on; its compaction must not touch the old bytes
            await store.append("doc", ed.set(f"after{i}", "x"))
        await store.compact("doc")
    kept = quarantined(db)
    assert len(kept) == 1 and bytes(damaged) in kept[0][3]


# -- damage met while loading: healthy docs stay --------------------------------------------


async def test_damage_met_while_loading_keeps_every_readable_doc(tmp_path: Path) -> None:
    editors = {f"d{i:02d}": Editor() for i in range(12)}
    async with SqliteStore(tmp_path) as store:
        for name, ed in editors.items():
            for i in range(20):  # compacted at close: one snapshot each, ~24 KB
                await store.append(name, ed.set(f"k{i}", f"{name}-{i}-" * 100))
    db = tmp_path / DB_NAME
    raw = db.read_bytes()
    at = raw.find(b"d07-5-")  # inside d07's snapshot, on an overflow page
    page = at // 4096
    db.write_bytes(raw[: page * 4096] + bytes(4096) + raw[(page + 1) * 4096 :])
    # A small preload budget: some docs come with the open, the rest load one by one.
    async with SqliteStore(tmp_path, preload_bytes=100_000) as store:
        loaded = {name: rebuild(await store.load(name)) for name in await store.docs()}
        assert [r.lost for r in store.recoveries] == [(("d07", 1),)]
    for name, ed in editors.items():
        if name != "d07":
            assert loaded[name] == ed.map.to_py(), name


# -- durability settings and interrupted compactions ------------------------------------------


def test_the_live_connection_is_wal_and_fsyncs_every_commit(tmp_path: Path) -> None:
    db = CacheDb(tmp_path, min_rows=1, min_bytes=1, preload_bytes=0, on_recover=lambda d: "")
    db.open()
    try:
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == b"wal"
        assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.conn.execute("PRAGMA locking_mode").fetchone()[0] == b"exclusive"
    finally:
        db.close()


async def test_a_compaction_cut_short_leaves_the_doc_whole(tmp_path: Path) -> None:
    ed = Editor()
    text = ed.doc.get("text", type=pycrdt.Text)
    updates: list[bytes] = []
    ed.doc.observe(lambda e: updates.append(bytes(e.update)))
    for i in range(30):  # ~3 MB of text: a snapshot of several parts
        text += f"{i:04d}" * 25_000
    state = ed.doc.get_update()
    commits = 0

    def second_part_fails(what: str) -> None:
        nonlocal commits
        if what == "snapshot":
            commits += 1
            if commits == 2:
                raise sqlite3.OperationalError("database or disk is full")

    source = {"big": state}
    async with SqliteStore(tmp_path, snapshot_source=source.get) as store:
        for u in updates:
            await store.append("big", u)
        store.failpoint = second_part_fails
        with pytest.raises(Exception, match="full"):
            await store.compact("big")
        store.failpoint = None
    async with SqliteStore(tmp_path) as store:
        assert not store.recoveries
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        for blob in await store.load("big"):
            doc.apply_update(blob)
        assert str(doc.get("text", type=pycrdt.Text)) == str(text)
        await store.compact("big")  # and a later compaction completes
        assert len(await store.load("big")) == 1
    assert zlib.crc32(state) == zlib.crc32(source["big"])
    await asyncio.sleep(0)


async def test_a_cache_killed_before_its_first_checkpoint_opens_whole(tmp_path: Path) -> None:
    """A new cache's tables live in the WAL until SQLite's first checkpoint; its main file's
    header then still says "schema format 0", which is SQLite's own empty state, not damage."""
    code = (
        "import asyncio, os, sys, pycrdt\n"
        "from unity_crdt.store.sqlite import SqliteStore\n"
        "async def main():\n"
        "    store = SqliteStore(sys.argv[1])\n"
        "    await store.open()\n"
        "    d = pycrdt.Doc(); d.get('map', type=pycrdt.Map)['k'] = 'v'\n"
        "    await store.append('doc', d.get_update())\n"
        "    os._exit(0)  # no close, no checkpoint: as if killed\n"
        "asyncio.run(main())\n"
    )
    root = str(Path(__file__).parents[2])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(tmp_path), env={**os.environ, "PYTHONPATH": root}
    )
    assert await proc.wait() == 0
    assert (tmp_path / DB_NAME).read_bytes()[44:48] == bytes(4)  # the state this test is about
    async with SqliteStore(tmp_path) as store:
        assert store.recovered_from is None
        assert rebuild(await store.load("doc")) == {"k": "v"}
