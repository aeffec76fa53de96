"""The NATS adapter: the only module that imports `nats` (nats-py).

`connect()` opens one client connection the way every NATS user in this library wants it:
several server URLs (a cluster), credentials given as "user:password", a token or a .creds
file, `tls://` URLs, reconnecting forever with errors reported to a callback instead of the
log, and a neutral connection name (the operator never sees a device name). `NatsBroker`
wraps such a connection in the small interface the relay policy needs (`net.relay.Broker`):
a JetStream stream with retention, deduplicated publishing, an ordered consumer from a
sequence number, and plain subjects for notices and request/reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from ..errors import RelayError

__all__ = ["CONNECTION_NAME", "NatsBroker", "StreamState", "connect", "credential_options"]

log = logging.getLogger(__name__)

CONNECTION_NAME = "unity-crdt"  # what the operator's monitoring shows for every member
RECONNECT_WAIT = 0.5


@dataclass(frozen=True)
class StreamState:
    """Where a stream starts and ends now, and when it was created (its identity)."""

    first_seq: int
    last_seq: int
    created: str


def credential_options(credentials: str | None) -> dict[str, Any]:
    """nats-py connect options for "user:password", a token, or a .creds file path."""
    if not credentials:
        return {}
    path = Path(credentials).expanduser()
    if credentials.endswith(".creds") or path.is_file():
        if not path.is_file():
            raise RelayError(f"relay credentials file {path} does not exist")
        return {"user_credentials": str(path)}
    if ":" in credentials:
        user, password = credentials.split(":", 1)
        return {"user": user, "password": password}
    return {"token": credentials}


def public_url(url: str) -> str:
    """A server URL without any user name or password in it (for status and logs)."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, nats.errors.AuthorizationError) or "Authorization Violation" in text:
        return (
            "the server refused our credentials (Authorization Violation): check relay_credentials"
        )
    return text


async def connect(
    urls: tuple[str, ...],
    credentials: str | None,
    *,
    on_error: Callable[[str], None],
    on_disconnected: Callable[[], None] | None = None,
    on_reconnected: Callable[[], None] | None = None,
    connect_timeout: float = 2.0,
) -> Client:
    """Connect, retrying every server until one accepts us; report each failure to on_error.

    It returns only once connected (cancel it to give up). Afterwards the client reconnects
    by itself for ever, calling `on_disconnected` and `on_reconnected`.
    """
    options = credential_options(credentials)

    async def error_cb(exc: Exception) -> None:
        on_error(_reason(exc))

    async def disconnected_cb() -> None:
        if on_disconnected is not None:
            on_disconnected()

    async def reconnected_cb() -> None:
        if on_reconnected is not None:
            on_reconnected()

    try:
        return await nats.connect(
            list(urls),
            name=CONNECTION_NAME,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT,
            connect_timeout=connect_timeout,
            **options,
        )
    except ModuleNotFoundError as exc:  # .creds files need nkeys, which nats-py imports late
        raise RelayError(
            f"relay credentials need the `{exc.name}` package (pip install nkeys)"
        ) from None


Handler = Callable[[str, bytes, str | None], Awaitable[None]]
StreamHandler = Callable[[int, int, str, bytes], Awaitable[None]]


class NatsBroker:
    """One NATS connection with JetStream, as the relay policy uses it (`net.relay.Broker`)."""

    def __init__(self, urls: tuple[str, ...], credentials: str | None) -> None:
        self.urls = urls
        self._credentials = credentials
        self._nc: Client | None = None
        self._jsc: JetStreamContext | None = None
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now."""
        return self._nc is not None and self._nc.is_connected

    @property
    def server(self) -> str | None:
        """The URL of the server we are connected to (no credentials)."""
        if self._nc is None or not self._nc.is_connected or self._nc.connected_url is None:
            return None
        return public_url(self._nc.connected_url.geturl())

    @property
    def max_payload(self) -> int:
        """The largest message the server accepts (headers included)."""
        return self._nc.max_payload if self._nc is not None else 2**20

    def _record(self, reason: str) -> None:
        if reason != self.last_error:
            log.warning("relay: %s", reason)
        self.last_error = reason

    async def connect(self, on_down: Callable[[], None], on_up: Callable[[], None]) -> None:
        """Connect (retrying for ever); then report every loss and return of the connection."""
        self._nc = await connect(
            self.urls,
            self._credentials,
            on_error=self._record,
            on_disconnected=on_down,
            on_reconnected=on_up,
        )
        self._jsc = None
        self.last_error = None

    def _client(self) -> Client:
        if self._nc is None:
            raise RelayError("not connected to NATS")
        return self._nc

    def _js(self) -> JetStreamContext:
        # One context per connection: each new one subscribes its own reply subject for
        # publish acknowledgements (a subscription per publish leaked 1,000 per 1,000 edits).
        if self._jsc is None:
            self._jsc = self._client().jetstream()
        return self._jsc

    async def ensure_stream(
        self,
        name: str,
        subject: str,
        *,
        max_age: float,
        max_bytes: int,
        replicas: int,
        duplicate_window: float,
    ) -> StreamState:
        """The stream `name` on `subject`, created with this retention if it does not exist."""
        js = self._js()
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            config = api.StreamConfig(
                name=name,
                subjects=[subject],
                storage=api.StorageType.FILE,
                discard=api.DiscardPolicy.OLD,
                max_age=max_age,
                max_bytes=max_bytes,
                num_replicas=replicas,
                duplicate_window=duplicate_window,
            )
            try:
                info = await js.add_stream(config)
            except nats.js.errors.BadRequestError:  # another member created it meanwhile
                info = await js.stream_info(name)
        created = info.created.isoformat() if info.created is not None else ""
        return StreamState(info.state.first_seq, info.state.last_seq, created)

    async def publish(self, subject: str, data: bytes, msg_id: str) -> asyncio.Future[int]:
        """Publish into the stream; the future gives the stream sequence once stored."""
        js = self._js()
        ack = await js.publish_async(subject, data, headers={"Nats-Msg-Id": msg_id})
        out: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def done(f: asyncio.Future[api.PubAck]) -> None:
            if out.done():
                return
            if f.cancelled():
                out.cancel()
            elif f.exception() is not None:
                out.set_exception(RelayError(_reason(f.exception() or RelayError("?"))))
            else:
                out.set_result(f.result().seq)

        ack.add_done_callback(done)
        out.add_done_callback(lambda f: ack.cancel() if f.cancelled() else None)
        return out

    async def publish_plain(self, subject: str, data: bytes, reply: str = "") -> None:
        """Publish on a plain subject (not kept by any stream)."""
        await self._client().publish(subject, data, reply=reply)

    def new_inbox(self) -> str:
        """A fresh, unguessable reply subject."""
        return self._client().new_inbox()

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        """Run `handler(subject, data, reply)` for each message on a plain subject."""

        async def cb(msg: Msg) -> None:
            await handler(msg.subject, msg.data, msg.reply or None)

        return await self._client().subscribe(subject, cb=cb)

    async def consume(
        self, stream: str, subject: str, start_seq: int, handler: StreamHandler
    ) -> Subscription:
        """An ordered consumer from `start_seq`: `handler(seq, pending, subject, data)`."""
        js = self._js()
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq)
        )

        async def cb(msg: Msg) -> None:
            meta = msg.metadata
            await handler(meta.sequence.stream, meta.num_pending, msg.subject, msg.data)

        return await js.subscribe(
            subject,
            stream=stream,
            cb=cb,
            config=config,
            ordered_consumer=True,
            manual_ack=True,
            idle_heartbeat=2.0,
        )

    async def close(self) -> None:
        """Flush what is buffered and close the connection."""
        if self._nc is None or self._nc.is_closed:
            return
        try:
            if self._nc.is_connected:
                await asyncio.wait_for(self._nc.flush(), 2.0)
        except (nats.errors.Error, TimeoutError):
            pass
        await self._nc.close()
