"""The async driver of one peer link: Channel <-> secure session <-> SyncSession.

A `Link` runs the Noise handshake under a deadline, asks the node whether to keep the
authenticated link (one link per device pair), then pumps three loops until the link ends:
reading frames into the SyncSession, writing queued messages as batched sealed frames, and
ticking the session's timers (anti-entropy, keepalive). Every failure ends this link only:
`run()` never raises except for cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..crypto.frames import PeerHello, SecureSession
from ..crypto.handshake import Handshake
from ..crypto.keys import DeviceIdentity, GroupKeys
from ..errors import ChannelClosed, ErrorCode, HandshakeError, ProtocolError
from ..ids import PeerAddress
from ..sync import codec
from ..sync.codec import Message
from ..sync.outbox import Outbox
from ..sync.session import Reply, SyncSession
from .channel import Channel

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5
STALL_SECONDS = 1.0  # a tick this late means the whole process stalled, not the peer
# Websocket close code (private-use range) and reason telling a dialler its handshake failed.
CLOSE_HANDSHAKE_REFUSED = 4001
HANDSHAKE_REFUSED = "handshake refused"


# What a dialler is told when the peer refused its handshake for a reason worth naming.
_REFUSALS = {
    ErrorCode.INVITE_USED: (
        "the peer refused our invite code: it was already used (ask a member for a new one "
        "with `unity-crdt invite`)"
    ),
    ErrorCode.INVITE_EXPIRED: (
        "the peer refused our invite code: it expired, or the group rotated its keys since "
        "(ask a member for a new one with `unity-crdt invite`)"
    ),
}


@dataclass
class LinkStats:
    """Counters of one link, for status views and metrics."""

    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    connected_at: float = 0.0
    last_seen: float = 0.0


class Link:
    """One authenticated, encrypted peer connection and its sync session."""

    def __init__(
        self,
        channel: Channel,
        *,
        keys: GroupKeys,
        identity: DeviceIdentity,
        hello: PeerHello,
        initiator: bool,
        clock: Callable[[], float],
        accept: Callable[[Link], SyncSession | None],
        handshake_timeout: float = 5.0,
        max_queue_bytes: int = 8 * 2**20,
        dial_address: PeerAddress | None = None,
        first_message_timeout: float | None = None,
        on_failed_handshake: Callable[[Link, str], None] | None = None,
        lookup: Callable[[bytes], GroupKeys] | None = None,
    ) -> None:
        self.channel = channel
        self.initiator = initiator
        self.dial_address = dial_address
        self.stats = LinkStats()
        self.remote: PeerHello | None = None
        self.session: SyncSession | None = None
        self.close_reason: str = ""
        self._keys, self._identity, self._hello = keys, identity, hello
        self._lookup = lookup
        self.keys = keys  # the keys the handshake ran with (a responder's: its lookup's)
        self.peer_closed: tuple[ErrorCode, str] | None = None  # the peer's CLOSE, if any
        self._clock = clock
        self._accept = accept
        self._handshake_timeout = handshake_timeout
        # A responder cuts a socket that sends nothing this long: silent sockets hold slots.
        self._first_message_timeout = first_message_timeout
        self._on_failed_handshake = on_failed_handshake
        self._max_queue = max_queue_bytes
        self._outbox: Outbox | None = None  # made with the session (it computes replies)
        self._early: list[Message | Reply] = []
        self._wake = asyncio.Event()
        self._secure: SecureSession | None = None
        self._closing: tuple[ErrorCode, str] | None = None
        self._ws_close: tuple[int, str] = (1000, "")

    @property
    def label(self) -> str:
        """Who this link talks to, for log lines (never secrets)."""
        if self.remote is None:
            return f"{self.channel.remote}"
        return f"{self.remote.name!r} ({self.remote.device_id[:8]}, {self.channel.remote})"

    @property
    def address(self) -> PeerAddress:
        """The address we dialled, or else the one the transport reports for the peer."""
        return self.dial_address or self.channel.remote

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the send queue (a lag indicator)."""
        return self._outbox.queued_bytes if self._outbox is not None else 0

    def send(self, messages: Sequence[Message | Reply]) -> None:
        """Queue messages for this peer without blocking.

        A peer that stops reading fills the queue; past its byte budget the link is closed
        (OVERLOADED) instead of buffering without bound. Nothing is lost: the docs hold every
        update, and the next link pulls what the peer lacks.
        """
        if self._outbox is None:
            self._early.extend(messages)
            return
        try:
            self._outbox.put(messages)
        except ProtocolError as exc:
            if self._closing is None:
                self.close_reason = f"protocol error {exc.code.name}: {exc}"
                log.warning("link %s closed: %s", self.label, self.close_reason)
                self._closing = (exc.code, str(exc))
                # The writer may be stuck on a socket the peer does not drain: cut it.
                asyncio.get_running_loop().create_task(self.channel.close(1013, "overloaded"))
            return
        self._wake.set()

    def close_soon(self, code: ErrorCode, reason: str) -> None:
        """Ask the link to end with a CLOSE frame after flushing what is queued."""
        self._closing = (code, reason)
        self._wake.set()

    async def run(self) -> None:
        """Handshake, then pump until the link ends. Logs the reason; never raises."""
        try:
            await self._handshake()
            assert self.remote is not None
            self.session = self._accept(self)
            if self.session is None:
                await self._send_close(ErrorCode.DUPLICATE_LINK, "duplicate link")
                self.close_reason = "duplicate link"
                return
            now = self._clock()
            self.stats.connected_at = self.stats.last_seen = now
            self._outbox = Outbox(self.session.reply, budget=self._max_queue)
            self.send(self.session.start())
            early, self._early = self._early, []
            self.send(early)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._reader())
                tg.create_task(self._writer())
                tg.create_task(self._ticker())
        except* ChannelClosed as group:
            self.close_reason = self.close_reason or f"connection closed ({group.exceptions[0]})"
            if self.remote is None and self._on_failed_handshake is not None:
                self._on_failed_handshake(self, self._failure_text())
            elif HANDSHAKE_REFUSED in self.close_reason and self.remote is None:
                log.warning(
                    "link %s: the peer refused our handshake (%s); is it in our sync "
                    "group, with the same group secret?",
                    self.label,
                    self.close_reason,
                )
            else:
                log.info("link %s closed: %s", self.label, self.close_reason)
        except* HandshakeError as group:
            hs_exc = group.exceptions[0]
            assert isinstance(hs_exc, HandshakeError)
            self.close_reason = f"handshake failed: {hs_exc}"
            if self._on_failed_handshake is not None:
                self._on_failed_handshake(self, self.close_reason)
            else:
                log.warning("link %s: %s", self.label, self.close_reason)
            # Tell the dialler why in the websocket close: only the error class, no details.
            self._ws_close = (CLOSE_HANDSHAKE_REFUSED, f"{HANDSHAKE_REFUSED} ({hs_exc.code.name})")
        except* ProtocolError as group:
            exc = group.exceptions[0]
            assert isinstance(exc, ProtocolError)
            self.close_reason = f"protocol error {exc.code.name}: {exc}"
            log.warning("link %s closed: %s", self.label, self.close_reason)
            await self._send_close(exc.code, str(exc))
        except* Exception as group:  # a bug must end this link only, never the node
            self.close_reason = f"internal error: {group.exceptions[0]!r}"
            log.error("link %s failed", self.label, exc_info=group.exceptions[0])
        finally:
            await self.channel.close(*self._ws_close)

    def _failure_text(self) -> str:
        for code, text in _REFUSALS.items():
            if f"{HANDSHAKE_REFUSED} ({code.name})" in self.close_reason:
                return text
        if HANDSHAKE_REFUSED in self.close_reason:
            return (
                f"the peer refused our handshake ({self.close_reason}); is it in our sync "
                "group, with the same group secret?"
            )
        return f"handshake did not complete: {self.close_reason}"

    async def _handshake(self) -> None:
        hs = Handshake(
            self._keys,
            self._identity,
            self._hello,
            initiator=self.initiator,
            now=self._clock(),
            deadline=self._handshake_timeout,
            lookup=None if self.initiator else self._lookup,
        )
        deadline = self._clock() + self._handshake_timeout
        if self.initiator:
            await self.channel.send(hs.initiate())
        silent = None if self.initiator else self._first_message_timeout
        while not hs.complete:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise HandshakeError("no handshake within deadline", ErrorCode.TIMEOUT)
            try:
                wait = remaining if silent is None else min(remaining, silent)
                data = await asyncio.wait_for(self.channel.recv(), wait)
            except TimeoutError:
                if silent is not None and wait == silent:
                    raise HandshakeError(
                        f"no handshake message within {silent:g} s", ErrorCode.TIMEOUT
                    ) from None
                raise HandshakeError("no handshake within deadline", ErrorCode.TIMEOUT) from None
            silent = None
            reply = hs.receive(data, self._clock())
            if reply is not None:
                await self.channel.send(reply)
        self.remote = hs.remote
        self.keys = hs.keys
        self._secure = hs.session()

    async def _reader(self) -> None:
        secure, session = self._secure, self.session
        assert secure is not None and session is not None
        while True:
            frame = await self.channel.recv()
            self.stats.bytes_in += len(frame)
            data = secure.open(frame)
            now = self._clock()
            self.stats.last_seen = now
            session.heard(now)  # a fragment of a long message is a sign of life too
            if data is None:
                if secure.closed_by_peer is not None:
                    code, reason = secure.closed_by_peer
                    self.peer_closed = (code, reason)
                    self.close_reason = f"peer closed: {code.name} {reason}".strip()
                    raise ChannelClosed(self.close_reason)
                continue
            msg = codec.decode(data)
            self.stats.messages_in += 1
            self.send(session.receive(msg, now))

    async def _writer(self) -> None:
        secure, outbox = self._secure, self._outbox
        assert secure is not None and outbox is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (payload := outbox.next_payload()) is not None:
                if secure.needs_rekey(self._clock()):
                    await self.channel.send(secure.rekey(self._clock()))
                for frame in secure.seal(payload):
                    await self.channel.send(frame)
                    self.stats.bytes_out += len(frame)
                self.stats.messages_out += 1
            if self._closing is not None:
                await self._send_close(*self._closing)
                self.close_reason = self.close_reason or self._closing[1]
                raise ChannelClosed(self._closing[1])

    async def _ticker(self) -> None:
        session = self.session
        assert session is not None
        last = self._clock()
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = self._clock()
            if now - last > TICK_SECONDS + STALL_SECONDS:
                # This process did not run for a while (a long GC pause, a suspended laptop):
                # that silence is ours, not the peer's, whose frames may wait unread.
                session.resumed(now)
            last = now
            self.send(session.tick(now))

    async def _send_close(self, code: ErrorCode, reason: str) -> None:
        if self._secure is None or self.channel.closed:
            return
        with contextlib.suppress(ChannelClosed, TimeoutError, ProtocolError):
            await asyncio.wait_for(self.channel.send(self._secure.close_frame(code, reason)), 1.0)
