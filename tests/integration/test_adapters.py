"""Adapters from outside the package: a transport and a checkpoint sink registered by scheme.

This module is what a contributor writes to add a WAN transport or a storage backend: one class
meeting the contract, one `register_*` call, nothing changed inside unity_crdt. The transport
here is length-prefixed frames over plain TCP (`lpt://host:port`); the sink keeps objects in a
dict (`kv://name`). Both pass the exported contract suites, then carry two real nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import pycrdt
import pytest
from meshkit import eventually, node_config

from unity_crdt import Node
from unity_crdt.checkpoint.format import Manifest, Passage, SearchHit, SearchQuery, SinkRecord
from unity_crdt.checkpoint.sinks import register_sink
from unity_crdt.config import NodeConfig
from unity_crdt.errors import ChannelClosed, CheckpointError
from unity_crdt.ids import PeerAddress
from unity_crdt.net.channel import Channel, Listener, OnChannel, register_transport
from unity_crdt.net.websocket import WebsocketTransport
from unity_crdt.testing import MemoryTransport, check_channel, check_sink

# ------------------------------------------------------------------ a transport: lpt://


class LptChannel:
    """Messages as 4-byte big-endian length + bytes on one TCP stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        host, port = writer.get_extra_info("peername")[:2]
        self._remote = PeerAddress(host, port, "lpt")
        self._closed = False

    @property
    def remote(self) -> PeerAddress:
        return self._remote

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise ChannelClosed("lpt channel closed")
        try:
            self._writer.write(len(data).to_bytes(4, "big") + data)
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            await self.close()
            raise ChannelClosed(f"lpt send failed: {exc}") from exc

    async def recv(self) -> bytes:
        try:
            size = int.from_bytes(await self._reader.readexactly(4), "big")
            return await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            await self.close()
            raise ChannelClosed("lpt channel closed by the peer") from exc

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()


class LptListener:
    def __init__(self, server: asyncio.Server, channels: set[LptChannel]) -> None:
        self._server, self._channels = server, channels
        host, port = server.sockets[0].getsockname()[:2]
        self._address = PeerAddress(host, port, "lpt")

    @property
    def address(self) -> PeerAddress:
        return self._address

    async def close(self) -> None:
        self._server.close()
        for channel in list(self._channels):
            await channel.close()
        await self._server.wait_closed()


class LptTransport:
    async def dial(self, address: PeerAddress, *, timeout: float) -> Channel:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address.host, address.port), timeout
            )
        except (OSError, TimeoutError) as exc:
            raise ChannelClosed(f"dial {address}: {exc}") from exc
        return LptChannel(reader, writer)

    async def listen(self, address: PeerAddress, on_channel: OnChannel) -> Listener:
        channels: set[LptChannel] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            channel = LptChannel(reader, writer)
            channels.add(channel)
            try:
                await on_channel(channel)
            finally:
                channels.discard(channel)
                await channel.close()

        server = await asyncio.start_server(handle, address.host, address.port)
        return LptListener(server, channels)


# ------------------------------------------------------------------ a sink: kv://

STORES: dict[str, dict[str, dict[str, object]]] = {}


class KvSink:
    """Manifests, chunks and passages in a dict of tenants (a stand-in for any object store).

    It has no search engine: it passes the contract with `search=False`.
    """

    def __init__(self, name: str) -> None:
        self.data = STORES.setdefault(name, {})

    async def put(self, tenant: str, records: Sequence[SinkRecord]) -> None:
        t = self.data.setdefault(tenant, {})
        for rec in records:  # chunks first, then the manifest
            t[f"chunks/{rec.manifest.object_id}"] = list(rec.chunks)
        for rec in records:
            t[f"manifest/{rec.manifest.object_id}"] = rec.manifest

    async def manifests(self, tenant: str, doc_keys: Sequence[str] | None = None) -> list[Manifest]:
        keys = None if doc_keys is None else set(doc_keys)
        out = []
        for key, m in self.data.get(tenant, {}).items():
            is_manifest = key.startswith("manifest/") and isinstance(m, Manifest)
            if is_manifest and (keys is None or m.doc_key in keys):  # type: ignore[union-attr]
                out.append(m)  # type: ignore[arg-type]
        return out

    async def chunks(self, tenant: str, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        t = self.data.get(tenant, {})
        return {m.object_id: list(t.get(f"chunks/{m.object_id}", [])) for m in manifests}  # type: ignore[call-overload]

    async def confirm(self, tenant: str, manifests: Sequence[Manifest]) -> set[str]:
        t = self.data.get(tenant, {})
        return {m.object_id for m in manifests if f"manifest/{m.object_id}" in t}

    async def delete(self, tenant: str, manifests: Sequence[Manifest]) -> None:
        t = self.data.get(tenant, {})
        for m in manifests:
            t.pop(f"manifest/{m.object_id}", None)
            t.pop(f"chunks/{m.object_id}", None)

    async def passage_ids(self, tenant: str, doc_keys: Sequence[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for key, p in self.data.get(tenant, {}).items():
            if key.startswith("passage/") and isinstance(p, Passage) and p.doc_key in doc_keys:
                out.setdefault(p.doc_key, set()).add(p.pid)
        return out

    async def put_passages(
        self, tenant: str, add: Sequence[Passage], remove: Mapping[str, Sequence[str]]
    ) -> None:
        t = self.data.setdefault(tenant, {})
        for p in add:
            t[f"passage/{p.doc_key}/{p.pid}"] = p
        for doc_key, pids in remove.items():
            for pid in pids:
                t.pop(f"passage/{doc_key}/{pid}", None)

    async def search(self, tenant: str, query: SearchQuery) -> list[SearchHit]:
        raise CheckpointError("kv:// has no search engine")

    async def close(self) -> None:
        pass


def kv_factory(url: str, config: NodeConfig | None) -> KvSink:
    return KvSink(url.removeprefix("kv://"))


register_transport("lpt", LptTransport)
register_sink("kv", kv_factory)


# ------------------------------------------------------------------ the contracts


async def test_lpt_transport_meets_the_channel_contract() -> None:
    await check_channel(LptTransport(), PeerAddress("127.0.0.1", 0, "lpt"))


async def test_websocket_and_memory_transports_meet_the_channel_contract() -> None:
    await check_channel(WebsocketTransport(), PeerAddress("127.0.0.1", 0, "ws"))
    await check_channel(MemoryTransport(), PeerAddress("a", 0, "mem"))


async def test_kv_sink_meets_the_sink_contract() -> None:
    await check_sink(lambda: KvSink("contract"), search=False)


async def test_channel_contract_catches_a_transport_that_reorders() -> None:
    class Reordering(MemoryTransport):
        async def dial(self, address: PeerAddress, *, timeout: float) -> Channel:
            channel = await super().dial(address, timeout=timeout)
            send = channel.send
            held: list[bytes] = []

            async def swapped(data: bytes) -> None:
                if len(data) == 2 and not held:  # hold one small message back
                    held.append(data)
                    return
                await send(data)
                while held:
                    await send(held.pop())

            channel.send = swapped  # type: ignore[method-assign]
            return channel

    with pytest.raises(AssertionError, match="out of order"):
        await check_channel(Reordering(), PeerAddress("a", 0, "mem"))


# ------------------------------------------------------------------ two nodes through them


async def test_two_nodes_link_and_checkpoint_through_registered_adapters(tmp_path: Path) -> None:
    sink_url = f"kv://nodes-{tmp_path.name}"
    a_cfg = node_config(tmp_path, "alice", transport="lpt", checkpoint_url=sink_url)
    async with Node(a_cfg) as a:
        assert a.url.startswith("lpt://127.0.0.1:")
        b_cfg = node_config(tmp_path, "bob", transport="lpt", peers=(a.url,))
        async with Node(b_cfg) as b:
            await b.wait_for_peers(1)
            assert b.peers[0].url == a.url
            a.doc("notes").get("body", type=pycrdt.Text).insert(0, "over lpt ✓")
            text = b.doc("notes").get("body", type=pycrdt.Text)
            await eventually(lambda: str(text) == "over lpt ✓", what="bob gets the edit")
            await a.checkpoint()
    # A fresh node restores what alice checkpointed, from the registered sink.
    c_cfg = node_config(tmp_path, "carol", transport="lpt", checkpoint_url=sink_url)
    async with Node(c_cfg) as c:
        assert await c.restore() == ["notes"]
        assert str(c.doc("notes").get("body", type=pycrdt.Text)) == "over lpt ✓"


async def test_adapters_passed_in_take_precedence(tmp_path: Path) -> None:
    mem = MemoryTransport()  # one instance shared by both nodes: they meet inside it
    sink = KvSink(f"passed-{tmp_path.name}")
    a_cfg = node_config(tmp_path, "alice", transport="mem", host="alice")
    async with Node(a_cfg, transports={"mem": mem}, sink=sink) as a:
        b_cfg = node_config(tmp_path, "bob", transport="mem", host="bob", peers=(a.url,))
        async with Node(b_cfg, transports={"mem": mem}) as b:
            await b.wait_for_peers(1)
            b.doc("d").get("t", type=pycrdt.Text).insert(0, "via memory")
            text = a.doc("d").get("t", type=pycrdt.Text)
            await eventually(lambda: str(text) == "via memory", what="alice gets the edit")
        await a.checkpoint()
    assert mem.dials >= 1
    assert any(k.startswith("manifest/") for t in sink.data.values() for k in t)
