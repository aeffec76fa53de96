"""relay: the cloud channel through a real nats-server (JetStream), against raw nats-py.

Ours: two `Node`s on 127.0.0.1 with no mesh link (mDNS off, no peers), so every edit crosses
through NATS: observed, coalesced per loop turn, sealed (ChaCha20-Poly1305), queued in the
durable outbox, published to the group's JetStream stream with a Nats-Msg-Id, stored, pushed
to the other node's ordered consumer, opened, decoded and applied (and cached in SQLite).
Anchor, same process and same server: raw nats-py core publish -> subscribe of bytes of the
same sizes (no stream, no crypto, no CRDT). Catch-up: a node that missed 10,000 edits (one
stream message each) starts and reads them from the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pycrdt

from bench.bench_mesh import Arrivals, latency, pct, pump
from unity_crdt import Node, NodeConfig
from unity_crdt.crypto.envelope import RelaySealer
from unity_crdt.crypto.keys import derive_group_keys
from unity_crdt.sync import codec

from ._scripts import load

SECRET = "bench group secret: not for production"
LAT_SAMPLES = 400
LAT_WARMUP = 40
TP_UPDATES = 5000
TP_YIELD_EVERY = 16
TP_ROUNDS = 3
CATCHUP_EDITS = 10_000
TIMEOUT = 120.0


def _script() -> Any:
    return load("nats")


def config(tmp: Path, name: str, url: str) -> NodeConfig:
    return NodeConfig(
        name=name, cache_dir=tmp / name, group_secret=SECRET, mdns=False, relay_url=url
    )


@contextlib.asynccontextmanager
async def relayed(tmp: Path, url: str, *names: str) -> AsyncIterator[list[Node]]:
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(Node(config(tmp, n, url))) for n in names]
        async with asyncio.timeout(TIMEOUT):
            while not all(n.status().relay.connected for n in nodes):  # type: ignore[union-attr]  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        yield nodes


def sealed_size(update: bytes) -> int:
    """How many bytes one update takes on the wire through our relay (one sealed part)."""
    sealer = RelaySealer(derive_group_keys(SECRET), "a" * 26)
    body = codec.encode(codec.Update("lat", update))
    return len(sealer.seal(sealer.updates_subject, body, b"f" * 8, 2**20)[0])


async def raw_latency(url: str, size: int, n: int) -> list[float]:
    """Raw nats-py: publish `size` bytes, wait until the subscriber on another connection has it."""
    pub, sub = await nats.connect(url), await nats.connect(url)
    got = asyncio.Event()
    when = [0.0]

    async def cb(msg: Any) -> None:
        when[0] = time.perf_counter()
        got.set()

    await sub.subscribe("raw.lat", cb=cb)
    await sub.flush()
    out, lost = [], 0
    payload = bytes(size)
    for _ in range(n):
        got.clear()
        t0 = time.perf_counter()
        await pub.publish("raw.lat", payload)
        try:  # core NATS is at-most-once: a message can be dropped, and nothing resends it
            await asyncio.wait_for(got.wait(), 1.0)
        except TimeoutError:
            lost += 1
            continue
        out.append(when[0] - t0)
    if lost:
        print(f"  (raw nats-py lost {lost} of {n} latency messages; left out)")
    await pub.close()
    await sub.close()
    return out


async def raw_throughput(url: str, sizes: list[int]) -> float:
    """Raw nats-py: publish one message per update size (a yield every 16), until all arrived."""
    pub, sub = await nats.connect(url), await nats.connect(url)
    done = asyncio.Event()
    count = [0]

    async def cb(msg: Any) -> None:
        count[0] += 1
        if count[0] == len(sizes):
            done.set()

    await sub.subscribe("raw.tp", cb=cb, pending_msgs_limit=len(sizes) * 2)
    await sub.flush()
    started = time.perf_counter()
    for i, size in enumerate(sizes):
        await pub.publish("raw.tp", bytes(size))
        if i % TP_YIELD_EVERY == TP_YIELD_EVERY - 1:
            await asyncio.sleep(0)
    await pub.flush()
    await asyncio.wait_for(done.wait(), TIMEOUT)
    took = time.perf_counter() - started
    await pub.close()
    await sub.close()
    return len(sizes) / took


async def stream_messages(url: str) -> int:
    """How many messages the streams on this server hold (read with a raw client)."""
    nc = await nats.connect(url)
    try:
        return sum(info.state.messages for info in await nc.jetstream().streams_info())
    finally:
        await nc.close()


async def edit_ceiling(doc: pycrdt.Doc[Any]) -> float:
    """Updates/s of the bench's edits on a node: transactions, observed, cached."""
    text = doc.get("t", type=pycrdt.Text)
    started = time.perf_counter()
    for i in range(TP_UPDATES):
        text.insert(i, "x")
        if i % TP_YIELD_EVERY == TP_YIELD_EVERY - 1:
            await asyncio.sleep(0)
    return TP_UPDATES / (time.perf_counter() - started)


def update_sizes(n: int) -> list[int]:
    """The byte sizes of n one-char insert transactions, as the bench makes them."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    text = doc.get("t", type=pycrdt.Text)
    sizes: list[int] = []
    doc.observe(lambda e: sizes.append(len(e.update)))
    for i in range(n):
        text.insert(i, "x")
    return sizes


async def bench(tmp: Path, url: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with relayed(tmp, url, "a", "b") as (a, b):
        # -- latency ---------------------------------------------------------------------
        await latency(a.doc("lat"), b.doc("lat"), LAT_WARMUP)
        probe = a.doc("probe")
        sizes: list[int] = []
        probe.observe(lambda e: sizes.append(len(e.update)))
        probe.get("t", type=pycrdt.Text).insert(0, "x")
        wire = sealed_size(bytes(sizes[0]))
        ours, raw = [], []
        for _ in range(2):  # take turns, so background load hits both alike
            ours += await latency(a.doc("lat"), b.doc("lat"), LAT_SAMPLES // 2)
            raw += await raw_latency(url, wire, LAT_SAMPLES // 2)
        p_ours, p_raw = pct(ours, 0.5), pct(raw, 0.5)
        print(f"latency, {LAT_SAMPLES} one-char inserts, node A -> NATS -> node B:")
        print(f"  ours  p50 {p_ours:6.3f} ms  p99 {pct(ours, 0.99):6.3f} ms")
        print(
            f"  raw nats-py pub->sub of {wire} B  p50 {p_raw:6.3f} ms  p99 {pct(raw, 0.99):6.3f} ms"
        )
        print(f"  ours - raw p50: {p_ours - p_raw:+.3f} ms (goal <= +1 ms)")
        rows.append(
            {
                "metric": "relay_latency_p50_ms",
                "p50": round(p_ours, 3),
                "p99": round(pct(ours, 0.99), 3),
                "raw_p50": round(p_raw, 3),
                "added_ms": round(p_ours - p_raw, 3),
                "p50_ratio_vs_raw": round(p_ours / p_raw, 2),
                "goal": "<= raw p50 + 1 ms",
            }
        )
        # -- throughput ------------------------------------------------------------------
        rates, raws = [], []
        sizes_tp = update_sizes(TP_UPDATES)
        for r in range(TP_ROUNDS):

            async def settle() -> None:
                await asyncio.gather(a.flush(), b.flush())

            rate, _ = await pump(a.doc(f"tp{r}"), [b.doc(f"tp{r}")], settle)
            rates.append(rate)
            raws.append(await raw_throughput(url, sizes_tp))
        ours_tp, raw_tp = statistics.median(rates), statistics.median(raws)
        solo = NodeConfig(name="solo", cache_dir=tmp / "solo", group_secret=SECRET, mdns=False)
        async with Node(solo) as alone:  # no link, no relay: what the edits alone cost
            ceiling = await edit_ceiling(alone.doc("ceiling"))
        print(
            f"throughput, {TP_UPDATES} one-char transactions (a yield every {TP_YIELD_EVERY}), "
            f"median of {TP_ROUNDS}:"
        )
        print(f"  ours {ours_tp:8,.0f} updates/s   raw nats-py {raw_tp:8,.0f} msgs/s")
        print(f"  ours / raw: {ours_tp / raw_tp:.2f}x (goal >= 0.5x)")
        print(f"  ceiling: the same edits on one node, sent nowhere: {ceiling:,.0f} updates/s")
        rows.append(
            {
                "metric": "relay_throughput_updates_per_s",
                "value": round(ours_tp),
                "raw": round(raw_tp),
                "ratio_vs_raw": round(ours_tp / raw_tp, 2),
                "edit_ceiling": round(ceiling),
                "goal": ">= 0.5x",
            }
        )
        # -- catch-up --------------------------------------------------------------------
        text = a.doc("catchup").get("t", type=pycrdt.Text)
        before = await stream_messages(url)
        async with asyncio.timeout(TIMEOUT):
            for i in range(CATCHUP_EDITS):
                text.insert(i, "x")
                await asyncio.sleep(0)  # the node hands the edit to the relay
                # Typed, not pasted: each edit is acknowledged before the next (so none are
                # merged), one stream message per edit, the worst case for the reader.
                while a.status().relay.outbox:  # type: ignore[union-attr]  # noqa: ASYNC110
                    await asyncio.sleep(0)
        messages = await stream_messages(url) - before
        started = time.perf_counter()
        async with Node(config(tmp, "c", url)) as c:
            arrivals = Arrivals(c.doc("catchup"))
            done = await arrivals.until(CATCHUP_EDITS)
            took = done - started
    print(
        f"catch-up: a new node read {CATCHUP_EDITS:,} missed edits ({messages:,} stream "
        f"messages) in {took:.2f} s (goal < 2 s)"
    )
    rows.append(
        {
            "metric": "relay_catchup_10k_edits_s",
            "value": round(took, 3),
            "messages": messages,
            "goal": "< 2 s",
        }
    )
    return rows


async def main() -> list[dict[str, Any]]:
    """Start a nats-server, run every relay measurement and its anchor, return the rows."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    try:
        with _script().NatsServer(tmp / "nats") as server:
            return await bench(tmp, server.url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
