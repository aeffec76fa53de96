"""sync: the sync core at real sizes, each figure beside bare pycrdt doing the same work.

- fresh peer, 20,000 small docs: first link to "the peer holds every doc" (goal < 5 s); the
  anchor is bare pycrdt encoding each doc's state and applying it to a fresh doc.
- fresh peer, one 50 MB doc (goal < 3 s and <= 2x bare pycrdt encode + apply of that state).
- catch-up bytes: three nodes make 10,000 offline edits each in one shared doc, then meet at
  once: bytes received on all links over the minimal diff (each node's missing part of the
  merged state, as Yjs encodes it), goal <= 1.2x.
- the automerge-paper trace replayed through a node with a durable cache and one linked peer
  (in another process, as a peer is), until that peer holds the final text, over bare pycrdt
  replaying the same trace in this process (goal <= 2x); plus memory per idle doc.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pycrdt

from unity_crdt import Node, NodeConfig
from unity_crdt.sync.yjs import read_state_vector

SECRET = "bench group secret: not for production"
TRACE = Path(__file__).resolve().parents[1] / "tests" / "data" / "automerge-paper.json.gz"
DOCS = 20_000
BIG_MB = 50
OFFLINE_EDITS = int(os.environ.get("BENCH_OFFLINE_EDITS", "10000"))
TIMEOUT = 300.0


def _config(tmp: Path, name: str, **kw: Any) -> NodeConfig:
    return NodeConfig(name=name, cache_dir=tmp / name, group_secret=SECRET, mdns=False, **kw)


async def _until(check: Any, what: str) -> None:
    deadline = time.perf_counter() + TIMEOUT
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


def _text(node: Node, doc: str, root: str = "t") -> pycrdt.Text:
    text: pycrdt.Text = node.doc(doc).get(root, type=pycrdt.Text)
    return text


# -- fresh peers ---------------------------------------------------------------------------


async def bench_many_docs(tmp: Path) -> list[dict[str, Any]]:
    async with Node(_config(tmp, "many-a")) as a:
        for i in range(DOCS):
            _text(a, f"doc/{i:05d}").insert(0, f"content of doc {i}")
            if i % 1000 == 999:
                await asyncio.sleep(0)
        await a.flush()
        states = [a.doc(f"doc/{i:05d}").get_update() for i in range(DOCS)]
        started = time.perf_counter()
        for state in states:  # the anchor: bare pycrdt moving the same states
            pycrdt.Doc().apply_update(state)
        bare = time.perf_counter() - started
        started = time.perf_counter()
        async with Node(_config(tmp, "many-b", peers=(a.url,))) as b:
            await _until(lambda: len(b.docs) == DOCS, "20,000 docs")
            held = time.perf_counter() - started
            await b.flush()
            durable = time.perf_counter() - started
    print(
        f"20,000 docs to a fresh peer: held {held:.2f} s, durable {durable:.2f} s; "
        f"bare pycrdt apply of the same states {bare:.2f} s"
    )
    return [
        {
            "metric": "fresh peer, 20,000 docs, held (s)",
            "ours": round(held, 2),
            "durable_s": round(durable, 2),
            "bare_apply_s": round(bare, 2),
            "ratio_vs_bare": round(held / bare, 2),
            "goal": "< 5 s",
        }
    ]


async def bench_big_doc(tmp: Path) -> list[dict[str, Any]]:
    chunk = "lorem ipsum dolor sit amet, ✓ " * 34_000  # about 1 MiB
    async with Node(_config(tmp, "big-a")) as a:
        text = _text(a, "big")
        for _ in range(BIG_MB):
            text += chunk
        await a.flush()
        started = time.perf_counter()
        state = a.doc("big").get_update()
        pycrdt.Doc().apply_update(state)
        bare = time.perf_counter() - started
        started = time.perf_counter()
        async with Node(_config(tmp, "big-b", peers=(a.url,))) as b:
            mirror = _text(b, "big")
            await _until(lambda: len(mirror) == len(text), "the big doc")
            held = time.perf_counter() - started
    mb = len(state) / 2**20
    print(
        f"{mb:.0f} MiB doc to a fresh peer: {held:.2f} s; bare encode + apply {bare:.2f} s "
        f"({held / bare:.2f}x)"
    )
    return [
        {
            "metric": f"fresh peer, one {mb:.0f} MiB doc (s)",
            "ours": round(held, 2),
            "bare_s": round(bare, 2),
            "ratio_vs_bare": round(held / bare, 2),
            "goal": "< 3 s and <= 2x",
        }
    ]


# -- catch-up -------------------------------------------------------------------------------


async def bench_catch_up(tmp: Path) -> list[dict[str, Any]]:
    names = ["cu-a", "cu-b", "cu-c"]
    for i, name in enumerate(names):  # offline: each edits the shared doc alone
        async with Node(_config(tmp, name)) as node:
            text = _text(node, "shared")
            for k in range(OFFLINE_EDITS):
                if k % 10 == 9 and len(text) > 20:
                    del text[5:8]
                else:
                    text.insert(len(text) // 2, f"{'abc'[i]}{k % 10}")
                if k % 256 == 0:
                    await asyncio.sleep(0)
            await node.flush()
    merged = pycrdt.Doc()
    local: dict[str, bytes] = {}
    for name in names:
        async with Node(_config(tmp, name)) as node:
            local[name] = node.doc("shared").get_state()
            merged.apply_update(node.doc("shared").get_update())
    minimal = sum(len(merged.get_update(sv)) for sv in local.values())
    ports = _free_ports(len(names))
    urls = [f"ws://127.0.0.1:{port}" for port in ports]
    # Everyone meets at once; each pair is dialled by one side only, so no link is dropped as
    # a duplicate (its bytes would vanish from the live links' counters).
    nodes = [
        Node(_config(tmp, n, port=port, peers=tuple(urls[:k])))
        for k, (n, port) in enumerate(zip(names, ports, strict=True))
    ]
    await asyncio.gather(*(node.start() for node in nodes))
    try:
        target = read_state_vector(merged.get_state())  # bytes order clients arbitrarily
        await _until(
            lambda: all(read_state_vector(n.doc("shared").get_state()) == target for n in nodes),
            "catch-up",
        )
        await asyncio.sleep(1.0)  # let acknowledgements settle
        wire = sum(p.bytes_in for n in nodes for p in n.status().peers)
    finally:
        for node in nodes:
            await node.close()
    print(
        f"catch-up, 3 nodes x {OFFLINE_EDITS:,} offline edits: {wire / 1e3:.0f} kB on the "
        f"wire, minimal diff {minimal / 1e3:.0f} kB ({wire / minimal:.2f}x)"
    )
    return [
        {
            "metric": "catch-up bytes, 3-node meeting",
            "wire_kb": round(wire / 1e3, 1),
            "minimal_kb": round(minimal / 1e3, 1),
            "ratio_vs_minimal": round(wire / minimal, 2),
            "goal": "<= 1.2x",
        }
    ]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


# -- the editing trace ---------------------------------------------------------------------

_PEER = textwrap.dedent(
    """
    import asyncio, sys, pycrdt
    from pathlib import Path
    from unity_crdt import Node, NodeConfig
    async def main():
        cfg = NodeConfig(name="peer", cache_dir=Path(sys.argv[1]), group_secret=sys.argv[2],
                         mdns=False, peers=(sys.argv[3],))
        async with Node(cfg) as node:
            text = node.doc("paper").get("t", type=pycrdt.Text)
            want = int(sys.argv[4])
            print("ready", flush=True)
            while len(str(text)) != want or str(text)[-200:] != sys.argv[5]:
                await asyncio.sleep(0.002)
            await node.flush()
            print("done", flush=True)
    asyncio.run(main())
    """
)


def _trace_ops() -> tuple[list[tuple[int, int, str]], str]:
    data = json.loads(gzip.decompress(TRACE.read_bytes()))
    ops = [(p[0], p[1], p[2]) for t in data["txns"] for p in t["patches"]]
    return ops, data["endContent"]


def _replay(doc: pycrdt.Doc[Any], ops: list[tuple[int, int, str]]) -> None:
    """One transaction per patch; positions are code points and the trace is ASCII."""
    text = doc.get("t", type=pycrdt.Text)
    for pos, deleted, inserted in ops:
        with doc.transaction():
            if deleted:
                del text[pos : pos + deleted]
            if inserted:
                text.insert(pos, inserted)


async def bench_trace(tmp: Path) -> list[dict[str, Any]]:
    ops, end = _trace_ops()
    assert end.isascii()
    started = time.perf_counter()
    bare_doc: pycrdt.Doc[Any] = pycrdt.Doc()
    _replay(bare_doc, ops)
    bare = time.perf_counter() - started
    assert str(bare_doc.get("t", type=pycrdt.Text)) == end
    async with Node(_config(tmp, "trace-a")) as a:
        peer = subprocess.Popen(  # noqa: ASYNC220 - a pipe read off the loop, below
            [
                sys.executable,
                "-c",
                _PEER,
                str(tmp / "trace-b"),
                SECRET,
                a.url,
                str(len(end)),
                end[-200:],
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert peer.stdout is not None
            await asyncio.to_thread(peer.stdout.readline)  # "ready"
            await a.wait_for_peers(1, timeout=30)
            doc = a.doc("paper")
            started = time.perf_counter()
            for i in range(0, len(ops), 64):  # an app yields to its loop now and then
                _replay(doc, ops[i : i + 64])
                await asyncio.sleep(0)
            await a.flush()
            line = await asyncio.wait_for(asyncio.to_thread(peer.stdout.readline), TIMEOUT)
            ours = time.perf_counter() - started
            assert line.strip() == "done"
        finally:
            peer.kill()
            peer.wait()
    print(
        f"automerge-paper trace ({len(ops):,} edits) through a node with a durable cache "
        f"and one linked peer: {ours:.2f} s; bare pycrdt replay {bare:.2f} s "
        f"({ours / bare:.2f}x)"
    )
    return [
        {
            "metric": "automerge-paper trace through a node + peer (s)",
            "ours": round(ours, 2),
            "bare_s": round(bare, 2),
            "ratio_vs_bare": round(ours / bare, 2),
            "goal": "<= 2x",
        }
    ]


async def bench_idle_docs(tmp: Path) -> list[dict[str, Any]]:
    process = psutil.Process()
    async with Node(_config(tmp, "idle")) as node:
        before = process.memory_info().rss
        for i in range(DOCS):
            _text(node, f"idle/{i:05d}").insert(0, f"a small doc {i}")
            if i % 1000 == 999:
                await asyncio.sleep(0)
        await node.flush()
        per_doc = (process.memory_info().rss - before) / DOCS
    print(f"memory per idle doc (20,000 small docs held): {per_doc / 1e3:.1f} kB")
    return [{"metric": "memory per idle doc (kB)", "ours": round(per_doc / 1e3, 1)}]


async def main() -> list[dict[str, Any]]:
    """Run every sync measurement with its anchor in this process; return the rows."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    try:
        rows = await bench_many_docs(tmp)
        rows += await bench_big_doc(tmp)
        rows += await bench_catch_up(tmp)
        rows += await bench_trace(tmp)
        rows += await bench_idle_docs(tmp)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
