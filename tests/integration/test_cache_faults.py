"""The local cache under real faults: a full disk (a real 3 MiB tmpfs), a read-only cache dir,
a store worker that meets an unexpected exception, and the cache's file modes (F7).

Mounting needs root; CI runs as root, so this tier fails loudly instead of skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pycrdt
import pytest
from meshkit import node_config

from unity_crdt import Node, StoreError
from unity_crdt.store.files import DB_NAME, LOCK_NAME
from unity_crdt.store.sqlite import SqliteStore

HANG = 30.0  # nothing here may take long; a hang fails the test instead of blocking CI


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "3m") -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `path`, always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the disk-fault tier mounts a tmpfs and needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; return it (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (65536, 4096, 512, 1):  # down to the very last byte
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\xa5" * size)
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def entries(node: Node, doc: str) -> dict[str, Any]:
    return node.doc(doc).get("m", type=pycrdt.Map).to_py() or {}


async def test_disk_full_loses_no_acknowledged_edit_and_flush_says_so(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        cfg = node_config(disk, "a")
        expected: dict[str, str] = {}
        async with asyncio.timeout(HANG):
            node = Node(cfg)
            await node.start()
            try:
                m = node.doc("notes").get("m", type=pycrdt.Map)
                other = node.doc("other").get("m", type=pycrdt.Map)
                for i in range(20):
                    m[f"before{i}"] = f"v{i}"
                    expected[f"before{i}"] = f"v{i}"
                other["x"] = "y"
                await node.flush()
                assert node.status().cache.store_error is None

                filler = fill(disk)
                m["while-full"] = "w" * 200_000  # far more than a page: needs new WAL pages
                expected["while-full"] = "w" * 200_000
                with pytest.raises(StoreError, match="full"):
                    await node.flush()
                health = node.status().cache
                assert health.store_error is not None and "full" in health.store_error
                assert health.unsaved_docs == ("notes",)
                with pytest.raises(StoreError):  # still full: still honest
                    await node.flush()

                filler.unlink()
                m["after-free"] = "a"  # depends on the failed update (same client, next clock)
                expected["after-free"] = "a"
                await node.flush()
                health = node.status().cache
                assert health.store_error is None and health.unsaved_docs == ()
                assert health.failed_writes >= 1
            finally:
                await node.close()
            async with Node(cfg) as again:
                assert entries(again, "notes") == expected
                assert entries(again, "other") == {"x": "y"}
                assert again.status().cache.last_recovery is None


async def test_disk_full_at_close_raises_after_releasing_the_cache(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        cfg = node_config(disk, "a")
        async with asyncio.timeout(HANG):
            node = Node(cfg)
            await node.start()
            node.doc("d").get("m", type=pycrdt.Map)["k"] = "saved"
            await node.flush()
            filler = fill(disk)
            node.doc("d").get("m", type=pycrdt.Map)["lost"] = "x" * 200_000
            with pytest.raises(StoreError, match="not written"):
                await node.close()
            filler.unlink()
            async with Node(cfg) as again:  # the lock was released despite the failure
                assert entries(again, "d") == {"k": "saved"}


@pytest.mark.parametrize("exc", [RuntimeError("boom"), MemoryError(), OSError(errno.EIO, "EIO")])
async def test_any_exception_in_the_store_worker_fails_the_write_not_the_thread(
    tmp_path: Path, exc: BaseException
) -> None:
    cfg = node_config(tmp_path, "a")
    store = SqliteStore(cfg.cache_path)
    node = Node(cfg, store=store)
    async with asyncio.timeout(HANG):
        await node.start()
        m = node.doc("d").get("m", type=pycrdt.Map)
        m["ok"] = "1"
        await node.flush()

        def fail(what: str) -> None:
            raise exc

        store.failpoint = fail
        m["bad"] = "2"
        with pytest.raises(StoreError):
            await node.flush()
        assert node.status().cache.store_error is not None
        store.failpoint = None
        m["later"] = "3"
        await node.flush()  # the worker lives on, and the gap is repaired
        assert node.status().cache.store_error is None
        await node.close()
        async with Node(cfg) as again:
            assert entries(again, "d") == {"ok": "1", "bad": "2", "later": "3"}


async def test_a_dead_store_worker_fails_every_call_instead_of_hanging(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    async with asyncio.timeout(HANG):
        await store.open()
        await store.append("d", b"\x00\x00")

        def die(what: str) -> None:
            raise SystemExit("the worker thread dies")  # not an Exception: ends the thread

        store.failpoint = die
        with pytest.raises(StoreError, match="worker"):
            await store.append("d", b"\x00\x00")
        with pytest.raises(StoreError, match="worker"):
            await store.load("d")
        await store.close()  # returns, and releases the lock
    async with SqliteStore(tmp_path) as again:
        assert await again.docs() == ["d"]


def _remount_ro(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


@pytest.mark.parametrize("existing", [False, True])
async def test_read_only_cache_dir_fails_start_with_a_store_error(
    tmp_path: Path, existing: bool
) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        cfg = node_config(disk, "a")
        cfg.cache_path.mkdir()
        if existing:
            async with Node(cfg) as node:
                node.doc("d").get("m", type=pycrdt.Map)["k"] = "v"
        _remount_ro(disk)
        node = Node(cfg)
        with pytest.raises(StoreError, match="read-only") as info:
            await node.start()
        assert str(cfg.cache_path) in str(info.value)
        assert isinstance(info.value.__cause__, OSError)  # the real reason, chained


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_f7_cache_dir_is_0700_and_its_files_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask: without care, files come out 0644
    try:
        cfg = node_config(tmp_path, "fresh")
        async with Node(cfg) as node:
            node.doc("d").get("m", type=pycrdt.Map)["k"] = "secret content"
            await node.flush()
            files = [DB_NAME, f"{DB_NAME}-wal", LOCK_NAME, "device.key"]
            assert _mode(cfg.cache_path) == 0o700
            for name in files:
                assert _mode(cfg.cache_path / name) == 0o600, name

        # A cache made by an older version (or by hand) with loose modes is tightened on start.
        os.chmod(cfg.cache_path, 0o755)
        for name in (DB_NAME, f"{DB_NAME}-wal"):
            os.chmod(cfg.cache_path / name, 0o644)
        async with Node(cfg):
            assert _mode(cfg.cache_path) == 0o700
            for name in (DB_NAME, f"{DB_NAME}-wal"):
                assert _mode(cfg.cache_path / name) == 0o600, name

        # A database moved aside and re-created after damage is 0600 too.
        (cfg.cache_path / DB_NAME).write_bytes(b"not a database" * 500)
        os.chmod(cfg.cache_path / DB_NAME, 0o644)
        async with Node(cfg) as node:
            assert node.status().cache.last_recovery is not None
            for path in cfg.cache_path.iterdir():
                if path.name.startswith(DB_NAME):
                    assert _mode(path) == 0o600, path.name
    finally:
        os.umask(old)


async def test_a_live_cache_is_backed_up_consistently(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, "a")
    backup = tmp_path / "backup" / DB_NAME
    backup.parent.mkdir()
    async with asyncio.timeout(HANG), Node(cfg) as node:
        m = node.doc("notes").get("m", type=pycrdt.Map)
        for i in range(50):
            m[f"k{i}"] = f"v{i}"
        node.doc("big").get("m", type=pycrdt.Map)["x"] = "y" * 3_000_000  # multi-part
        await node.flush()
        await node.backup(backup)  # while the node runs: nothing stops for it
        expected = {"notes": entries(node, "notes"), "big": entries(node, "big")}
        m["after"] = "not in the backup"
    assert _mode(backup) == 0o600
    restored = node_config(tmp_path, "restored")
    restored.cache_path.mkdir(mode=0o700)
    os.replace(backup, restored.cache_path / DB_NAME)
    async with Node(restored) as again:
        assert again.status().cache.last_recovery is None
        assert {d: entries(again, d) for d in ("notes", "big")} == expected


async def test_damage_met_with_a_full_disk_destroys_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        cache = disk / "cache"
        async with SqliteStore(cache) as store:
            for i in range(40):
                await store.append(f"doc-{i:02d}", b"\x01\x01" + bytes([i]) * 300)  # any bytes
        db = cache / DB_NAME
        raw = bytearray(db.read_bytes())
        raw[16] ^= 0x10  # the page size: nothing reads the file as it is
        db.write_bytes(bytes(raw))
        filler = fill(disk)
        async with asyncio.timeout(HANG):
            with pytest.raises(StoreError, match="cannot rebuild the damaged local cache"):
                await SqliteStore(cache).open()
        assert db.read_bytes() == bytes(raw)  # left in place, untouched, for the next try
        assert sorted(p.name for p in cache.iterdir()) == sorted(
            [DB_NAME, f"{DB_NAME}-wal", LOCK_NAME]
        )
        filler.unlink()
        async with SqliteStore(cache) as store:  # with room again: salvaged, nothing lost
            (rec,) = store.recoveries
            assert (rec.lost, rec.unattributed, rec.everything) == ((), 0, False)
            assert len(await store.docs()) == 40
