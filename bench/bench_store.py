"""local_cache: durable appends/s and cold load, SqliteStore vs pycrdt-store's SQLiteYStore.

Both stores get the same small updates (real keystrokes of the automerge-paper trace). The
anchor is `pycrdt.store.SQLiteYStore` 0.1.5 with its defaults: squashing OFF (no
`squash_after_inactivity_of` / `squash_history_older_than`), a checkpoint every 100 writes,
SQLite's default rollback journal. Load is also compared with bare pycrdt applying the
compacted state (`Doc().apply_update(full_state)`). Disk caches are warm in every case.

The cold load is broken down: `CacheDb.open()` alone (LOCK, SQLite open, the snapshot read
with its CRC; what SqliteStore runs on the executor) and what is left over: the thread
hand-offs (executor wake-up, event-loop wake-up) and the Python glue around them.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pycrdt
from pycrdt.store import SQLiteYStore

from unity_crdt.store._compaction import COMPACT_MIN_BYTES, COMPACT_MIN_ROWS
from unity_crdt.store._engine import CacheDb
from unity_crdt.store.sqlite import PRELOAD_BYTES, SqliteStore

TRACE = Path(__file__).resolve().parents[1] / "tests" / "data" / "automerge-paper.json.gz"
HISTORY = 100_000
DOC = "bench/paper"
CONCURRENCY = 64
SEQ_OURS, SEQ_THEIRS = 3000, 600
CONC_OURS, CONC_THEIRS = 30_000, 1200
LOAD_REPEATS = 31
ROUNDS = 6


def trace_updates(limit: int) -> tuple[list[bytes], bytes, bytes, str]:
    """Replay the first `limit` txns; return their updates, SQLiteYStore's last checkpoint
    (taken on its 100th, 200th, ... write, before storing that write), the full state, text."""
    with gzip.open(TRACE) as f:
        txns = json.load(f)["txns"][:limit]
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    text = doc.get("text", type=pycrdt.Text)
    updates: list[bytes] = []
    sub = doc.observe(lambda e: updates.append(bytes(e.update)))
    # pycrdt text indices count UTF-8 bytes, the trace counts code points: equal for ASCII.
    assert all(ins.isascii() for t in txns for _, _, ins in t["patches"]), "non-ASCII trace"
    checkpoint = b""
    for n, txn in enumerate(txns, 1):
        for pos, deleted, inserted in txn["patches"]:
            if deleted:
                del text[pos : pos + deleted]
            if inserted:
                text.insert(pos, inserted)
        if n == _checkpoint_cut(len(txns)) - 1:
            checkpoint = doc.get_update()
    doc.unobserve(sub)
    return updates, checkpoint, doc.get_update(), str(text)


def _checkpoint_cut(n: int) -> int:
    """How many writes SQLiteYStore had seen at its last checkpoint."""
    return n - n % 100


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


async def _appends(
    append: Callable[[bytes], Awaitable[None]], ups: list[bytes], conc: int
) -> float:
    """Seconds for `conc` concurrent appenders (each awaits its own appends in turn)."""
    chunks = [ups[i::conc] for i in range(conc)]

    async def run(chunk: list[bytes]) -> None:
        for u in chunk:
            await append(u)

    started = time.perf_counter()
    await asyncio.gather(*(run(c) for c in chunks))
    return time.perf_counter() - started


def _ystore(path: Path, name: str = DOC) -> SQLiteYStore:
    store = SQLiteYStore(name)
    store.db_path = str(path)
    return store


async def _initialized(ystore: object) -> None:
    """Wait until a started SQLiteYStore has created its schema."""
    assert isinstance(ystore, SQLiteYStore) and ystore.db_initialized is not None
    await ystore.db_initialized.wait()


async def bench_appends(updates: list[bytes], tmp: Path) -> list[dict[str, Any]]:
    """Durable appends/s, sequential and with 64 concurrent appenders.

    The two stores take turns in rounds, so the shared disk's fsync latency (other work on
    this machine) weighs on both alike; the rate is appends over time summed over rounds.
    """
    rows = []
    for label, conc, n_ours, n_theirs in (
        ("sequential", 1, SEQ_OURS, SEQ_THEIRS),
        (f"{CONCURRENCY} concurrent", CONCURRENCY, CONC_OURS, CONC_THEIRS),
    ):
        ours_s = theirs_s = 0.0
        async with (
            SqliteStore(tmp / f"ours-{conc}") as store,
            _ystore(tmp / f"theirs-{conc}.db") as ystore,
        ):
            await _initialized(ystore)
            for r in range(ROUNDS):
                a, b = n_ours // ROUNDS, n_theirs // ROUNDS
                ours_s += await _appends(
                    lambda u: store.append(DOC, u), updates[r * a : (r + 1) * a], conc
                )
                theirs_s += await _appends(ystore.write, updates[r * b : (r + 1) * b], conc)
            commits = store.commits
        ours, theirs = n_ours / ours_s, n_theirs / theirs_s
        ratio = ours / theirs
        print(
            f"appends {label:>14}: SqliteStore {ours:9,.0f}/s ({n_ours} in {commits} commits)  "
            f"SQLiteYStore {theirs:7,.0f}/s  ratio {ratio:5.1f}x  (goal >= 3x)"
        )
        rows.append(
            {
                "metric": f"appends_per_s_{label.replace(' ', '_')}",
                "sqlitestore": round(ours),
                "sqliteystore": round(theirs),
                "ratio": round(ratio, 2),
                "goal": ">= 3x",
            }
        )
    return rows


async def _fill_ours(path: Path, updates: list[bytes]) -> None:
    async with SqliteStore(path) as store:
        for i in range(0, len(updates), CONCURRENCY):
            # gather starts the appends in list order, so the log keeps causal order.
            await asyncio.gather(*(store.append(DOC, u) for u in updates[i : i + CONCURRENCY]))


def _fill_theirs(path: Path, updates: list[bytes], checkpoint: bytes) -> None:
    """Write SQLiteYStore's tables directly, as its write() would have after 100k calls
    (one row per update, a checkpoint every 100): 100k real writes would take minutes."""
    with sqlite3.connect(path) as conn:
        base = time.time() - len(updates)
        conn.executemany(
            "INSERT INTO yupdates VALUES (?, ?, ?, ?)",
            [(DOC, u, b"", base + i) for i, u in enumerate(updates)],
        )
        cut = _checkpoint_cut(len(updates))  # the checkpoint holds updates[: cut - 1]
        conn.execute(
            "INSERT OR REPLACE INTO ycheckpoints VALUES (?, ?, ?)",
            (DOC, checkpoint, base + cut - 1.5),
        )


async def _load_ours(path: Path) -> tuple[float, str]:
    started = time.perf_counter()
    async with SqliteStore(path) as store:
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        for blob in await store.load(DOC):
            doc.apply_update(blob)
        text = str(doc.get("text", type=pycrdt.Text))
        elapsed = time.perf_counter() - started
    return elapsed, text


async def _load_theirs(path: Path, full_log: bool) -> tuple[float, str]:
    started = time.perf_counter()
    async with _ystore(path) as ystore:
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        if full_log:
            async for update, *_ in ystore.read():
                doc.apply_update(update)
        else:
            await ystore.apply_updates(doc)
        text = str(doc.get("text", type=pycrdt.Text))
        elapsed = time.perf_counter() - started
    return elapsed, text


def _open_only(path: Path) -> tuple[float, str]:
    """CacheDb.open() on the calling thread: the store's cold start without any thread."""
    db = CacheDb(
        path,
        min_rows=COMPACT_MIN_ROWS,
        min_bytes=COMPACT_MIN_BYTES,
        preload_bytes=PRELOAD_BYTES,
        on_recover=lambda docs: "",
    )
    started = time.perf_counter()
    _, preloaded = db.open()
    elapsed = time.perf_counter() - started
    db.close()
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    for blob in preloaded[DOC]:
        doc.apply_update(blob)
    return elapsed, str(doc.get("text", type=pycrdt.Text))


def _load_bare(full_state: bytes) -> tuple[float, str]:
    started = time.perf_counter()
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.apply_update(full_state)
    text = str(doc.get("text", type=pycrdt.Text))
    return time.perf_counter() - started, text


async def bench_load(
    updates: list[bytes], checkpoint: bytes, full_state: bytes, expected: str, tmp: Path
) -> list[dict[str, Any]]:
    """Cold start of a doc with 100k updates of history."""
    ours_dir, theirs_db = tmp / "load-ours", tmp / "load-theirs.db"
    started = time.perf_counter()
    await _fill_ours(ours_dir, updates)
    fill_s = time.perf_counter() - started
    async with _ystore(theirs_db) as ystore:  # let it create its own schema
        await _initialized(ystore)
    _fill_theirs(theirs_db, updates, checkpoint)

    runs: list[tuple[str, int, Callable[[], Awaitable[tuple[float, str]]]]] = [
        ("bare", LOAD_REPEATS, lambda: asyncio.sleep(0, _load_bare(full_state))),
        ("ours", LOAD_REPEATS, lambda: _load_ours(ours_dir)),
        ("open", LOAD_REPEATS, lambda: asyncio.sleep(0, _open_only(ours_dir))),
        ("ckpt", LOAD_REPEATS // 2, lambda: _load_theirs(theirs_db, False)),
        ("log", 3, lambda: _load_theirs(theirs_db, True)),  # seconds each
    ]
    results: dict[str, list[float]] = {key: [] for key, _, _ in runs}
    for i in range(LOAD_REPEATS):
        # Interleaved, so a slow moment of the shared machine hits every contender alike.
        for key, repeats, run in runs:
            if i < repeats:
                gc.collect()  # so no collection of the 100k updates lands inside a timing
                elapsed, text = await run()
                assert text == expected, f"{key}: wrong content"
                results[key].append(elapsed)
    # Worst case after a crash: a log tail just under the compaction trigger, read warm.
    async with SqliteStore(ours_dir) as store:
        for u in updates[-900:]:  # re-applying known updates is harmless and costs the same
            await store.append(DOC, u)
        tail_s = []
        for _ in range(5):
            started = time.perf_counter()
            doc: pycrdt.Doc[Any] = pycrdt.Doc()
            for blob in await store.load(DOC):
                doc.apply_update(blob)
            tail_s.append(time.perf_counter() - started)
    bare, ours = _median_ms(results["bare"]), _median_ms(results["ours"])
    ckpt, log = _median_ms(results["ckpt"]), _median_ms(results["log"])
    tail = _median_ms(tail_s)
    open_ms = _median_ms(results["open"])
    size = (ours_dir / "store.sqlite3").stat().st_size
    print(
        f"load: history {len(updates):,} updates, state {len(full_state):,} B, "
        f"text {len(expected):,} chars; SqliteStore filled by {len(updates):,} appends "
        f"in {fill_s:.1f} s (gathers of {CONCURRENCY}), file {size:,} B"
    )
    lines = [
        ("bare pycrdt Doc().apply_update(state)", bare, ""),
        ("SqliteStore open+load+apply (snapshot)", ours, " (goal <= 1.5x)"),
        ("  of which CacheDb.open(), no thread", open_ms, " (lock, SQLite open, read)"),
        ("  of which thread hand-offs and glue", ours - bare - open_ms, ""),
        ("SqliteStore load+apply, 900-row tail, warm", tail, " (worst case after a crash)"),
        ("SQLiteYStore start+apply_updates (ckpt)", ckpt, ""),
        ("SQLiteYStore start+read() whole log", log, ""),
    ]
    for label, ms, note in lines:
        print(f"  {label:<44} {ms:9.2f} ms  {ms / bare:6.2f}x bare{note}")
    return [
        {"metric": "load_ms_bare_pycrdt", "value": round(bare, 3)},
        {
            "metric": "cold_load_ms_sqlitestore",
            "value": round(ours, 3),
            "ratio_vs_bare": round(ours / bare, 2),
            "goal": "<= 1.5x",
        },
        {"metric": "cold_load_ms_cachedb_open_only", "value": round(open_ms, 3)},
        {"metric": "cold_load_ms_thread_handoffs", "value": round(ours - bare - open_ms, 3)},
        {"metric": "load_ms_sqlitestore_900_row_tail", "value": round(tail, 3)},
        {"metric": "cold_load_ms_sqliteystore_checkpoint", "value": round(ckpt, 3)},
        {"metric": "cold_load_ms_sqliteystore_full_log", "value": round(log, 3)},
    ]


async def _main() -> list[dict[str, Any]]:
    print("anchor: pycrdt-store SQLiteYStore 0.1.5, squashing OFF, default checkpoints (100)")
    started = time.perf_counter()
    updates, checkpoint, full_state, expected = trace_updates(HISTORY)
    print(
        f"replayed {len(updates):,} automerge-paper txns in {time.perf_counter() - started:.1f} s"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        rows = await bench_appends(updates, tmp)
        rows += await bench_load(updates, checkpoint, full_state, expected, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> list[dict[str, Any]]:
    """Run the store benchmark and return its rows."""
    return asyncio.run(_main())


if __name__ == "__main__":
    main()
