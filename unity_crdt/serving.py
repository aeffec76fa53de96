"""Listening sockets of every aiohttp server: accept-time caps, request deadlines, the fd limit.

aiohttp counts nothing until a request is parsed and keeps a silent connection for an hour by
default, so a few hundred half-sent requests exhaust a process's file descriptors before any
websocket or handshake limit sees them. `GatedSite` puts three rules in front of aiohttp, on
the raw connection: a cap on open connections in all and per source address, checked when the
connection is accepted (over it, the socket is reset at once, so it holds no descriptor);
a deadline for the first request's headers (`request_timeout`, measured from the accept, so
trickling bytes does not extend it); and, once per process, a soft RLIMIT_NOFILE raised to
the hard limit (bounded), so the caps hold long before the process runs out. Use
`keepalive_timeout=limits.request_timeout` on the runner so later idle periods are cut too.

Every listening server of the library (peer transport, y-websocket endpoint, control socket,
metrics port) is a `GatedSite`; this module is their one home, below the adapters.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .errors import ConfigError

__all__ = ["FD_LIMIT_TARGET", "GatedSite", "ListenLimits", "SiteGate", "raise_fd_limit"]

log = logging.getLogger(__name__)

# Enough for every cap below with room to spare; never more than the hard limit.
FD_LIMIT_TARGET = 8192
_fd_limit_raised = False


@dataclass(frozen=True, slots=True)
class ListenLimits:
    """Caps of one listening socket, applied to raw connections before HTTP parsing."""

    max_connections: int = 512
    max_per_ip: int = 48
    request_timeout: float = 5.0  # seconds from accept to the first request's headers

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_per_ip < 1:
            raise ConfigError("connection caps must be >= 1")
        if self.request_timeout <= 0:
            raise ConfigError("request_timeout must be > 0")


def raise_fd_limit(target: int = FD_LIMIT_TARGET) -> int:
    """Raise the soft RLIMIT_NOFILE towards `target` (never above the hard limit), once.

    Returns the soft limit in force. Later calls change nothing, so a process that lowers its
    own limit afterwards keeps it. Without the `resource` module (Windows) it returns -1.
    """
    global _fd_limit_raised
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _fd_limit_raised:
        return soft
    _fd_limit_raised = True
    ceiling = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < 1024:
        log.warning(
            "open-file limit is %d: connection caps may not hold under a flood (raise ulimit -n)",
            soft,
        )
    return soft


def _reset(transport: asyncio.BaseTransport) -> None:
    """Drop a connection now, without a graceful close (no descriptor held meanwhile)."""
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()
    else:  # pragma: no cover - every stream transport is a WriteTransport
        transport.close()


def _source(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "local"  # a UNIX socket: one source


class _Gate:
    """Counts open connections per source; remembers which ones have not sent a request."""

    def __init__(self, limits: ListenLimits, what: str) -> None:
        self.limits = limits
        self.what = what
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.waiting: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}
        self.refused = 0  # connections reset at accept time (a figure for tests and logs)
        self.expired = 0  # connections cut for not sending a request in time

    def admit(self, ip: str) -> bool:
        if self.total >= self.limits.max_connections or self.per_ip[ip] >= self.limits.max_per_ip:
            self.refused += 1
            return False
        self.total += 1
        self.per_ip[ip] += 1
        return True

    def release(self, ip: str, transport: asyncio.BaseTransport) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
        timer = self.waiting.pop(transport, None)
        if timer is not None:
            timer.cancel()

    def started(self, transport: asyncio.BaseTransport | None) -> None:
        timer = self.waiting.pop(transport, None) if transport is not None else None
        if timer is not None:
            timer.cancel()

    def expire(self, transport: asyncio.BaseTransport) -> None:
        if self.waiting.pop(transport, None) is not None:
            self.expired += 1
            _reset(transport)


class _GatedProtocol(asyncio.Protocol):
    """Admits or resets one raw connection, then hands every event to aiohttp's handler."""

    def __init__(self, inner: asyncio.Protocol, gate: _Gate) -> None:
        self._inner = inner
        self._gate = gate
        self._ip: str | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ip = _source(transport)
        if not self._gate.admit(ip):
            _reset(transport)  # RST now: a refused connection holds no descriptor
            return
        self._ip, self._transport = ip, transport
        loop = asyncio.get_running_loop()
        timeout = self._gate.limits.request_timeout
        self._gate.waiting[transport] = loop.call_later(timeout, self._gate.expire, transport)
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ip is None or self._transport is None:
            return  # refused at accept: aiohttp never saw it
        self._gate.release(self._ip, self._transport)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._ip is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._ip is not None else None

    def pause_writing(self) -> None:
        if self._ip is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._ip is not None:
            self._inner.resume_writing()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GatedSite(web.BaseSite):
    """An aiohttp site (TCP host:port, or a bound socket) behind the accept-time gate.

    Put the gate's middleware first in the application, so the request deadline stops once a
    request's headers arrived:

        gate = SiteGate(limits, "peer port")
        app = web.Application(middlewares=[gate.middleware])
        runner = web.AppRunner(app, keepalive_timeout=limits.request_timeout)
        await runner.setup()
        await GatedSite(runner, gate, host=host, port=port).start()
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        gate: SiteGate,
        *,
        host: str | None = None,
        port: int = 0,
        sock: socket.socket | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._gate = gate
        self._host, self._port, self._sock = host, port, sock

    @property
    def name(self) -> str:
        """The listening address, for aiohttp's logs."""
        return f"gated {self._gate.what} {self._host}:{self._port}"

    async def start(self) -> None:
        """Listen; the first site of the process also raises the open-file limit."""
        raise_fd_limit()
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        inner: Callable[[], Any] = server
        gate = self._gate.core

        def factory() -> asyncio.Protocol:
            return _GatedProtocol(inner(), gate)

        if self._sock is not None:
            self._server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog)
        else:
            self._server = await loop.create_server(
                factory, self._host, self._port, backlog=self._backlog
            )


class SiteGate:
    """The accept-time gate of one listening socket, with the middleware that feeds it."""

    def __init__(self, limits: ListenLimits, what: str) -> None:
        self.core = _Gate(limits, what)

    @property
    def limits(self) -> ListenLimits:
        """The caps this gate applies."""
        return self.core.limits

    @property
    def what(self) -> str:
        """What this gate guards, for logs."""
        return self.core.what

    @property
    def open_connections(self) -> int:
        """Raw connections currently admitted."""
        return self.core.total

    @property
    def refused(self) -> int:
        """Connections reset at accept time since the start."""
        return self.core.refused

    @property
    def expired(self) -> int:
        """Connections cut because no request arrived within the deadline."""
        return self.core.expired

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Stop the connection's request deadline: its headers arrived."""
        self.core.started(request.transport)
        return await handler(request)
