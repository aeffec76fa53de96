"""The relay policy: the group's cloud channel on a message broker (NATS JetStream).

A relay is one more destination of the node's `Router`: it gets every update that did not come
from it, and what it brings is applied with its own `RemoteOrigin` (`RELAY_ORIGIN`), so it is
never echoed back, and an update that arrives over both the mesh and the relay changes the doc
once (the second copy changes nothing; the node's `SeenFilter` skips it before decoding).

Theory of operation
===================

Outbound. Each update is encoded (`sync.codec.Update`), sealed (`crypto.envelope`), queued in
the durable `RelayOutbox` and published to the group's stream with a keyed `Nats-Msg-Id`. A part
leaves the outbox only when the stream acknowledged it; while the broker is unreachable parts
wait (on disk), and after a reconnect every unacknowledged part is re-sent under its old id,
which the stream's duplicate window turns into a no-op if it had arrived after all. While
`window` messages await acknowledgement, new updates are held in memory and go out merged, one
message per doc, as soon as one is acknowledged (or at `flush()`, or into the outbox when the
connection drops): under sustained typing each message then carries many edits.

Inbound. An ordered consumer reads the stream from the cursor (the last sequence applied here,
kept in the outbox file). After a reconnect it starts again from the cursor, so a node that was
offline for hours catches up from the stream. If the stream no longer holds the cursor's next
message (retention passed, or the stream was recreated), that is a *gap*.

Anti-entropy. Once caught up, the relay asks the group (a plain subject, request/reply) with its
inventory: digests and state vectors of every doc. Each member that answers sends what the asker
lacks (`SyncStep2`) and its own state vector (`SyncStep1`), and the asker publishes what the
member lacks. After a gap with nobody answering within `gap_wait`, `on_gap` runs (the node
restores from its checkpoint sink).

Commit notices travel on a plain subject: they are hints for caches, not data.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from ..crypto.envelope import Reassembler, RelaySealer
from ..errors import ProtocolError, SecurityError, UnityCrdtError
from ..status import RelayStatus
from ..sync import codec
from ..sync.codec import Batch, Hello, Members, Notice, SyncStep1, SyncStep2, Update
from ..sync.nodewide import SeenFilter
from ..sync.replica import RemoteOrigin, Replica, merge_small
from ..sync.yjs import is_empty_update
from ._outbox import Entry, RelayOutbox

__all__ = ["RELAY_ORIGIN", "Broker", "Relay", "RelaySettings"]

log = logging.getLogger(__name__)

RELAY_ORIGIN = RemoteOrigin("relay")  # the source of every update that came through the relay
_EMPTY_SV = b"\x00"
_HEADER_ROOM = 512  # the Nats-Msg-Id header and protocol line count against max_payload
SYNC_DELAY = 0.25  # seconds between outbox writes while parts and cursor move


class _Unsubscribe(Protocol):
    async def unsubscribe(self) -> Any: ...


class Broker(Protocol):
    """What the relay needs from a message broker (`net.nats.NatsBroker` is the one we ship)."""

    last_error: str | None

    @property
    def connected(self) -> bool: ...

    @property
    def server(self) -> str | None: ...

    @property
    def max_payload(self) -> int: ...

    async def connect(self, on_down: Callable[[], None], on_up: Callable[[], None]) -> None: ...

    async def ensure_stream(
        self,
        name: str,
        subject: str,
        *,
        max_age: float,
        max_bytes: int,
        replicas: int,
        duplicate_window: float,
    ) -> Any: ...

    async def publish(self, subject: str, data: bytes, msg_id: str) -> asyncio.Future[int]: ...

    async def publish_plain(self, subject: str, data: bytes, reply: str = "") -> None: ...

    def new_inbox(self) -> str: ...

    async def subscribe(
        self, subject: str, handler: Callable[[str, bytes, str | None], Awaitable[None]]
    ) -> _Unsubscribe: ...

    async def consume(
        self,
        stream: str,
        subject: str,
        start_seq: int,
        handler: Callable[[int, int, str, bytes], Awaitable[None]],
    ) -> _Unsubscribe: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class RelaySettings:
    """The relay's knobs (the node fills them from NodeConfig)."""

    url: str  # for status: the configured URLs, without credentials
    deltas: bool = True
    max_age: float = 7 * 86400.0
    max_bytes: int = 2**30
    replicas: int = 1
    duplicate_window: float = 1200.0
    ack_timeout: float = 5.0
    gap_wait: float = 2.0
    retry: float = 1.0
    # Stream messages awaiting acknowledgement before new edits are held back and merged:
    # the per-message cost of JetStream and nats-py dominates, so sustained typing goes out in
    # fewer, larger messages, while a lone edit never waits.
    window: int = 4


class Relay:
    """The group's cloud channel: outbox, catch-up, dedupe with the mesh, anti-entropy."""

    def __init__(
        self,
        *,
        broker: Broker,
        sealer: RelaySealer,
        outbox: RelayOutbox,
        replica: Replica,
        seen: SeenFilter,
        settings: RelaySettings,
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
        on_notice: Callable[[Notice], None],
        on_gap: Callable[[], None] | None = None,
        on_members: Callable[[Members], None] | None = None,
    ) -> None:
        self._broker, self._sealer, self._outbox = broker, sealer, outbox
        self._on_members = on_members
        self._halted = False  # a new epoch took over: nothing more in or out
        self._replica, self._seen, self.settings = replica, seen, settings
        self._spawn, self._on_notice, self._on_gap = spawn, on_notice, on_gap
        self._me = sealer.device_id
        self._incarnation = os.urandom(8)  # fresh per run: message ids never repeat
        self._bodies = 0
        self._reassembler = Reassembler()
        self._ready = False  # connected, stream known, consumer running
        self._error: str | None = "connecting"
        self._lag = 0
        self._stream_created = ""
        self._caught_up = False
        self._gap = False
        self._answered = False
        self._ask_due = False
        self._inbox = ""
        self._consumer: _Unsubscribe | None = None
        self._wake = asyncio.Event()
        self._dirty = asyncio.Event()
        self._up = asyncio.Event()  # a reconnect happened: set the stream up again
        self._changed = asyncio.Event()
        self._held: dict[str, list[bytes]] = {}
        self._flying = 0  # parts handed to the broker and not yet acknowledged
        self.applied = 0
        self.duplicates = 0
        self.refused = 0

    # -- the node's side --------------------------------------------------------------------

    async def start(self) -> None:
        """Open the outbox and start connecting in the background (never waits for NATS)."""
        await self._outbox.open()
        self._spawn(self._run(), "relay")
        self._spawn(self._pump(), "relay publisher")
        self._spawn(self._syncer(), "relay outbox")

    def send(self, doc: str, update: bytes) -> None:
        """Queue one update for the group's stream (durable at the next outbox sync)."""
        if not self.settings.deltas or self._halted:
            return
        self._seen.add(update)
        if self._held or self._flying >= self.settings.window:
            # The stream acknowledges each message in turn; what is edited meanwhile goes
            # out merged, as one message per doc, when an acknowledgement frees the window.
            self._held.setdefault(doc, []).append(update)
            return
        self._queue(self._sealer.updates_subject, codec.encode(Update(doc, update)))

    def send_members(self, ops: tuple[bytes, ...]) -> None:
        """Queue roster ops on the group's stream: members read them in order with the
        updates, so one who missed a revocation learns it before what followed it (also on a
        halted relay: the old epoch's channel is where its members look)."""
        self._queue(self._sealer.updates_subject, codec.encode(Members(ops)))

    def halt(self) -> None:
        """A new epoch took over: apply nothing more that arrives, take nothing more to send
        (what is already queued still goes out until `close`)."""
        self._halted = True
        self._notify()

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued part was acknowledged (at most `timeout` s)."""
        try:
            await self.wait_until(lambda: not self._outbox.entries, timeout)
        except TimeoutError:
            return False
        return True

    def _release(self) -> None:
        """Seal and queue the held updates, merged per doc."""
        held, self._held = self._held, {}
        for doc, updates in held.items():
            merged = merge_small(updates)
            self._queue(self._sealer.updates_subject, codec.encode(Update(doc, merged)))

    def notify(self, notice: Notice) -> None:
        """Send a commit notice to the members online now (dropped while offline)."""
        if self._ready and not self._halted:
            data = codec.encode(notice)
            self._spawn(self._plain(self._sealer.notices_subject, data), "relay notice")

    def status(self) -> RelayStatus:
        """Connected, where, why not, how far behind, how much waits to go out."""
        return RelayStatus(
            url=self.settings.url,
            connected=self._ready,
            server=self._broker.server if self._ready else None,
            error=None if self._ready else (self._broker.last_error or self._error),
            lag=self._lag,
            outbox=len(self._outbox) + len(self._held),
        )

    @property
    def connected(self) -> bool:
        """Whether the relay is connected and set up."""
        return self._ready

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until `predicate()` holds (re-checked on every change of the relay's state)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.1)
                self._changed.clear()

    async def flush(self) -> None:
        """Make every queued update durable in the outbox file."""
        self._release()
        await self._outbox.sync()

    async def close(self) -> None:
        """Give in-flight parts a moment to be acknowledged, persist the rest, disconnect."""
        self._release()
        with contextlib.suppress(TimeoutError):
            await self.wait_until(lambda: not self._in_flight(), 2.0)
        self._ready = False
        await self._broker.close()
        await self._outbox.close()

    # -- connection -------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()

    def _down(self) -> None:
        self._ready = False
        self._error = "disconnected; reconnecting"
        for entry in self._outbox.entries.values():
            self._abandon(entry)
        self._release()  # into the durable outbox, to go out on reconnect
        self._notify()

    async def _run(self) -> None:
        await self._broker.connect(self._down, self._up.set)
        log.info("relay: connected to %s", self._broker.server)
        while True:
            try:
                await self._setup()
            except (UnityCrdtError, OSError, Exception) as exc:  # broker errors vary
                self._error = f"setting up the stream failed: {exc or type(exc).__name__}"
                log.warning("relay: %s", self._error)
                await asyncio.sleep(self.settings.retry)
                continue
            await self._up.wait()
            self._up.clear()
            log.info("relay: reconnected to %s", self._broker.server)

    async def _setup(self) -> None:
        b, s = self._broker, self.settings
        stream = await b.ensure_stream(
            self._sealer.stream,
            self._sealer.updates_subject,
            max_age=s.max_age,
            max_bytes=s.max_bytes,
            replicas=s.replicas,
            duplicate_window=s.duplicate_window,
        )
        if not self._inbox:  # plain subscriptions survive reconnects (the client renews them)
            self._inbox = b.new_inbox()
            await b.subscribe(self._sealer.notices_subject, self._on_plain)
            await b.subscribe(self._inbox, self._on_plain)
            if s.deltas:
                await b.subscribe(self._sealer.sync_subject, self._on_plain)
        cursor = self._outbox.consumed
        first = max(1, stream.first_seq)  # an empty stream reports 0
        if self._outbox.stream_created != stream.created:
            # A stream we never read, or one recreated since: read all it has.
            self._gap = cursor > 0 or first > 1
            cursor = first - 1
        elif cursor + 1 < first:
            self._gap = True  # retention dropped messages we never applied
            cursor = first - 1
        self._stream_created = stream.created
        self._outbox.set_cursor(cursor, stream.created)
        self._lag = max(0, stream.last_seq - cursor)
        self._caught_up = False
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.unsubscribe()
            self._consumer = None
        if s.deltas:
            self._consumer = await b.consume(
                self._sealer.stream, self._sealer.updates_subject, cursor + 1, self._on_stream
            )
        self._ready = True
        self._error = None
        self._wake.set()
        self._notify()
        if self._lag == 0:
            self._on_caught_up()

    # -- outbound ---------------------------------------------------------------------------

    def _queue(self, subject: str, body: bytes) -> None:
        self._bodies += 1
        frag = self._sealer.frag_id(self._incarnation, self._bodies)
        room = self._broker.max_payload - _HEADER_ROOM
        for i, part in enumerate(self._sealer.seal(subject, body, frag, room)):
            self._outbox.add(subject, self._sealer.msg_id(frag, i), part)
        self._wake.set()
        self._dirty.set()

    def _in_flight(self) -> bool:
        return any(e.ack is not None for e in self._outbox.entries.values())

    def _abandon(self, entry: Entry) -> None:
        if entry.ack is not None:
            ack, entry.ack = entry.ack, None
            self._flying -= 1
            ack.cancel()
        entry.sent_at = None

    async def _pump(self) -> None:
        """Publish every part not in flight, in order; re-send parts not acknowledged in time."""
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.ack_timeout / 2)
            self._wake.clear()
            if not self._ready:
                continue
            now = loop.time()
            for entry in list(self._outbox.entries.values()):
                if entry.sent_at is not None and now - entry.sent_at > self.settings.ack_timeout:
                    self._abandon(entry)  # no answer: send it again under the same id
                if entry.sent_at is not None or entry.seq not in self._outbox.entries:
                    continue
                if not self._ready:
                    break
                try:
                    ack = await self._broker.publish(entry.subject, entry.data, entry.msg_id)
                except Exception as exc:
                    log.debug("relay: publish failed, will retry: %s", exc)
                    break
                entry.sent_at, entry.ack = now, ack
                self._flying += 1
                ack.add_done_callback(functools.partial(self._acked, entry))

    def _acked(self, entry: Entry, ack: asyncio.Future[int]) -> None:
        if entry.ack is not ack:
            return  # abandoned meanwhile
        entry.ack = None
        self._flying -= 1
        if self._held and self._flying < self.settings.window:
            self._release()
        if ack.cancelled() or ack.exception() is not None:
            entry.sent_at = None
            asyncio.get_running_loop().call_later(self.settings.retry, self._wake.set)
            return
        self._outbox.ack(entry)
        self._dirty.set()
        if not self._outbox.entries:
            self._notify()
            self._ask()

    async def _syncer(self) -> None:
        while True:
            await self._dirty.wait()
            # Gather a burst into one write; a part acknowledged meanwhile is never written
            # (flush() writes at once when a caller needs durability now).
            await asyncio.sleep(SYNC_DELAY)
            self._dirty.clear()
            try:
                await self._outbox.sync()
            except UnityCrdtError as exc:
                log.error("relay: %s", exc)
                await asyncio.sleep(1.0)
                self._dirty.set()

    async def _plain(self, subject: str, body: bytes, reply: str = "") -> None:
        frag = os.urandom(8)
        room = self._broker.max_payload - _HEADER_ROOM
        try:
            for part in self._sealer.seal(subject, body, frag, room):
                await self._broker.publish_plain(subject, part, reply)
        except Exception as exc:
            log.debug("relay: plain publish failed: %s", exc)

    # -- inbound ----------------------------------------------------------------------------

    def _open(self, subject: str, data: bytes) -> tuple[str, codec.Message] | None:
        """Authenticate, reassemble and decode; None for our own, partial or refused input."""
        try:
            part = self._sealer.open(subject, data)
            body = self._reassembler.add(part)
            if body is None or part.sender == self._me:
                return None
            return part.sender, codec.decode(body)
        except (SecurityError, ProtocolError) as exc:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                log.warning("relay: refused %d message(s); latest: %s", self.refused, exc)
            return None

    async def _on_stream(self, seq: int, pending: int, subject: str, data: bytes) -> None:
        if self._halted:
            return
        opened = self._open(subject, data)
        if opened is not None and isinstance(opened[1], Update):
            self._apply(opened[1].doc, opened[1].update)
        elif opened is not None and isinstance(opened[1], Members) and self._on_members:
            self._on_members(opened[1])
            if self._halted:  # those ops moved the node to a new epoch: read no further
                return
        self._outbox.set_cursor(seq, self._stream_created)
        self._lag = pending
        self._dirty.set()
        if pending == 0 and not self._caught_up:
            self._on_caught_up()

    def _apply(self, doc: str, update: bytes) -> None:
        if update in self._seen:
            self.duplicates += 1
            return
        if doc not in self._replica and is_empty_update(update):
            return
        try:
            self._replica.apply_remote(doc, update, RELAY_ORIGIN)
        except ProtocolError as exc:
            self.refused += 1
            log.warning("relay: an update from the group was refused: %s", exc)
            return
        self._seen.add(update)
        self.applied += 1

    async def _on_plain(self, subject: str, data: bytes, reply: str | None) -> None:
        if self._halted:
            return
        opened = self._open(subject, data)
        if opened is None:
            return
        msg = opened[1]
        if isinstance(msg, Notice) and subject == self._sealer.notices_subject:
            self._on_notice(msg)
        elif isinstance(msg, Batch) and subject == self._sealer.sync_subject and reply:
            answer = self._answer(msg)
            if answer is not None:
                await self._plain(reply, codec.encode(answer))
        elif isinstance(msg, Batch) and subject == self._inbox:
            self._answered = True
            self._take_answer(msg)

    # -- anti-entropy -----------------------------------------------------------------------

    def _on_caught_up(self) -> None:
        self._caught_up = True
        self._notify()
        if self.settings.deltas:
            self._ask_due = True
            self._ask()

    def _ask(self) -> None:
        """Ask the group for what we lack, once our own queued parts are out (fewer races)."""
        if not self._ask_due or self._outbox.entries or not self._ready:
            return
        self._ask_due = False
        names = self._replica.names()
        ask: list[codec.Message] = [Hello(codec.PROTOCOL_VERSION, self._replica.inventory())]
        ask += [SyncStep1(d, self._replica.state_vector(d)) for d in names]
        self._answered = False
        body = codec.encode(Batch(tuple(ask)))
        self._spawn(self._plain(self._sealer.sync_subject, body, self._inbox), "relay sync")
        if self._gap:
            self._gap = False
            self._spawn(self._after_gap(), "relay gap")

    async def _after_gap(self) -> None:
        await asyncio.sleep(self.settings.gap_wait)
        if not self._answered and self._on_gap is not None:
            log.info("relay: the stream lost history and no member answered; asking the sink")
            self._on_gap()

    def _answer(self, ask: Batch) -> Batch | None:
        """Our reply to a member's inventory: our digests and state vectors of the docs that
        differ, and what the member lacks of each."""
        hellos = [m for m in ask.messages if isinstance(m, Hello)]
        if len(hellos) != 1:
            return None
        theirs = hellos[0].inventory
        svs = {m.doc: m.state_vector for m in ask.messages if isinstance(m, SyncStep1)}
        ours = self._replica.inventory()
        differ = sorted(d for d in ours.keys() | theirs.keys() if ours.get(d) != theirs.get(d))
        if not differ:
            return None
        out: list[codec.Message] = [
            Hello(codec.PROTOCOL_VERSION, {d: ours[d] for d in differ if d in ours})
        ]
        for doc in differ:
            if doc in ours:
                out.append(SyncStep2(doc, self._replica.diff(doc, svs.get(doc, _EMPTY_SV))))
            out.append(SyncStep1(doc, self._replica.state_vector(doc)))
        return Batch(tuple(out))

    def _take_answer(self, answer: Batch) -> None:
        hellos = [m for m in answer.messages if isinstance(m, Hello)]
        theirs = hellos[0].inventory if len(hellos) == 1 else {}
        for msg in answer.messages:
            if isinstance(msg, SyncStep2):
                self._apply(msg.doc, msg.update)
        for msg in answer.messages:
            if not isinstance(msg, SyncStep1) or self._replica.is_empty(msg.doc):
                continue
            if self._replica.digest(msg.doc) == theirs.get(msg.doc):
                continue
            try:
                missing = self._replica.diff(msg.doc, msg.state_vector)
            except ProtocolError:
                continue
            self.send(msg.doc, missing)  # what that member lacks goes to the whole group
