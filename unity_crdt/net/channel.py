"""The link contracts, and transports chosen by URL scheme.

A `Channel` moves whole binary messages between two ends, in order; it knows nothing of
encryption or of the sync protocol (the link driver seals everything it sends). A `Transport`
opens channels for one URL scheme: `dial` an address, or `listen` on one and hand each inbound
channel to a callback. The node dials every peer address through the transport registered for
its scheme, so adding a transport means one module and one `register_transport` call (or
passing it to `Node(transports=...)`); `unity_crdt.testing.check_channel` is its contract.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from ..errors import ConfigError
from ..ids import PeerAddress, check_scheme

__all__ = [
    "Channel",
    "Listener",
    "OnChannel",
    "Transport",
    "register_transport",
    "registered_schemes",
    "resolve_transports",
]


class Channel(Protocol):
    """One bidirectional link carrying whole binary messages."""

    @property
    def remote(self) -> PeerAddress:
        """The other end as the transport sees it (admission limits key on its host)."""
        ...

    @property
    def closed(self) -> bool:
        """Whether the link is closed or closing."""
        ...

    async def send(self, data: bytes) -> None:
        """Send one binary message; waits for the socket to drain; raises ChannelClosed."""
        ...

    async def recv(self) -> bytes:
        """Return the next binary message; raises ChannelClosed when the link ends."""
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the link (idempotent)."""
        ...


OnChannel = Callable[[Channel], Awaitable[None]]


class Listener(Protocol):
    """A listening endpoint of one transport."""

    @property
    def address(self) -> PeerAddress:
        """The address actually bound (port 0 resolved), as peers should dial it."""
        ...

    async def close(self) -> None:
        """Stop listening and close every channel it accepted."""
        ...


class Transport(Protocol):
    """Opens channels for one URL scheme."""

    async def dial(self, address: PeerAddress, *, timeout: float) -> Channel:
        """Connect to `address`; raises ChannelClosed (with the reason) on failure."""
        ...

    async def listen(self, address: PeerAddress, on_channel: OnChannel) -> Listener:
        """Listen on `address` and run `on_channel` for every inbound channel."""
        ...


TransportFactory = Callable[[], Transport]


def _websocket(scheme: str) -> TransportFactory:
    def make() -> Transport:
        from .websocket import WebsocketTransport  # aiohttp loads only when it is used

        return WebsocketTransport(scheme=scheme)

    return make


_REGISTRY: dict[str, TransportFactory] = {"ws": _websocket("ws"), "wss": _websocket("wss")}


def register_transport(scheme: str, factory: TransportFactory) -> None:
    """Make `scheme://host:port` addresses dialable by every node created afterwards."""
    check_scheme(scheme)
    _REGISTRY[scheme] = factory


def registered_schemes() -> list[str]:
    """The schemes of every registered transport, sorted."""
    return sorted(_REGISTRY)


def resolve_transports(given: Mapping[str, Transport] | None = None) -> dict[str, Transport]:
    """One transport per scheme: those `given` (by scheme), then one of each registered."""
    out = {scheme: make() for scheme, make in _REGISTRY.items() if scheme not in (given or {})}
    for scheme, transport in (given or {}).items():
        if not isinstance(scheme, str):
            raise ConfigError("transports must map a URL scheme to a Transport")
        out[scheme] = transport
    return out
