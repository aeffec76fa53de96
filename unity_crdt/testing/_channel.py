"""`check_channel`: the acceptance suite of a transport; `MemoryTransport`, the in-memory one.

`check_channel(transport, address)` runs the `net.channel.Transport` contract against a real
transport: listen, dial, whole messages in order both ways (empty, 1 byte, 1 MiB), ChannelClosed
on both ends after either side closes, a clear ChannelClosed for an address nobody listens on,
and a listener close that ends its channels. `MemoryTransport` meets the same contract inside
one event loop (scheme "mem" by default), for tests that want real nodes without sockets.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..errors import ChannelClosed
from ..ids import PeerAddress
from ..net.channel import Channel, Listener, OnChannel, Transport

__all__ = ["MemoryChannel", "MemoryTransport", "channel_pair", "check_channel"]

_EOF = object()


class MemoryChannel:
    """One end of an in-memory channel; its twin is the other end."""

    def __init__(self, remote: PeerAddress) -> None:
        self._remote = remote
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._twin: MemoryChannel | None = None
        self._closed = False

    @property
    def remote(self) -> PeerAddress:
        """The other end's address."""
        return self._remote

    @property
    def closed(self) -> bool:
        """Whether either end closed."""
        return self._closed

    async def send(self, data: bytes) -> None:
        """Hand `data` to the other end."""
        if self._closed or self._twin is None:
            raise ChannelClosed(f"channel to {self._remote} is closed")
        self._twin._inbox.put_nowait(bytes(data))
        await asyncio.sleep(0)  # a real socket yields too; keep schedules honest

    async def recv(self) -> bytes:
        """The next message; ChannelClosed once either end closed."""
        if self._closed and self._inbox.empty():
            raise ChannelClosed(f"channel to {self._remote} is closed")
        item = await self._inbox.get()
        if item is _EOF:
            self._closed = True
            raise ChannelClosed(f"channel to {self._remote} closed by the peer")
        assert isinstance(item, bytes)
        return item

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close both ends (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put_nowait(_EOF)
        if self._twin is not None and not self._twin._closed:
            self._twin._inbox.put_nowait(_EOF)


_A, _B = PeerAddress("a", 1, "mem"), PeerAddress("b", 1, "mem")


def channel_pair(a: PeerAddress = _A, b: PeerAddress = _B) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected ends: the first is at `a` (its remote is `b`), the second at `b`."""
    at_a, at_b = MemoryChannel(b), MemoryChannel(a)
    at_a._twin, at_b._twin = at_b, at_a
    return at_a, at_b


@dataclass
class _MemoryListener:
    transport: MemoryTransport
    address: PeerAddress
    on_channel: OnChannel
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    channels: set[MemoryChannel] = field(default_factory=set)

    async def close(self) -> None:
        """Stop listening; close every accepted channel and wait for its handler."""
        self.transport._listeners.pop((self.address.host, self.address.port), None)
        for channel in list(self.channels):
            await channel.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2.0)


class MemoryTransport:
    """A Transport inside one event loop: `listen` registers host:port, `dial` connects to it.

    Share one instance between the nodes that should reach each other.
    """

    def __init__(self, scheme: str = "mem") -> None:
        self.scheme = scheme
        self._listeners: dict[tuple[str, int], _MemoryListener] = {}
        self._next_port = 40000
        self.dials = 0

    async def listen(self, address: PeerAddress, on_channel: OnChannel) -> Listener:
        """Listen on host:port (port 0 = pick one)."""
        port = address.port
        if port == 0:
            self._next_port += 1
            port = self._next_port
        key = (address.host, port)
        if key in self._listeners:
            raise ChannelClosed(f"{self.scheme}://{address.host}:{port} is already in use")
        listener = _MemoryListener(self, PeerAddress(address.host, port, self.scheme), on_channel)
        self._listeners[key] = listener
        return listener

    async def dial(self, address: PeerAddress, *, timeout: float) -> Channel:
        """Connect to a listener of this transport."""
        self.dials += 1
        listener = self._listeners.get((address.host, address.port))
        if listener is None:
            raise ChannelClosed(f"dial {address}: nobody listens there")
        self._next_port += 1
        mine = PeerAddress("dialer", self._next_port, self.scheme)
        near, far = channel_pair(mine, listener.address)
        listener.channels.add(far)

        async def serve() -> None:
            try:
                await listener.on_channel(far)
            finally:
                listener.channels.discard(far)
                await far.close()

        task = asyncio.get_running_loop().create_task(serve())
        listener.tasks.add(task)
        task.add_done_callback(listener.tasks.discard)
        return near


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"check_channel: {what}")


async def check_channel(transport: Transport, address: PeerAddress) -> None:
    """Run the Transport contract against `transport`, listening on `address` (port 0 ok)."""
    accepted: asyncio.Queue[Channel] = asyncio.Queue()
    done = asyncio.Event()

    async def on_channel(channel: Channel) -> None:
        await accepted.put(channel)
        await done.wait()

    listener = await transport.listen(address, on_channel)
    try:
        bound = listener.address
        _expect(bound.port != 0 and bound.scheme == address.scheme, "listener address unbound")
        client = await transport.dial(bound, timeout=5.0)
        server = await asyncio.wait_for(accepted.get(), 5.0)
        _expect(isinstance(server.remote, PeerAddress), "remote must be a PeerAddress")
        _expect(isinstance(server.remote.host, str) and server.remote.host != "", "remote host")
        for size in (0, 1, 1000, 2**20):
            payload = bytes(i % 251 for i in range(size))
            await client.send(payload)
            _expect(await asyncio.wait_for(server.recv(), 5.0) == payload, f"{size} B garbled")
            await server.send(payload[::-1])
            _expect(await asyncio.wait_for(client.recv(), 5.0) == payload[::-1], "reply garbled")
        for i in range(100):
            await client.send(i.to_bytes(2, "big"))
        got = [await asyncio.wait_for(server.recv(), 5.0) for _ in range(100)]
        _expect(got == [i.to_bytes(2, "big") for i in range(100)], "messages out of order")
        await client.close()
        await client.close()  # idempotent
        _expect(client.closed, "closed is False after close()")
        await _expect_closed(server, "recv after the peer closed did not raise ChannelClosed")
        try:
            await client.send(b"late")
        except ChannelClosed:
            pass
        else:
            raise AssertionError("check_channel: send after close did not raise ChannelClosed")
        # A listener that closes ends the channels it accepted.
        client2 = await transport.dial(bound, timeout=5.0)
        await asyncio.wait_for(accepted.get(), 5.0)
        done.set()
        await listener.close()
        await _expect_closed(client2, "closing the listener left its channel open")
        await client2.close()
        try:
            await transport.dial(bound, timeout=2.0)
        except ChannelClosed:
            pass
        else:
            raise AssertionError("check_channel: dial to a closed listener did not fail")
    finally:
        done.set()
        await listener.close()


async def _expect_closed(channel: Channel, what: str) -> None:
    try:
        async with asyncio.timeout(5.0):
            while True:
                await channel.recv()
    except ChannelClosed:
        return
    except TimeoutError:
        raise AssertionError(f"check_channel: {what}") from None
