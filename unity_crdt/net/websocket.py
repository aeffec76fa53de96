"""The websocket transport (schemes ws, wss) on aiohttp: `serve()` and `dial()` give Channels.

Nothing above it sees aiohttp types, and it knows nothing of encryption or the sync protocol.
`WebsocketTransport` is its `net.channel.Transport` face. wss is dial-only: peers are
authenticated and encrypted by the Noise handshake either way, so a TLS listener would add a
certificate to manage and nothing else (put a TLS proxy in front if a network demands it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from ..errors import ChannelClosed, ConfigError, LimitExceeded
from ..ids import PeerAddress
from ..serving import GatedSite, ListenLimits, SiteGate
from .channel import Channel, OnChannel

__all__ = [
    "DEFAULT_PATH",
    "Server",
    "TransportLimits",
    "WebsocketTransport",
    "dial",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/unity-crdt/v1"
_CLOSE_UNSUPPORTED = 1003  # RFC 6455: data type the endpoint cannot accept
_CLOSE_GOING_AWAY = 1001
_MAX_REASON_BYTES = 123  # a close frame payload is <= 125 bytes, 2 of them the code


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """Size, liveness and admission limits of the websocket transport."""

    max_message: int = 1 * 2**20 + 64  # one sealed frame: 1 MiB plaintext + header and tag
    heartbeat: float = 10.0  # idle seconds before a ping; no pong within half of it = dead
    max_connections: int = 256  # websockets, refused with HTTP 503 before the upgrade
    max_connections_per_ip: int = 32
    close_timeout: float = 1.0  # bound on a close handshake and on server shutdown
    # Raw TCP connections (any state), reset at accept time over these; see unity_crdt.serving.
    max_tcp: int = 512
    max_tcp_per_ip: int = 48
    request_timeout: float = 5.0  # from accept to the upgrade request's headers

    def __post_init__(self) -> None:
        if self.max_message < 1:
            raise ConfigError("max_message must be >= 1")
        if self.heartbeat < 0:
            raise ConfigError("heartbeat must be >= 0 (0 disables it)")
        if self.max_connections < 1 or self.max_connections_per_ip < 1:
            raise ConfigError("connection limits must be >= 1")
        if self.close_timeout <= 0:
            raise ConfigError("close_timeout must be > 0")
        ListenLimits(self.max_tcp, self.max_tcp_per_ip, self.request_timeout)  # validates


def _peername(peer: object, scheme: str) -> PeerAddress:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return PeerAddress(str(peer[0]), int(peer[1]), scheme)
    return PeerAddress("unknown", 0, scheme)


def _aiohttp_cap(limits: TransportLimits) -> int:
    # aiohttp rejects a message whose size *equals* max_msg_size; ours is inclusive.
    return limits.max_message + 1


_WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


class _WsChannel:
    """A `Channel` over one aiohttp websocket, server or client side."""

    def __init__(
        self,
        ws: _WebSocket,
        remote: PeerAddress,
        limits: TransportLimits,
        *,
        transport: asyncio.Transport | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._ws = ws
        self._remote = remote
        self._limits = limits
        self._transport = transport  # server side: aborted when a close handshake stalls
        self._session = session  # client side: owned, closed with the channel
        self._closed = False
        self._code: int | None = None  # the code we closed with, if we closed first
        self._close_done = False
        self._close_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()

    @property
    def remote(self) -> PeerAddress:
        """The peer's address as the socket reports it."""
        return self._remote

    @property
    def closed(self) -> bool:
        """Whether the link is closed or closing."""
        return self._closed or self._ws.closed

    @property
    def close_code(self) -> int | None:
        """The websocket close code once the link is closed (1009 = message too big)."""
        return self._code if self._code is not None else self._ws.close_code

    def __repr__(self) -> str:
        return f"<Channel {self.remote} {'closed' if self.closed else 'open'}>"

    async def send(self, data: bytes) -> None:
        """Send one binary message; waits for the socket to drain; raises ChannelClosed."""
        if len(data) > self._limits.max_message:
            raise LimitExceeded(
                f"message of {len(data)} bytes over the cap of {self._limits.max_message}"
            )
        if self.closed:
            await self.close()  # releases the dialer's session if the peer or heartbeat ended it
            raise ChannelClosed(f"channel to {self.remote} is closed")
        try:
            async with self._send_lock:  # one writer at a time keeps messages whole and ordered
                await self._ws.send_bytes(data)
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            await self.close()
            raise ChannelClosed(f"send to {self.remote} failed: {exc}") from exc

    async def recv(self) -> bytes:
        """Return the next binary message; raises ChannelClosed when the link ends."""
        if self._closed:
            raise ChannelClosed(f"channel to {self.remote} is closed")
        msg = await self._ws.receive()
        if msg.type is aiohttp.WSMsgType.BINARY:
            data: bytes = msg.data
            return data
        if msg.type is aiohttp.WSMsgType.TEXT:
            await self.close(_CLOSE_UNSUPPORTED, "binary messages only")
            raise ChannelClosed(f"{self.remote} sent a text message; channel closed")
        if msg.type is aiohttp.WSMsgType.ERROR:
            if isinstance(msg.data, aiohttp.WebSocketError):
                self._code = msg.data.code  # aiohttp already sent this close code
            reason = f"error: {msg.data}"
        elif msg.type is aiohttp.WSMsgType.CLOSE:
            extra = f": {msg.extra}" if msg.extra else ""
            reason = f"closed by peer (code {msg.data}{extra})"
        else:
            reason = f"closed (code {self.close_code})"
        await self.close()
        raise ChannelClosed(f"channel to {self.remote} {reason}")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the link (idempotent); bounded by close_timeout, then the socket is aborted."""
        self._closed = True
        if self._close_done:
            return
        async with self._close_lock:
            if self._close_done:
                return
            if self._code is None and not self._ws.closed:
                self._code = code
            # Cut to the frame limit without splitting a UTF-8 character.
            cut = reason.encode("utf-8")[:_MAX_REASON_BYTES]
            message = cut.decode("utf-8", "ignore").encode("utf-8")
            try:
                async with asyncio.timeout(self._limits.close_timeout):
                    await self._ws.close(code=code, message=message)
            except (TimeoutError, ConnectionError, aiohttp.ClientError):
                # A peer that never answers (or a full send buffer) must not hold us.
                if self._transport is not None:
                    self._transport.abort()
            finally:
                self._close_done = True
                if self._session is not None:
                    await self._session.close()


class Server:
    """A listening websocket endpoint; returned by `serve()`."""

    def __init__(
        self,
        on_channel: OnChannel,
        limits: TransportLimits,
        path: str,
        scheme: str = "ws",
    ) -> None:
        self._on_channel = on_channel
        self._limits = limits
        self._path = path
        self._runner: web.AppRunner | None = None
        self._channels: set[_WsChannel] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_ip: Counter[str] = Counter()
        self._active = 0
        self._closing = False
        self._scheme = scheme
        self.address = PeerAddress("unknown", 0, scheme)
        self.gate: SiteGate | None = None

    @property
    def connection_count(self) -> int:
        """Websockets currently admitted (including ones still upgrading)."""
        return self._active

    async def _start(self, host: str, port: int) -> None:
        limits = self._limits
        self.gate = SiteGate(
            ListenLimits(limits.max_tcp, limits.max_tcp_per_ip, limits.request_timeout),
            "peer port",
        )
        app = web.Application(middlewares=[self.gate.middleware])
        app.router.add_get(self._path, self._handle)
        app.on_shutdown.append(self._on_shutdown)
        # shutdown_timeout is only a backstop: _on_shutdown already ends every channel.
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=limits.close_timeout,
            keepalive_timeout=limits.request_timeout,
        )
        await runner.setup()
        site = GatedSite(runner, self.gate, host=host, port=port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        self.address = PeerAddress(str(bound[0]), int(bound[1]), self._scheme)

    @property
    def url(self) -> str:
        """The URL peers dial, e.g. ws://127.0.0.1:9001."""
        return self.address.url

    @property
    def port(self) -> int:
        """The port actually bound."""
        return self.address.port

    async def close(self) -> None:
        """Stop listening and close every websocket promptly (idempotent)."""
        runner, self._runner = self._runner, None
        self._closing = True
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _admit(self, ip: str) -> str | None:
        if self._closing:
            return "server closing"
        if self._active >= self._limits.max_connections:
            return f"connection limit {self._limits.max_connections} reached"
        if self._per_ip[ip] >= self._limits.max_connections_per_ip:
            return f"per-IP limit {self._limits.max_connections_per_ip} reached for {ip}"
        self._active += 1
        self._per_ip[ip] += 1
        return None

    def _release(self, ip: str) -> None:
        self._active -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        limits = self._limits
        ws = web.WebSocketResponse(
            compress=False,  # decompression bombs and CRIME-style leaks: never negotiate
            max_msg_size=_aiohttp_cap(limits),
            heartbeat=limits.heartbeat or None,
            timeout=limits.close_timeout,
        )
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="websocket upgrade expected")
        ip = request.remote or "unknown"
        refusal = self._admit(ip)
        if refusal is not None:
            logger.warning("refused websocket from %s: %s", ip, refusal)
            return web.Response(status=503, text=refusal)
        try:
            await ws.prepare(request)
            transport = request.transport
            peer = transport.get_extra_info("peername") if transport else None
            remote = _peername(peer, self._scheme)
            channel = _WsChannel(ws, remote, limits, transport=transport)
            task = asyncio.create_task(self._run(channel), name=f"unity-crdt channel {remote}")
            self._tasks.add(task)
            try:
                # wait() rather than await: a cancelled channel task must not raise into aiohttp.
                await asyncio.wait({task})
            except asyncio.CancelledError:
                task.cancel()
                raise
            finally:
                self._tasks.discard(task)
        finally:
            self._release(ip)
        return ws

    async def _run(self, channel: _WsChannel) -> None:
        self._channels.add(channel)
        try:
            await self._on_channel(channel)
        except Exception:
            logger.exception("channel handler for %s failed", channel.remote)
        finally:
            self._channels.discard(channel)
            await channel.close()

    async def _on_shutdown(self, app: web.Application) -> None:
        # aiohttp alone would wait 2x its shutdown timeout on half-open websockets.
        self._closing = True
        timeout = self._limits.close_timeout
        closes = [
            asyncio.create_task(ch.close(_CLOSE_GOING_AWAY, "server shutting down"))
            for ch in list(self._channels)
        ]
        tasks = list(self._tasks)
        if closes or tasks:
            await asyncio.wait([*closes, *tasks], timeout=timeout)
        stuck = [t for t in tasks if not t.done()]
        for task in stuck:
            task.cancel()
        if stuck or closes:
            await asyncio.wait([*closes, *stuck], timeout=timeout)
        for task in stuck:
            if not task.done():
                logger.warning("channel task %s ignored cancellation", task.get_name())


async def serve(
    host: str,
    port: int,
    on_channel: OnChannel,
    *,
    limits: TransportLimits = TransportLimits(),
    path: str = DEFAULT_PATH,
    scheme: str = "ws",
) -> Server:
    """Listen on host:port (0 = any free port) and run `on_channel` for each accepted websocket."""
    if not path.startswith("/"):
        raise ConfigError(f"path must start with '/', got {path!r}")
    server = Server(on_channel, limits, path, scheme)
    await server._start(host, port)
    return server


def _dial_target(url: str | PeerAddress, path: str) -> str:
    if isinstance(url, PeerAddress):
        return url.url + path
    address = PeerAddress.parse(url)
    if address.scheme not in ("ws", "wss"):
        raise ConfigError(f"not a websocket URL: {url!r}")
    given = urlsplit(url).path
    return address.url + (given if given not in ("", "/") else path)


def _dial_error(target: str, exc: BaseException, timeout: float) -> ChannelClosed:
    if isinstance(exc, TimeoutError):
        return ChannelClosed(f"dial {target}: no websocket after {timeout} s (timed out)")
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        if exc.status == 503:
            return ChannelClosed(f"dial {target}: refused by the server (HTTP 503, over a limit)")
        return ChannelClosed(f"dial {target}: websocket refused (HTTP {exc.status})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        reason = os.strerror(err.errno) if err.errno else str(err)
        return ChannelClosed(f"dial {target}: cannot connect ({reason})")
    return ChannelClosed(f"dial {target} failed: {exc}")


async def dial(
    url: str | PeerAddress,
    *,
    limits: TransportLimits = TransportLimits(),
    timeout: float = 5.0,
    path: str = DEFAULT_PATH,
) -> Channel:
    """Open a websocket to `url` (ws://host:port; `path` is appended when the URL has none)."""
    target = _dial_target(url, path)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    try:
        async with asyncio.timeout(timeout):
            ws = await session.ws_connect(
                target,
                compress=0,
                max_msg_size=_aiohttp_cap(limits),
                heartbeat=limits.heartbeat or None,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=limits.close_timeout),
            )
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await session.close()
        if isinstance(exc, Exception):
            raise _dial_error(target, exc, timeout) from exc
        raise
    scheme = url.scheme if isinstance(url, PeerAddress) else urlsplit(url).scheme
    remote = _peername(ws.get_extra_info("peername"), scheme)
    return _WsChannel(ws, remote, limits, session=session)


class WebsocketTransport:
    """The `Transport` for ws:// (and dial-only wss://) addresses."""

    def __init__(self, *, limits: TransportLimits = TransportLimits(), scheme: str = "ws") -> None:
        self.limits = limits
        self.scheme = scheme

    async def dial(self, address: PeerAddress, *, timeout: float) -> Channel:
        """Open a websocket to `address` on the default path."""
        return await dial(address, limits=self.limits, timeout=timeout)

    async def listen(self, address: PeerAddress, on_channel: OnChannel) -> Server:
        """Serve websockets on `address` (port 0 = any free port)."""
        if self.scheme != "ws":
            raise ConfigError("wss:// is dial-only; listen on ws:// (Noise encrypts every link)")
        return await serve(address.host, address.port, on_channel, limits=self.limits)
