"""The aiohttp websocket transport over real loopback sockets (IPv4 and IPv6)."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from unity_crdt.errors import ChannelClosed, LimitExceeded
from unity_crdt.ids import PeerAddress
from unity_crdt.net.channel import Channel
from unity_crdt.net.websocket import DEFAULT_PATH, Server, TransportLimits, dial, serve

CAP = TransportLimits().max_message
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.fixture(autouse=True)
async def no_leaks() -> AsyncIterator[None]:
    """Fail the test if it leaves tasks running or the loop reports an error (unclosed session)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    yield
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()
    await asyncio.sleep(0)
    leftover = asyncio.all_tasks() - {asyncio.current_task()}
    loop.set_exception_handler(None)
    assert not leftover, f"leaked tasks: {leftover}"
    assert not reported, f"loop reported: {[c.get('message') for c in reported]}"


async def echo(channel: Channel) -> None:
    """Server handler: send every message back until the link ends."""
    try:
        while True:
            await channel.send(await channel.recv())
    except ChannelClosed:
        pass


def ws_url(host: str, port: int) -> str:
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


async def raw_upgrade(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Complete a websocket upgrade by hand over a plain TCP socket, then return it (silent)."""
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(b"0123456789abcdef").decode()
    writer.write(
        (
            f"GET {DEFAULT_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_to_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


class SilentServer:
    """A TCP server that accepts websocket upgrades (or only connections), then never reads."""

    def __init__(self, *, upgrade: bool) -> None:
        self.upgrade = upgrade
        self.stop = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if self.upgrade:
            head = await reader.readuntil(b"\r\n\r\n")
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
            )
        await self.stop.wait()

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        for writer in self.writers:
            writer.transport.abort()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        await asyncio.sleep(0.01)  # let the handler tasks see stop and finish


async def wait_for_count(server: Server, count: int) -> None:
    async with asyncio.timeout(2):
        while server.connection_count != count:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_echo_roundtrip_ipv4_and_ipv6(host: str) -> None:
    async with await serve(host, 0, echo) as server:
        assert server.port > 0
        assert server.url == ws_url(host, server.port)
        channel = await dial(server.url)
        try:
            assert channel.remote == PeerAddress(host, server.port, "ws")
            await channel.send(b"hello \x00\xff")
            assert await channel.recv() == b"hello \x00\xff"
            await channel.send(b"")
            assert await channel.recv() == b""
        finally:
            await channel.close()
        assert channel.closed
        await channel.close()  # idempotent


async def test_many_messages_arrive_in_order() -> None:
    count = 2000
    async with await serve("127.0.0.1", 0, echo) as server:
        channel = await dial(server.url)

        async def sender() -> None:
            for i in range(count):
                await channel.send(i.to_bytes(4, "big") * (1 + i % 50))

        send_task = asyncio.create_task(sender())
        got = [await channel.recv() for _ in range(count)]
        await send_task
        await channel.close()
    assert [int.from_bytes(m[:4], "big") for m in got] == list(range(count))
    assert all(len(m) == 4 * (1 + i % 50) for i, m in enumerate(got))


async def test_message_at_cap_passes_and_over_cap_closes_the_receiver() -> None:
    seen: list[tuple[str, int | None]] = []

    async def handler(channel: Channel) -> None:
        try:
            while True:
                await channel.send(await channel.recv())
        except ChannelClosed as exc:
            seen.append((str(exc), getattr(channel, "close_code", None)))

    async with await serve("127.0.0.1", 0, handler) as server:
        channel = await dial(server.url)
        try:
            big = bytes(range(256)) * (CAP // 256) + b"\x07" * (CAP % 256)
            assert len(big) == CAP
            await channel.send(big)
            assert await channel.recv() == big
            # The sender refuses over-cap messages itself and the link stays usable.
            with pytest.raises(LimitExceeded):
                await channel.send(big + b"!")
            await channel.send(b"still fine")
            assert await channel.recv() == b"still fine"
        finally:
            await channel.close()

        # A peer with a looser cap sends one: the receiver closes with 1009 (message too big).
        loose = await dial(server.url, limits=TransportLimits(max_message=2 * CAP))
        try:
            await loose.send(big + b"!")
            with pytest.raises(ChannelClosed):
                await loose.recv()
            assert getattr(loose, "close_code", None) == 1009
        finally:
            await loose.close()
        await wait_for_count(server, 0)
    assert len(seen) == 2
    assert seen[1][1] == 1009
    assert "big" in seen[1][0].lower() or "limit" in seen[1][0].lower()


async def test_text_frame_closes_the_channel_with_1003() -> None:
    errors: list[str] = []

    async def handler(channel: Channel) -> None:
        try:
            await channel.recv()
        except ChannelClosed as exc:
            errors.append(str(exc))
            assert channel.closed

    async with (
        await serve("127.0.0.1", 0, handler) as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(server.url + DEFAULT_PATH) as ws,
    ):
        await ws.send_str("hello")
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1003
    assert len(errors) == 1 and "text" in errors[0]


async def test_compression_is_never_negotiated() -> None:
    async with (
        await serve("127.0.0.1", 0, echo) as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(server.url + DEFAULT_PATH, compress=15) as ws,
    ):
        assert ws.compress == 0  # the server did not accept permessage-deflate
        await ws.send_bytes(b"a" * 10_000)
        assert await ws.receive_bytes() == b"a" * 10_000

    # And the dialer never offers it.
    offered: list[str | None] = []

    async def handle(request: web.Request) -> web.WebSocketResponse:
        offered.append(request.headers.get("Sec-WebSocket-Extensions"))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get(DEFAULT_PATH, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        channel = await dial(f"ws://127.0.0.1:{port}")
        with pytest.raises(ChannelClosed):
            await channel.recv()
    finally:
        await runner.cleanup()
    assert offered == [None]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_server_close_is_prompt_with_half_open_clients(host: str) -> None:
    stuck = asyncio.Event()  # never set: a handler that stopped reading

    handlers: list[Channel] = []

    async def handler(channel: Channel) -> None:
        handlers.append(channel)
        if len(handlers) == 1:
            await echo(channel)  # blocked in recv() when the server closes
        else:
            await stuck.wait()  # not reading at all: must be cancelled

    server = await serve(host, 0, handler)
    channel = await dial(server.url)
    await channel.send(b"ping")
    assert await channel.recv() == b"ping"
    raw_reader, raw_writer = await raw_upgrade(host, server.port)  # answers nothing, ever
    await wait_for_count(server, 2)

    started = time.monotonic()
    await server.close()
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"server close took {elapsed:.2f} s"
    with pytest.raises(ChannelClosed):
        await channel.recv()
    assert channel.closed
    async with asyncio.timeout(1):
        await read_to_eof(raw_reader)  # the server dropped the half-open socket
    raw_writer.close()
    await channel.close()
    assert server.connection_count == 0
    with pytest.raises(ChannelClosed):
        await dial(server.url, timeout=1)
    await server.close()  # idempotent


async def test_dial_closed_port_fails_fast_and_clearly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(
        ChannelClosed, match=rf"127\.0\.0\.1:{port}.*cannot connect \(Connection refused"
    ):
        await dial(f"ws://127.0.0.1:{port}")
    assert time.monotonic() - started < 1.0


async def test_dial_times_out_on_a_server_that_never_answers() -> None:
    async with SilentServer(upgrade=False) as url:
        started = time.monotonic()
        with pytest.raises(ChannelClosed, match="timed out"):
            await dial(url, timeout=0.3)
        assert 0.25 < time.monotonic() - started < 1.5


async def test_dial_wrong_path_reports_http_status() -> None:
    async with await serve("127.0.0.1", 0, echo) as server:
        with pytest.raises(ChannelClosed, match="HTTP 404"):
            await dial(server.url + "/elsewhere")


@pytest.mark.parametrize(
    "limits",
    [
        TransportLimits(max_connections_per_ip=2),
        TransportLimits(max_connections=2),
    ],
    ids=["per-ip", "global"],
)
async def test_connection_limit_refuses_then_frees_the_slot(
    limits: TransportLimits, caplog: pytest.LogCaptureFixture
) -> None:
    async with await serve("127.0.0.1", 0, echo, limits=limits) as server:
        first, second = await dial(server.url), await dial(server.url)
        try:
            await wait_for_count(server, 2)
            with (
                caplog.at_level(logging.WARNING, logger="unity_crdt.net.websocket"),
                pytest.raises(ChannelClosed, match="503"),
            ):
                await dial(server.url)
            assert any("limit" in r.getMessage() for r in caplog.records)
            await first.close()
            await wait_for_count(server, 1)
            third = await dial(server.url)
            await third.send(b"admitted")
            assert await third.recv() == b"admitted"
            await third.close()
            await second.send(b"unaffected")
            assert await second.recv() == b"unaffected"
        finally:
            await first.close()
            await second.close()


async def test_handler_exception_is_logged_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def handler(channel: Channel) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await channel.recv()
            raise RuntimeError("handler bug")
        await echo(channel)

    async with await serve("127.0.0.1", 0, handler) as server:
        with caplog.at_level(logging.ERROR, logger="unity_crdt.net.websocket"):
            bad = await dial(server.url)
            await bad.send(b"trigger")
            with pytest.raises(ChannelClosed):
                await bad.recv()
            await bad.close()
        assert any("failed" in r.getMessage() and r.exc_info for r in caplog.records)
        good = await dial(server.url)
        await good.send(b"next")
        assert await good.recv() == b"next"
        await good.close()
    assert calls == 2


async def test_server_heartbeat_drops_a_silent_peer() -> None:
    ended: list[float] = []

    async def handler(channel: Channel) -> None:
        with pytest.raises(ChannelClosed):
            await channel.recv()
        ended.append(time.monotonic())

    limits = TransportLimits(heartbeat=0.4)
    async with await serve("127.0.0.1", 0, handler, limits=limits) as server:
        started = time.monotonic()
        reader, writer = await raw_upgrade("127.0.0.1", server.port)
        async with asyncio.timeout(3):
            await read_to_eof(reader)  # a ping arrives, then the server hangs up
        writer.close()
        await wait_for_count(server, 0)
    assert len(ended) == 1
    # ping after 0.4 s idle, no pong within 0.2 s: about 0.6 s.
    assert 0.4 <= ended[0] - started < 1.5


async def test_dialer_heartbeat_detects_a_dead_server() -> None:
    async with SilentServer(upgrade=True) as url:
        channel = await dial(url, limits=TransportLimits(heartbeat=0.4))
        started = time.monotonic()
        with pytest.raises(ChannelClosed, match=r"PONG|error"):
            async with asyncio.timeout(3):
                await channel.recv()
        assert 0.4 <= time.monotonic() - started < 1.5
        assert channel.closed
        with pytest.raises(ChannelClosed):
            await channel.send(b"late")


async def test_send_applies_backpressure_and_close_stays_bounded() -> None:
    chunk = b"\xaa" * (256 * 1024)
    async with SilentServer(upgrade=True) as url:
        channel = await dial(url, limits=TransportLimits(heartbeat=0))
        sent = 0
        blocked = False
        while sent < 256 * 2**20:
            try:
                await asyncio.wait_for(channel.send(chunk), 0.5)
            except TimeoutError:
                blocked = True
                break
            sent += len(chunk)
        assert blocked, "send never waited for the socket to drain"
        assert sent < 64 * 2**20  # kernel buffers + aiohttp's small write buffer, no more
        print(f"send blocked after {sent / 2**20:.2f} MiB")
        started = time.monotonic()
        await channel.close()
        assert time.monotonic() - started < 2.0
        assert channel.closed


async def test_on_channel_runs_concurrently_per_connection() -> None:
    both = asyncio.Barrier(2)

    async def handler(channel: Channel) -> None:
        async with asyncio.timeout(2):
            await both.wait()  # only passes if two handlers run at the same time
        await echo(channel)

    async with await serve("127.0.0.1", 0, handler) as server:
        one, two = await dial(server.url), await dial(server.url)
        for ch in (one, two):
            await ch.send(b"x")
            assert await ch.recv() == b"x"
            await ch.close()
