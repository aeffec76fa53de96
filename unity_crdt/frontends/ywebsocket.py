"""A loopback y-websocket endpoint so unchanged Yjs front ends (Electron, browsers) edit node docs.

One websocket per (client, doc): the doc id is the percent-decoded URL path. Messages follow
y-protocols: `0` sync (SyncStep1 state vector, SyncStep2 / Update update), `1` awareness,
`2` auth (ignored), `3` query-awareness. Client edits are applied through the node's replica
with a per-connection origin, so the node persists and gossips them without echoing them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, unquote

from aiohttp import WSCloseCode, WSMsgType, web

from ..config import DEFAULT_YJS_ORIGINS
from ..errors import ConfigError, DecodeError, LimitExceeded, ProtocolError
from ..ids import check_doc_id
from ..serving import GatedSite, ListenLimits, SiteGate
from ..sync.yjs import check_state_vector, check_update, is_empty_update
from ..sync.yprotocol import (
    MSG_AWARENESS,
    MSG_QUERY_AWARENESS,
    MSG_SYNC,
    SYNC_STEP1,
    SYNC_STEP2,
    SYNC_UPDATE,
    AwarenessTable,
    awareness_message,
    parse_message,
    sync_message,
)
from ._origin import OriginPolicy, loopback_host

__all__ = [
    "CLOSE_BAD_MESSAGE",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TOO_LARGE",
    "ClientOrigin",
    "DocHost",
    "YWebsocketEndpoint",
    "YWebsocketLimits",
]

log = logging.getLogger(__name__)

# Close codes: 4400-4499 tell y-websocket 3 clients not to reconnect (the same bytes would be
# rejected again); 1013 ("try again later") makes them reconnect and resync by state vector.
CLOSE_BAD_MESSAGE = 4400
CLOSE_TOO_LARGE = 4413
CLOSE_SLOW_CONSUMER = 1013


class DocHost(Protocol):
    """What the endpoint needs from the node's replica (`sync.replica.Replica` fits)."""

    def state_vector(self, name: str) -> bytes:
        """The encoded state vector of doc `name` (created empty if unknown)."""
        ...

    def diff(self, name: str, state_vector: bytes) -> bytes:
        """The update holding everything of doc `name` missing from `state_vector`."""
        ...

    def apply_remote(self, name: str, update: bytes, origin: Any) -> object:
        """Apply `update` to doc `name` with `origin`; ProtocolError if pycrdt refuses it."""
        ...


@dataclass(frozen=True, slots=True)
class ClientOrigin:
    """Transaction origin of edits from one y-websocket connection (`peer` = "ywebsocket/<n>")."""

    peer: str


@dataclass(frozen=True, slots=True)
class YWebsocketLimits:
    """Caps protecting the node from one misbehaving front end."""

    max_message_bytes: int = 16 * 1024 * 1024
    max_pending_bytes: int = 64 * 1024 * 1024
    max_clients: int = 256
    max_awareness_entries: int = 1024
    keepalive_s: float = 10.0
    awareness_timeout_s: float = 30.0
    heartbeat_s: float = 30.0
    close_timeout_s: float = 1.0
    # Raw TCP connections, reset at accept over these (unity_crdt.serving); every front end
    # comes from the same loopback address, so the per-address cap only bounds the total.
    max_tcp: int = 512
    max_tcp_per_ip: int = 320
    request_timeout_s: float = 5.0


class _Client:
    """One accepted websocket: its room, origin, owned awareness ids and bounded send queue."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        doc: str,
        origin: Hashable,
        cap: int,
    ) -> None:
        self.ws = ws
        self.doc = doc
        self.origin = origin
        self.awareness_ids: set[int] = set()
        self.close_code: int | None = None
        self.last_sent = 0.0
        self._transport = request.transport
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._pending = 0
        self._cap = cap

    def send(self, data: bytes) -> None:
        """Queue `data`; a client that lets its backlog pass the cap is dropped (it resyncs)."""
        if self.close_code is not None:
            return
        if self._pending + len(data) > self._cap:
            # The writer is stuck on a full socket, so a close frame could not go out either.
            self.close_code = CLOSE_SLOW_CONSUMER
            self._queue.put_nowait(None)
            if self._transport is not None:
                self._transport.abort()
            return
        self._pending += len(data)
        self._queue.put_nowait(data)

    def close(self, code: int) -> None:
        """Close the socket with `code` once everything queued before was sent."""
        if self.close_code is None:
            self.close_code = code
            self._queue.put_nowait(None)

    async def write_loop(self) -> None:
        """Drain the queue into the socket in order; close it when asked."""
        loop = asyncio.get_running_loop()
        try:
            while (data := await self._queue.get()) is not None:
                self._pending -= len(data)
                await self.ws.send_bytes(data)
                self.last_sent = loop.time()
        except (ConnectionError, RuntimeError):
            pass  # the reader sees the same dead socket and cleans up
        finally:
            if self.close_code is None:
                self.close_code = WSCloseCode.GOING_AWAY
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=self.close_code)


class _Room:
    """The clients of one doc and the awareness states seen for it."""

    def __init__(self, max_entries: int) -> None:
        self.clients: set[_Client] = set()
        self.awareness = AwarenessTable(max_entries)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class YWebsocketEndpoint:
    """Serves y-websocket rooms (one per doc) over a token-protected loopback aiohttp server."""

    def __init__(
        self,
        host: DocHost,
        token: str | None = None,
        *,
        limits: YWebsocketLimits | None = None,
        on_awareness: Callable[[str, bytes], None] | None = None,
        on_join: Callable[[str], None] | None = None,
        origin_factory: Callable[[str], Hashable] = ClientOrigin,
        origins: Iterable[str] = DEFAULT_YJS_ORIGINS,
    ) -> None:
        """`token=None` makes a random token; `on_awareness(doc, update)` sees client presence;
        `on_join(doc)` runs as a client joins a room, before it is shown the room's presence
        (the node hands over what peers said before anyone had the doc open); `origins` is the
        browser Origin allowlist (see `_origin.OriginPolicy`)."""
        if token is not None and len(token) < 16:
            raise ConfigError("the y-websocket token must be at least 16 characters")
        self._host = host
        self.token = token if token is not None else secrets.token_urlsafe(32)
        self._token_bytes = self.token.encode("utf-8")
        self.limits = limits or YWebsocketLimits()
        self._on_awareness = on_awareness
        self._on_join = on_join
        self._origin_factory = origin_factory
        self.origins = OriginPolicy(origins)
        self._loopback_only = True  # set from the bound host by start()
        self._refused_origins: set[str] = set()
        self._rooms: dict[str, _Room] = {}
        self._clients: set[_Client] = set()
        self._runner: web.AppRunner | None = None
        self._writers: set[asyncio.Task[None]] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._next_id = 0
        self.gate: SiteGate | None = None
        self.host = ""
        self.port = 0

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on `host:port` (loopback by default; port 0 picks a free one)."""
        if self._runner is not None:
            raise ConfigError("the y-websocket endpoint is already started")
        lim = self.limits
        self.gate = SiteGate(
            ListenLimits(lim.max_tcp, lim.max_tcp_per_ip, lim.request_timeout_s), "y-websocket"
        )
        app = web.Application(middlewares=[self.gate.middleware])
        app.router.add_get("/{doc:.*}", self._handle)
        # access_log=None: the query string may hold the token and must never reach a log.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=lim.close_timeout_s,
            keepalive_timeout=lim.request_timeout_s,
        )
        await self._runner.setup()
        try:
            await GatedSite(self._runner, self.gate, host=host, port=port).start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.host, self.port = host, int(self._runner.addresses[0][1])
        self._loopback_only = _is_loopback(host)
        if not self._loopback_only:
            log.warning(
                "the y-websocket endpoint listens on %s, beyond this machine: whoever reaches "
                "it with the token can read and edit every doc; Host is not checked there",
                host,
            )
        self._maintenance = asyncio.create_task(self._maintain())

    @property
    def base_url(self) -> str:
        """The `serverUrl` to give `WebsocketProvider` (the room name is appended by it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def url_for(self, doc: str) -> str:
        """The websocket URL of one doc's room, without the token."""
        return f"{self.base_url}/{quote(check_doc_id(doc), safe='')}"

    async def close(self) -> None:
        """Close every client and stop listening."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        for client in list(self._clients):
            client.close(WSCloseCode.GOING_AWAY)
        if self._writers:
            await asyncio.wait(self._writers, timeout=self.limits.close_timeout_s)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> YWebsocketEndpoint:
        """Start on loopback with a free port."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the endpoint."""
        await self.close()

    # ---- hooks for the node ----------------------------------------------------------------

    def publish(self, doc: str, update: bytes, origin: object) -> None:
        """Send a committed update of `doc` to its clients, except the one it came from."""
        room = self._rooms.get(doc)
        if room is None or not room.clients or is_empty_update(update):
            return
        message = sync_message(SYNC_UPDATE, update)
        for client in room.clients:
            if client.origin != origin:
                client.send(message)

    def apply_peer_awareness(self, doc: str, update: bytes) -> bytes | None:
        """Merge presence from peer nodes into `doc`'s room, show it to its clients.

        Returns the entries that were new (re-encoded), which is what a node should relay to
        its other peers (stale or repeated entries return None, so relaying terminates).
        Raises DecodeError / LimitExceeded (ProtocolErrors) for a malformed or excessive update.
        """
        now = asyncio.get_running_loop().time()
        room = self._rooms.get(doc) or _Room(self.limits.max_awareness_entries)
        accepted = room.awareness.apply(update, now)  # raises before a new room is kept
        self._rooms.setdefault(doc, room)
        if accepted is not None:
            message = awareness_message(accepted)
            for client in room.clients:
                client.send(message)
        return accepted

    def clients(self, doc: str | None = None) -> int:
        """How many front ends are connected (to `doc`, or in total)."""
        if doc is None:
            return len(self._clients)
        room = self._rooms.get(doc)
        return 0 if room is None else len(room.clients)

    def awareness_states(self, doc: str) -> dict[int, str]:
        """The live awareness states of `doc`'s room: client id -> JSON text."""
        room = self._rooms.get(doc)
        return {} if room is None else room.awareness.states()

    # ---- HTTP + websocket ------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        offered = request.query.get("token")
        header = request.headers.get("Authorization", "")
        if offered is None and header[:7].lower() == "bearer ":
            offered = header[7:].strip()
        if offered is None:
            return False
        return hmac.compare_digest(offered.encode("utf-8", "surrogatepass"), self._token_bytes)

    def _refusal(self, request: web.Request) -> web.Response | None:
        """403 for a browser page that must not reach this endpoint (before the token check)."""
        if self._loopback_only and not loopback_host(request.headers.get("Host")):
            return web.Response(status=403, text="this endpoint answers to loopback names only\n")
        origin = request.headers.get("Origin")
        if self.origins.allows(origin):
            return None
        if origin not in self._refused_origins and len(self._refused_origins) < 64:
            self._refused_origins.add(str(origin))
            log.warning(
                "y-websocket: refused a page from origin %r (allow it in NodeConfig.yjs_origins)",
                origin,
            )
        return web.Response(status=403, text="origin not allowed (NodeConfig.yjs_origins)\n")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if not self._authorized(request):
            return web.Response(
                status=401, text="missing or wrong token\n", headers={"WWW-Authenticate": "Bearer"}
            )
        raw = request.rel_url.raw_path.lstrip("/")
        try:
            doc = check_doc_id(unquote(raw, errors="strict"))
        except (UnicodeDecodeError, ConfigError) as exc:
            return web.Response(status=400, text=f"bad document name: {exc}\n")
        if len(self._clients) >= self.limits.max_clients:
            return web.Response(status=503, text="too many front-end connections\n")
        ws = web.WebSocketResponse(
            max_msg_size=self.limits.max_message_bytes,
            compress=False,
            heartbeat=self.limits.heartbeat_s,
            timeout=self.limits.close_timeout_s,
        )
        if not ws.can_prepare(request).ok:
            return web.Response(status=426, text="websocket upgrade required\n")
        await ws.prepare(request)
        await self._serve(ws, request, doc)
        return ws

    async def _serve(self, ws: web.WebSocketResponse, request: web.Request, doc: str) -> None:
        self._next_id += 1
        origin = self._origin_factory(f"ywebsocket/{self._next_id}")
        client = _Client(ws, request, doc, origin, self.limits.max_pending_bytes)
        room = self._rooms.get(doc)
        if room is None:
            room = self._rooms[doc] = _Room(self.limits.max_awareness_entries)
        # Join before reading the state vector: updates committed from now on are published to
        # this client too, so nothing falls between the SyncStep2 and live updates.
        room.clients.add(client)
        self._clients.add(client)
        writer = asyncio.create_task(client.write_loop())
        self._writers.add(writer)
        writer.add_done_callback(self._writers.discard)
        try:
            client.send(sync_message(SYNC_STEP1, self._host.state_vector(doc)))
            if self._on_join is not None:
                self._on_join(doc)
            snapshot = self._snapshot(room)
            if snapshot is not None:
                client.send(awareness_message(snapshot))
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    self._on_message(client, room, msg.data)
                elif msg.type == WSMsgType.TEXT:
                    raise DecodeError("text frames are not part of the y-websocket protocol")
                elif msg.type == WSMsgType.ERROR:
                    break
                if client.close_code is not None:
                    break
        except LimitExceeded as exc:
            log.info("closing %s: %s", origin, exc)
            client.close(CLOSE_TOO_LARGE)
        except ProtocolError as exc:
            log.info("closing %s: %s", origin, exc)
            client.close(CLOSE_BAD_MESSAGE)
        except Exception:
            log.exception("internal error serving %s", origin)
            client.close(WSCloseCode.INTERNAL_ERROR)
        finally:
            client.close(ws.close_code or WSCloseCode.GOING_AWAY)
            room.clients.discard(client)
            self._clients.discard(client)
            self._forget_awareness(client, room)
            with contextlib.suppress(Exception):
                await writer

    def _on_message(self, client: _Client, room: _Room, data: bytes) -> None:
        message = parse_message(data)
        if message.kind == MSG_SYNC:
            if message.sync_type == SYNC_STEP1:
                check_state_vector(message.payload)
                client.send(sync_message(SYNC_STEP2, self._host.diff(client.doc, message.payload)))
                return
            if is_empty_update(message.payload):
                return
            check_update(message.payload)
            # A ProtocolError (pycrdt refused the update) closes this client only.
            self._host.apply_remote(client.doc, message.payload, client.origin)
        elif message.kind == MSG_AWARENESS:
            now = asyncio.get_running_loop().time()
            accepted = room.awareness.apply(message.payload, now, owner=client.awareness_ids)
            if accepted is None:
                return
            forward = awareness_message(accepted)
            for other in room.clients:
                if other is not client:
                    other.send(forward)
            self._notify_awareness(client.doc, accepted)
        elif message.kind == MSG_QUERY_AWARENESS:
            snapshot = self._snapshot(room)
            if snapshot is not None:
                client.send(awareness_message(snapshot))
        # MSG_AUTH is ignored: the token authenticated the socket before the upgrade.

    def _notify_awareness(self, doc: str, update: bytes) -> None:
        # The node's hook must not be able to take a front end's connection down with it.
        if self._on_awareness is not None:
            try:
                self._on_awareness(doc, update)
            except Exception:
                log.exception("on_awareness hook failed")

    def _snapshot(self, room: _Room) -> bytes | None:
        now = asyncio.get_running_loop().time()
        return room.awareness.snapshot(now, self.limits.awareness_timeout_s)

    def _forget_awareness(self, client: _Client, room: _Room) -> None:
        """Tell everyone that a departed client's presence is gone (pycrdt-websocket keeps it)."""
        removal = room.awareness.remove(client.awareness_ids, asyncio.get_running_loop().time())
        client.awareness_ids.clear()
        if removal is None:
            return
        message = awareness_message(removal)
        for other in room.clients:
            other.send(message)
        self._notify_awareness(client.doc, removal)

    async def _maintain(self) -> None:
        """Keep idle clients alive, expire stale presence, drop empty rooms."""
        loop = asyncio.get_running_loop()
        keepalive = awareness_message(b"\x00")  # zero entries: a no-op for y-protocols
        while True:
            await asyncio.sleep(self.limits.keepalive_s / 2)
            now = loop.time()
            # y-websocket clients reconnect after 30 s without a message.
            for client in self._clients:
                if now - client.last_sent >= self.limits.keepalive_s:
                    client.send(keepalive)
            for doc, room in list(self._rooms.items()):
                room.awareness.expire(now - self.limits.awareness_timeout_s)
                if not room.clients and not room.awareness:
                    del self._rooms[doc]
