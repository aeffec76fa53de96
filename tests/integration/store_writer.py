"""Subprocess helper for the store tests: hold the cache lock, or append until killed.

python store_writer.py hold CACHE_DIR         open the store, print "ready", wait for stdin EOF
python store_writer.py append CACHE_DIR RUN   append pycrdt updates forever, printing
                                              "RUN:SEQ" after each append returned
python store_writer.py node CACHE_DIR COUNT   a real Node: edit, flush(), print the edit's
                                              key ("ack-SEQ"), COUNT times, then close
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pycrdt

from unity_crdt.store.sqlite import SqliteStore

DOC = "crash/ünïcode ✓"
CONCURRENCY = 8


async def hold(cache_dir: str) -> None:
    """Keep the cache open until stdin closes."""
    async with SqliteStore(cache_dir):
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)


async def append(cache_dir: str, run: str) -> None:
    """Edit one doc from several tasks at once; announce each update once it is durable."""
    # Small thresholds so compactions happen often, and some kills land inside one.
    async with SqliteStore(cache_dir, compact_min_rows=150, compact_min_bytes=4096) as store:
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        for blob in await store.load(DOC):
            doc.apply_update(blob)
        text = doc.get("text", type=pycrdt.Text)
        entries = doc.get("map", type=pycrdt.Map)
        captured: list[bytes] = []
        sub = doc.observe(lambda event: captured.append(bytes(event.update)))
        counter = iter(range(10**9))

        async def worker() -> None:
            while True:
                seq = next(counter)
                key = f"{run}:{seq}"
                with doc.transaction():
                    entries[key] = f"é{seq}"
                    text.insert(0, str(seq % 10))  # ASCII only: pycrdt text indices are bytes
                    if len(text) > 400:
                        del text[100:160]
                await store.append(DOC, captured.pop())
                sys.stdout.write(key + "\n")
                sys.stdout.flush()

        print("ready", flush=True)
        try:
            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        finally:
            doc.unobserve(sub)


async def node(cache_dir: str, count: str) -> None:
    """Acknowledge each edit only once `Node.flush()` says it is durable."""
    from unity_crdt import Node, NodeConfig

    cfg = NodeConfig(name="writer", cache_dir=cache_dir, group_secret="durability " * 3, mdns=False)
    async with Node(cfg) as n:
        entries = n.doc("acks").get("map", type=pycrdt.Map)
        for seq in range(int(count)):
            key = f"ack-{seq:06d}"
            entries[key] = "x" * 64
            await n.flush()
            sys.stdout.write(key + "\n")
            sys.stdout.flush()


def main() -> None:
    """Dispatch on the first argument."""
    mode, cache_dir, *rest = sys.argv[1:]
    if mode == "hold":
        asyncio.run(hold(cache_dir))
    elif mode == "node":
        asyncio.run(node(cache_dir, rest[0]))
    else:
        asyncio.run(append(cache_dir, rest[0]))


if __name__ == "__main__":
    main()
