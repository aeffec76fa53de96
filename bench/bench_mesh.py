"""mesh: propagation latency and sustained throughput of the secure mesh vs a pycrdt relay.

Ours: real `Node`s on 127.0.0.1 (Noise XXpsk0 + AEAD on every frame, batched frames, every
update appended to each node's SQLite cache). Anchor, same process and same event loop:
pycrdt-websocket 0.16.5's `WebsocketServer` relaying between pycrdt `Provider` clients over
loopback websockets, unencrypted, no store. pycrdt-websocket only ships an `httpx-ws` channel
adapter and neither `httpx-ws` nor `websockets` is installed, so both ends of the anchor speak
through `AiohttpChannel` below, a dozen-line aiohttp version of pycrdt's `Channel` protocol
(with the send lock the shipped adapter has).

Arrival is seen by a doc observer on the receiving doc (it records the time); the waiter then
reads the text length outside the observer, as pycrdt requires. Set MESH_BENCH_PROFILE=1 to
also print a cProfile of one extra throughput round of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]
import pycrdt
from aiohttp import web
from pycrdt.websocket import WebsocketServer
from pycrdt.websocket.websocket_server import exception_logger

from unity_crdt import Node, NodeConfig
from unity_crdt.store.memory import MemoryStore

SECRET = "bench group secret: not for production"
LAT_SAMPLES = 500
LAT_WARMUP = 50
LAT_ROUNDS = 2  # systems take turns, so background load on the shared cores hits all alike
TP_UPDATES = 5000
TP_YIELD_EVERY = 16
TP_ROUNDS = 5
TP_PEERS = 4
LINE = 5
TIMEOUT = 60.0


# -- anchor: pycrdt-websocket relay over aiohttp ------------------------------------------------


class AiohttpChannel:
    """pycrdt's `Channel` protocol over an aiohttp websocket (server or client side)."""

    def __init__(
        self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, path: str
    ) -> None:
        self._ws = ws
        self._path = path
        self._lock = asyncio.Lock()

    @property
    def path(self) -> str:
        """The room name (the URL path)."""
        return self._path

    def __aiter__(self) -> AiohttpChannel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionError:
            raise StopAsyncIteration from None

    async def send(self, message: bytes) -> None:
        """Send one binary message."""
        async with self._lock:
            await self._ws.send_bytes(message)

    async def recv(self) -> bytes:
        """Receive one binary message; ConnectionError once the socket is closed."""
        msg = await self._ws.receive()
        if msg.type is aiohttp.WSMsgType.BINARY:
            return bytes(msg.data)
        raise ConnectionError(f"websocket ended: {msg.type.name}")


@contextlib.asynccontextmanager
async def relay() -> AsyncIterator[str]:
    """A pycrdt-websocket `WebsocketServer` behind aiohttp on loopback; yields its base URL."""
    server = WebsocketServer(exception_handler=exception_logger)

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await server.serve(AiohttpChannel(ws, request.path))
        return ws

    app = web.Application()
    app.router.add_get("/{room:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with server:
            yield f"ws://127.0.0.1:{port}"
            await runner.shutdown()
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def provider(base: str, room: str) -> AsyncIterator[pycrdt.Doc[Any]]:
    """A pycrdt `Provider` syncing a fresh doc with `room` on the relay; yields the doc."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{base}/{room}", max_msg_size=0) as ws,
        pycrdt.Provider(doc, AiohttpChannel(ws, f"/{room}")) as prov,
    ):
        await asyncio.wait_for(prov.synced.wait(), TIMEOUT)
        yield doc


# -- ours: nodes -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def nodes(
    tmp: Path,
    tag: str,
    dial: Callable[[int, list[Node]], tuple[str, ...]],
    count: int,
    memory: bool = False,
) -> AsyncIterator[list[Node]]:
    """Start `count` nodes in turn; node i dials `dial(i, started)`; wait until all linked.
    `memory`: in-memory caches instead of SQLite (a diagnostic: what durability costs)."""
    async with contextlib.AsyncExitStack() as stack:
        started: list[Node] = []
        for i in range(count):
            cfg = NodeConfig(
                name=f"{tag}{i}",
                cache_dir=tmp / f"{tag}{i}",
                group_secret=SECRET,
                mdns=False,
                peers=dial(i, started),
            )
            store = MemoryStore() if memory else None
            started.append(await stack.enter_async_context(Node(cfg, store=store)))
        links = {id(n): 0 for n in started}
        for i, n in enumerate(started):
            for url in dial(i, started[:i]):
                links[id(n)] += 1
                links[id(next(m for m in started if m.url == url))] += 1
        for n in started:
            await n.wait_for_peers(links[id(n)], timeout=TIMEOUT)
        yield started


# -- measuring ---------------------------------------------------------------------------------


class Arrivals:
    """Notices every non-empty transaction committed on a receiving doc, and when."""

    def __init__(self, doc: pycrdt.Doc[Any], root: str = "t") -> None:
        self.text = doc.get(root, type=pycrdt.Text)
        self.last = 0.0
        self._changed = asyncio.Event()
        self._doc = doc
        self._sub = doc.observe(self._on)

    def _on(self, event: pycrdt.TransactionEvent) -> None:
        # Inside the commit the doc is borrowed: only note the time and wake the waiter.
        self.last = time.perf_counter()
        self._changed.set()

    async def until(self, length: int) -> float:
        """Wait until the text holds `length` bytes; return when the last change landed."""
        async with asyncio.timeout(TIMEOUT):
            while len(self.text) < length:
                await self._changed.wait()
                self._changed.clear()
        return self.last

    def close(self) -> None:
        """Stop observing."""
        self._doc.unobserve(self._sub)


async def latency(writer: pycrdt.Doc[Any], receiver: pycrdt.Doc[Any], n: int) -> list[float]:
    """Insert one char at a time; each waits for the previous to arrive. Seconds per sample."""
    text, arrivals = writer.get("t", type=pycrdt.Text), Arrivals(receiver)
    base = len(text)
    await arrivals.until(base)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        text.insert(base + i, "x")
        out.append(await arrivals.until(base + i + 1) - t0)
    arrivals.close()
    return out


async def pump(
    writer: pycrdt.Doc[Any],
    receivers: list[pycrdt.Doc[Any]],
    settle: Callable[[], Awaitable[None]] | None = None,
) -> tuple[float, float]:
    """TP_UPDATES single-char transactions as fast as possible, until all arrived (and
    `settle()` returned, e.g. every cache flushed): (updates/s, process CPU s per update)."""
    text = writer.get("t", type=pycrdt.Text)
    watchers = [Arrivals(d) for d in receivers]
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(TP_UPDATES):
        text.insert(i, "x")
        if i % TP_YIELD_EVERY == TP_YIELD_EVERY - 1:
            await asyncio.sleep(0)
    await asyncio.gather(*(w.until(TP_UPDATES) for w in watchers))
    if settle is not None:
        await settle()
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
    for w in watchers:
        w.close()
    return TP_UPDATES / took, cpu / TP_UPDATES


def pct(samples: list[float], q: float) -> float:
    """The q-quantile in milliseconds (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def rss_mb() -> float:
    """This process's resident set size in MB."""
    return float(psutil.Process().memory_info().rss) / 2**20


# -- phases ------------------------------------------------------------------------------------


async def bench_latency(tmp: Path) -> list[dict[str, Any]]:
    """p50/p99 one-char propagation: node pair, relay pair, line of five nodes."""
    samples: dict[str, list[float]] = {"pair": [], "relay": [], "line": [], "line_mem": []}

    def in_line(i: int, started: list[Node]) -> tuple[str, ...]:
        return (started[i - 1].url,) if i else ()

    async with (
        nodes(tmp, "pair", lambda i, s: (s[0].url,) if i else (), 2) as pair,
        nodes(tmp, "line", in_line, LINE) as line,
        nodes(tmp, "mline", in_line, LINE, memory=True) as mline,
        relay() as base,
        provider(base, "latency") as doc_a,
        provider(base, "latency") as doc_b,
    ):
        per_round = LAT_SAMPLES // LAT_ROUNDS
        runs: dict[str, tuple[pycrdt.Doc[Any], pycrdt.Doc[Any]]] = {
            "pair": (pair[0].doc("lat"), pair[1].doc("lat")),
            "relay": (doc_a, doc_b),
            "line": (line[0].doc("lat"), line[-1].doc("lat")),
            "line_mem": (mline[0].doc("lat"), mline[-1].doc("lat")),
        }
        for w, r in runs.values():
            await latency(w, r, LAT_WARMUP)
        for _ in range(LAT_ROUNDS):
            for name, (w, r) in runs.items():
                samples[name] += await latency(w, r, per_round)
    p = {k: (pct(v, 0.5), pct(v, 0.99)) for k, v in samples.items()}
    per_hop = (p["line"][0] - p["pair"][0]) / (LINE - 2)
    labels = {
        "pair": "2 nodes (1 hop)",
        "relay": "relay A->server->B",
        "line": f"line of {LINE} ({LINE - 1} hops)",
        "line_mem": "same, in-memory caches",
    }
    print(f"latency, {LAT_SAMPLES} one-char inserts each (after {LAT_WARMUP} warm-up):")
    for k, (p50, p99) in p.items():
        print(
            f"  {labels[k]:<24} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  "
            f"p50 vs relay {p50 / p['relay'][0]:5.2f}x"
        )
    print(
        f"  added per relaying node (line p50 - pair p50) / {LINE - 2}: {per_hop:.3f} ms "
        "(goal < 1 ms)"
    )
    rows: list[dict[str, Any]] = [
        {
            "metric": f"latency_{k}_ms",
            "p50": round(v[0], 3),
            "p99": round(v[1], 3),
            "p50_ratio_vs_relay": round(v[0] / p["relay"][0], 2),
        }
        for k, v in p.items()
    ]
    rows[0]["goal"] = "p50 <= relay p50"
    rows.append(
        {"metric": "latency_added_per_relay_hop_ms", "value": round(per_hop, 3), "goal": "< 1 ms"}
    )
    return rows


async def bench_throughput(tmp: Path) -> list[dict[str, Any]]:
    """Sustained updates/s: writer node + 1 or 4 peers (durable) vs writer provider + relay."""
    runs: dict[str, list[tuple[float, float]]] = {
        "ours4": [],
        "ours1": [],
        "relay1": [],
        "relay4": [],
    }
    rss: dict[str, float] = {"before": rss_mb()}
    async with (
        nodes(tmp, "star", lambda i, s: (s[0].url,) if i else (), TP_PEERS + 1) as star,
        nodes(tmp, "duo", lambda i, s: (s[0].url,) if i else (), 2) as duo,
        relay() as base,
    ):

        async def run_ours(group: list[Node], r: int) -> tuple[float, float]:
            async def flush_all() -> None:
                await asyncio.gather(*(n.flush() for n in group))

            name = f"tp{r}"
            receivers = [n.doc(name) for n in group[1:]]
            return await pump(group[0].doc(name), receivers, flush_all)

        async def run_relay(r: int, receivers: int) -> tuple[float, float]:
            room = f"tp{r}-{receivers}"
            async with contextlib.AsyncExitStack() as stack:
                w = await stack.enter_async_context(provider(base, room))
                docs = [
                    await stack.enter_async_context(provider(base, room)) for _ in range(receivers)
                ]
                return await pump(w, docs)

        rss["setup"] = rss_mb()
        growth = {"ours": 0.0, "relay": 0.0}
        for r in range(TP_ROUNDS):
            for k, run in (
                ("ours4", run_ours(star, r)),
                ("relay4", run_relay(r, TP_PEERS)),
                ("ours1", run_ours(duo, r)),
                ("relay1", run_relay(r, 1)),
            ):
                before = rss_mb()
                runs[k].append(await run)
                growth[k[:-1]] += rss_mb() - before
        rss["after"] = rss_mb()
        if os.environ.get("MESH_BENCH_PROFILE"):
            await _profiled(run_ours(star, TP_ROUNDS))
    rate = {k: statistics.median(x for x, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) * 1e6 for k, v in runs.items()}
    labels = {
        "ours4": f"ours: writer -> {TP_PEERS} peers, durable",
        "relay4": f"relay: writer -> server -> {TP_PEERS} providers",
        "ours1": "ours: writer -> 1 peer, durable",
        "relay1": "relay: writer -> server -> 1 provider",
    }
    print(
        f"throughput, {TP_UPDATES} one-char transactions, a yield every {TP_YIELD_EVERY}, "
        f"median of {TP_ROUNDS} rounds (CPU: all threads of this process per update):"
    )
    for k in ("ours4", "relay4", "ours1", "relay1"):
        vs = f"ours {rate[k] / rate['relay' + k[-1]]:4.2f}x" if k.startswith("ours") else ""
        print(f"  {labels[k]:<40} {rate[k]:8,.0f} updates/s  {cpu[k]:6.0f} us CPU  {vs}")
    print("  goal: ours >= 3x the relay's updates/s")
    print(
        f"  process RSS: {rss['before']:.0f} MB before, {rss['setup']:.0f} MB with 7 nodes "
        f"+ relay up, {rss['after']:.0f} MB after {TP_ROUNDS * 4} runs (grew during ours "
        f"{growth['ours']:.0f} MB, during the relay's {growth['relay']:.0f} MB)"
    )
    return [
        {
            "metric": f"throughput_{k}_updates_per_s",
            "value": round(rate[k]),
            "cpu_us_per_update": round(cpu[k]),
            "rounds": [round(x) for x, _ in runs[k]],
            **(
                {"ratio_vs_relay": round(rate[k] / rate["relay" + k[-1]], 2), "goal": ">= 3x"}
                if k.startswith("ours")
                else {}
            ),
        }
        for k in ("ours4", "relay4", "ours1", "relay1")
    ] + [
        {
            "metric": "rss_mb",
            "before": round(rss["before"], 1),
            "setup": round(rss["setup"], 1),
            "after": round(rss["after"], 1),
            "growth_during_ours": round(growth["ours"], 1),
            "growth_during_relay": round(growth["relay"], 1),
        },
    ]


async def _profiled(run: Awaitable[tuple[float, float]]) -> None:
    """Run one throughput round of ours under cProfile; print the top functions."""
    prof = cProfile.Profile()
    prof.enable()
    rate, _ = await run
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(45)
    print(f"profiled round: {rate:,.0f} updates/s (slowed by the profiler)")
    print(out.getvalue())


async def main() -> list[dict[str, Any]]:
    """Run every mesh measurement and its anchor in this process; return the rows."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-mesh-"))
    try:
        rows = await bench_latency(tmp)
        rows += await bench_throughput(tmp)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
