"""Helpers for tests that run real nodes on 127.0.0.1 with real caches in tmp dirs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from unity_crdt import Node, NodeConfig

SECRET = "test group secret: correct horse battery staple"

NodeFactory = Callable[..., Awaitable[Node]]


async def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> float:
    """Poll until check() is true; return the seconds it took, or fail with `what`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}")
        await asyncio.sleep(0.01)
    return loop.time() - start


def node_config(tmp: Path, name: str, **kw: Any) -> NodeConfig:
    """A config for a test node: loopback, no mDNS unless asked, fast timers."""
    values: dict[str, Any] = dict(
        name=name,
        cache_dir=tmp / name,
        group_secret=SECRET,
        mdns=False,
        anti_entropy_interval=2.0,
        ping_interval=1.0,
        idle_timeout=5.0,
        reconnect_max=1.0,
    )
    values.update(kw)
    return NodeConfig(**values)


def _uv(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def string_item(client: int, text: str, parent: tuple[int, int] | str, clock: int = 0) -> bytes:
    """A one-item Yjs update: `text` at (client, clock) under a root name or an item id."""
    raw = text.encode()
    if isinstance(parent, str):
        where = _uv(1) + _uv(len(parent.encode())) + parent.encode()
    else:
        where = _uv(0) + _uv(parent[0]) + _uv(parent[1])
    struct = b"\x04" + where + _uv(len(raw)) + raw  # String content, no origins
    return _uv(1) + _uv(1) + _uv(client) + _uv(clock) + struct + _uv(0)


class Attacker:
    """A member-turned-attacker: holds the group secret, speaks raw frames to a node."""

    def __init__(self, channel: Any, session: Any, sent: list[bytes]) -> None:
        self.channel, self.session, self.sent = channel, session, sent

    @classmethod
    async def connect(cls, url: str, secret: str = SECRET, name: str = "mallory") -> Attacker:
        """Dial `url` and complete a genuine handshake, recording every message sent."""
        from unity_crdt.crypto.frames import PeerHello
        from unity_crdt.crypto.handshake import Handshake
        from unity_crdt.crypto.keys import DeviceIdentity, derive_group_keys
        from unity_crdt.net import websocket as transport
        from unity_crdt.sync.codec import PROTOCOL_VERSION

        me = DeviceIdentity.generate()
        hello = PeerHello(
            name=name, device_id=me.device_id, version=PROTOCOL_VERSION, max_frame=2**20
        )
        loop = asyncio.get_running_loop()
        hs = Handshake(derive_group_keys(secret), me, hello, initiator=True, now=loop.time())
        # Generous sender limits: the attacker must be able to send what the node must refuse.
        channel = await transport.dial(url, limits=transport.TransportLimits(max_message=2**23))
        sent = [hs.initiate()]
        await channel.send(sent[0])
        while not hs.complete:
            reply = hs.receive(await channel.recv(), loop.time())
            if reply is not None:
                sent.append(reply)
                await channel.send(reply)
        return cls(channel, hs.session(), sent)

    async def send_message(self, data: bytes) -> None:
        """Seal and send one plaintext message (whatever bytes it holds)."""
        for frame in self.session.seal(data):
            self.sent.append(frame)
            await self.channel.send(frame)

    async def closed_by_node(self, timeout: float = 3.0) -> bool:
        """Whether the node ends the link within `timeout` (reading anything it still sends)."""
        from unity_crdt.errors import ChannelClosed

        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.channel.recv()
        except ChannelClosed:
            return True
        except TimeoutError:
            return False


_KEYS: dict[str, Any] = {}


async def member_handshake(
    url: str, *, local_host: str, secret: str = SECRET, timeout: float = 5.0
) -> bool:
    """Dial `url` from `local_host` and run a genuine handshake; whether it completed."""
    import aiohttp

    from unity_crdt.crypto.frames import PeerHello
    from unity_crdt.crypto.handshake import Handshake
    from unity_crdt.crypto.keys import DeviceIdentity, derive_group_keys
    from unity_crdt.errors import HandshakeError
    from unity_crdt.sync.codec import PROTOCOL_VERSION

    me = DeviceIdentity.generate()
    hello = PeerHello(
        name="member", device_id=me.device_id, version=PROTOCOL_VERSION, max_frame=2**20
    )
    loop = asyncio.get_running_loop()
    if secret not in _KEYS:  # scrypt once per secret, not once per attempt
        _KEYS[secret] = derive_group_keys(secret)
    hs = Handshake(_KEYS[secret], me, hello, initiator=True, now=loop.time())
    connector = aiohttp.TCPConnector(local_addr=(local_host, 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        try:
            async with asyncio.timeout(timeout):
                ws = await http.ws_connect(url + "/unity-crdt/v1")
                await ws.send_bytes(hs.initiate())
                while not hs.complete:
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.BINARY:
                        return False
                    reply = hs.receive(msg.data, loop.time())
                    if reply is not None:
                        await ws.send_bytes(reply)
                await ws.close()
                return True
        except (aiohttp.ClientError, HandshakeError, TimeoutError):
            return False


class SilentFlood:
    """Websockets that never send a byte, from `hosts` x `per_host`, reopened once cut."""

    def __init__(self, url: str, hosts: list[str], per_host: int) -> None:
        self.url = url + "/unity-crdt/v1"
        self.attempts = 0
        self.held = 0
        self.cut_after: list[float] = []  # how long the node let each admitted socket sit
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._run(host, per_host)) for host in hosts]

    async def _run(self, host: str, count: int) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(local_addr=(host, 0), limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            await asyncio.gather(*(self._one(http) for _ in range(count)))

    async def _one(self, http: Any) -> None:
        import aiohttp

        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            self.attempts += 1
            try:
                ws = await http.ws_connect(self.url)
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
                continue
            started = loop.time()
            self.held += 1
            closed = asyncio.ensure_future(ws.receive())
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({closed, stop}, return_when=asyncio.FIRST_COMPLETED)
            self.held -= 1
            if closed.done():
                self.cut_after.append(loop.time() - started)
            closed.cancel()
            stop.cancel()
            await ws.close()

    async def ready(self, sockets: int) -> None:
        """Wait until `sockets` attempts were made and answered or held."""
        await eventually(lambda: self.attempts >= sockets, 10.0, "the flood to connect")
        await asyncio.sleep(0.5)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
