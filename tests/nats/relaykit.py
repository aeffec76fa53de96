"""Helpers of the NATS tier: the server script, node configs, waiting on real systems."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pycrdt
import serverkit

from unity_crdt import Node, NodeConfig

SECRET = "relay test group secret: correct horse battery staple"

NodeFactory = Callable[..., Awaitable[Node]]


def load_script() -> ModuleType:
    """scripts/nats.py (serverkit.load_script)."""
    return serverkit.load_script("nats")


def relay_config(tmp: Path, name: str, relay: Any, **kw: Any) -> NodeConfig:
    """A test node: loopback, no mDNS, fast timers; `relay` is a URL, URLs, or a server."""
    if hasattr(relay, "urls"):
        relay = relay.urls
    elif hasattr(relay, "url"):
        relay = relay.url
    values: dict[str, Any] = dict(
        name=name,
        cache_dir=tmp / name,
        group_secret=SECRET,
        mdns=False,
        relay_url=relay,
        anti_entropy_interval=2.0,
        ping_interval=1.0,
        idle_timeout=5.0,
        reconnect_max=1.0,
    )
    values.update(kw)
    return NodeConfig(**values)


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> float:
    """Poll until check() is true; return the seconds it took, or fail naming `what`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}")
        await asyncio.sleep(0.01)
    return loop.time() - start


async def relay_up(*nodes: Node, timeout: float = 15.0) -> None:
    """Wait until every node's relay is connected and set up."""
    for node in nodes:
        await eventually(
            lambda n=node: bool(n.status().relay and n.status().relay.connected),  # type: ignore[union-attr]
            timeout,
            f"{node.config.name}'s relay to connect (status: {node.status().relay})",
        )


def text(node: Node, doc: str = "notes") -> str:
    """The doc's Text root "t" as a string."""
    return str(node.doc(doc).get("t", type=pycrdt.Text))


def append(node: Node, value: str, doc: str = "notes") -> None:
    """Append to the doc's Text root "t" (one transaction)."""
    t = node.doc(doc).get("t", type=pycrdt.Text)
    t += value


async def stream_messages(
    url: str | tuple[str, ...], credentials: dict[str, str] | None = None
) -> int:
    """How many messages the group streams on this server hold (read with a raw client)."""
    import nats

    nc = await nats.connect(url if isinstance(url, str) else list(url), **(credentials or {}))
    try:
        js = nc.jetstream()
        total = 0
        for info in await js.streams_info():
            if info.config.name and info.config.name.startswith("UCRDT_"):
                total += info.state.messages
        return total
    finally:
        await nc.close()


async def stream_msg_ids(url: str | tuple[str, ...]) -> list[str]:
    """The Nats-Msg-Id of every message in the group streams (read with a raw client)."""
    import nats
    from nats.js.api import DeliverPolicy

    nc = await nats.connect(url if isinstance(url, str) else list(url))
    ids: list[str] = []
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if not name.startswith("UCRDT_") or not info.state.messages:
                continue
            sub = await js.subscribe(
                (info.config.subjects or [""])[0],
                stream=name,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
            )
            for _ in range(info.state.messages):
                msg = await sub.next_msg(timeout=10)
                ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))
            await sub.unsubscribe()
        return ids
    finally:
        await nc.close()


async def server_subscriptions(server: Any) -> int:
    """How many subscriptions the server holds now (from its monitoring endpoint)."""
    import json
    import urllib.request

    url = f"http://{server.host}:{server.http_port}/subsz"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    return int(json.loads(body)["num_subscriptions"])
