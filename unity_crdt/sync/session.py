"""The sync rules of one peer link, as a sans-IO state machine (`SyncSession`).

Theory of operation
===================

A node holds many named documents and links to several peers. For each link it runs one
`SyncSession`, which turns messages received from that peer into messages to send back, and
which never touches a socket or a clock: the driver (`net.link`) feeds it decoded messages with
the current time and sends whatever it returns. Everything here is a pure function of the
replica's state and the calls made, which is what lets the property tests run thousands of
lossy, reordered, partitioned schedules in seconds.

Handshake by inventory. Each side opens with HELLO carrying its protocol version and an
inventory: doc name -> 16-byte digest of (state vector, delete set). The digest must cover
the delete set because deleting content never moves a state vector. For every doc whose digest
differs, or that only one side has, the receiver of a HELLO sends SYNC_STEP_1 with its own
state vector (the empty vector if it lacks the doc). The other side answers with SYNC_STEP_2:
everything the asker lacks plus the full delete set. Since both sides receive the other's HELLO,
each side *pulls* what it is missing; docs with equal digests cost nothing. A peer asking about
a doc we lack gets an empty update; we never create a doc just because somebody asked.

Follow-up HELLO. Once every SYNC_STEP_1 of a round has been answered, a side whose inventory
changed since the HELLO it last sent sends a fresh HELLO. The peer compares and, if equal,
records the docs as synced; if not (concurrent edits), another round starts. A round only
follows a change, so without edits the exchange stops.

Live updates and relay. After the handshake, each committed change is sent as UPDATE. The
replica reports every effective change with its origin; the node hands changes that came from
peer P to every session except P's (`local_update`). Relaying terminates because applying an
update a replica already has changes nothing and is not reported. A `SeenFilter` shared by all
sessions of a node also skips UPDATE payloads the node has already seen (same bytes arriving
over two paths), saving the decode.

Acknowledgement. Once live updates on a link have been quiet for `ack_delay`, a side whose
inventory moved since its last HELLO sends a fresh one, so the peer can acknowledge (or repair)
what the burst carried within about a second, without waiting for anti-entropy.

Anti-entropy. Updates can be lost (a link drops with frames in flight, a peer restarts
before persisting). `tick` sends a fresh HELLO every `anti_entropy_interval`, so any
difference is found by digest and repaired by the same pull, on every link, forever.

Keepalive. `tick` sends PING when nothing was heard for `ping_interval` and raises
ProtocolError(TIMEOUT) once nothing was heard for `idle_timeout`; the driver then closes the
link. Any received message counts as a sign of life.

Synced status. `is_synced(doc)` is True only when the digest the peer last *advertised* equals
ours now: acknowledged state, not "the first handshake finished". An UPDATE from the peer makes
its digest unknown until its next HELLO; a local change makes ours differ.

Errors. Anything other than PING or PONG before the peer's HELLO, a version mismatch, or an
invalid update or state vector raises ProtocolError; the driver closes the link with its code
(in a sealed CLOSE frame), and the replica is left unchanged by the bad input.
A policy hook `allow(doc)` hides docs from a peer: they are left out of our inventory, asked-for
as if absent, and their incoming updates are dropped (and counted).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ErrorCode, ProtocolError
from .codec import (
    PROTOCOL_VERSION,
    Awareness,
    Batch,
    Hello,
    Message,
    Notice,
    Ping,
    Pong,
    SyncStep1,
    SyncStep2,
    Update,
)
from .replica import RemoteOrigin, Replica
from .yjs import is_empty_update

EMPTY_UPDATE = b"\x00\x00"
_UNKNOWN = b""  # a peer digest made stale by an update from that peer


class SeenFilter:
    """A bounded set of update content hashes (blake2b-128), oldest forgotten first."""

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    @staticmethod
    def key(update: bytes) -> bytes:
        """The content hash of an update."""
        return hashlib.blake2b(update, digest_size=16).digest()

    def add(self, update: bytes) -> bool:
        """Remember `update`; False if it was already remembered."""
        key = self.key(update)
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return True

    def __contains__(self, update: object) -> bool:
        return isinstance(update, bytes) and self.key(update) in self._keys

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(slots=True)
class SessionStats:
    """Counters of one session, for status pages and tests."""

    messages_received: int = 0
    hellos_sent: int = 0
    hellos_received: int = 0
    step1_sent: int = 0
    step2_sent: int = 0
    updates_sent: int = 0
    updates_applied: int = 0
    duplicates_skipped: int = 0
    denied: int = 0
    rounds_completed: int = 0
    rtt: float | None = None


class SyncSession:
    """The sync state machine of one peer link (see the module docstring)."""

    def __init__(
        self,
        replica: Replica,
        *,
        peer: str,
        now: float,
        seen: SeenFilter | None = None,
        anti_entropy_interval: float = 30.0,
        ping_interval: float = 10.0,
        idle_timeout: float = 30.0,
        ack_delay: float = 0.5,
        allow: Callable[[str], bool] | None = None,
        on_awareness: Callable[[str, bytes], None] | None = None,
        on_notice: Callable[[Notice], None] | None = None,
    ) -> None:
        self.replica = replica
        self.peer = peer
        self.origin = RemoteOrigin(peer)
        self.seen = seen if seen is not None else SeenFilter()
        self.anti_entropy_interval = anti_entropy_interval
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.ack_delay = ack_delay
        self.stats = SessionStats()
        self._allow = allow if allow is not None else _allow_all
        self._on_awareness = on_awareness
        self._on_notice = on_notice
        self._last_heard = now
        self._last_hello = now
        self._last_ping = now
        self._ping_nonce = 0
        self._ping_sent: tuple[int, float] | None = None
        self._peer_ready = False
        self._peer_digests: dict[str, bytes] = {}
        self._awaiting: set[str] = set()
        self._sent_inventory: dict[str, bytes] | None = None
        self._changed = False  # live updates flowed since the last tick
        self._quiet_since: float | None = None

    # -- status -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the peer's HELLO has arrived."""
        return self._peer_ready

    def is_synced(self, doc: str) -> bool:
        """Whether the peer last advertised exactly our current state of `doc`."""
        if not self._peer_ready or not self._allow(doc):
            return False
        ours = None if self.replica.is_empty(doc) else self.replica.digest(doc)
        return self._peer_digests.get(doc) == ours

    @property
    def synced_docs(self) -> frozenset[str]:
        """Every doc either side holds whose state the peer has acknowledged."""
        names = set(self._peer_digests) | set(self.replica.names())
        return frozenset(d for d in names if self.is_synced(d))

    # -- inputs -----------------------------------------------------------------------------

    def start(self, now: float | None = None) -> list[Message]:
        """Open (or reopen) the exchange: our HELLO."""
        if now is not None:
            self._last_hello = now
        return [self._hello()]

    def receive(self, msg: Message, now: float) -> list[Message]:
        """Handle one message from the peer; return the replies to send to it."""
        self._last_heard = max(self._last_heard, now)
        out: list[Message] = []
        self._receive(msg, now, out)
        return out

    def local_update(self, doc: str, update: bytes) -> list[Message]:
        """Forward an update that did not come from this peer."""
        if not self._allow(doc):
            return []
        self.seen.add(update)
        self.stats.updates_sent += 1
        self._changed = True
        return [Update(doc, update)]

    def tick(self, now: float) -> list[Message]:
        """Periodic duties: anti-entropy HELLO, PING; raise ProtocolError(TIMEOUT) if idle."""
        silent = now - self._last_heard
        if silent >= self.idle_timeout:
            raise ProtocolError(f"nothing heard from peer for {silent:.1f} s", ErrorCode.TIMEOUT)
        out: list[Message] = []
        if now - self._last_hello >= self.anti_entropy_interval or self._ack_due(now):
            self._last_hello = now
            out.append(self._hello())
        if silent >= self.ping_interval and now - self._last_ping >= self.ping_interval:
            self._last_ping = now
            self._ping_nonce += 1
            self._ping_sent = (self._ping_nonce, now)
            out.append(Ping(self._ping_nonce))
        return out

    def _ack_due(self, now: float) -> bool:
        """Whether live traffic has been quiet for `ack_delay` and our inventory moved.

        A HELLO then lets the peer acknowledge (or repair) what the live updates carried,
        so "synced" follows a burst of edits within about a second instead of waiting for
        the next anti-entropy round; during a burst nothing extra is sent.
        """
        if self._changed:
            self._changed = False
            self._quiet_since = now
            return False
        if self._quiet_since is None or now - self._quiet_since < self.ack_delay:
            return False
        self._quiet_since = None
        return self._peer_ready and self._inventory() != self._sent_inventory

    # -- dispatch ---------------------------------------------------------------------------

    def _receive(self, msg: Message, now: float, out: list[Message]) -> None:
        if isinstance(msg, Batch):
            for inner in msg.messages:
                self._receive(inner, now, out)
            return
        self.stats.messages_received += 1
        if isinstance(msg, Ping):
            out.append(Pong(msg.nonce))
        elif isinstance(msg, Pong):
            if self._ping_sent is not None and self._ping_sent[0] == msg.nonce:
                self.stats.rtt = now - self._ping_sent[1]
                self._ping_sent = None
        elif isinstance(msg, Hello):
            self._on_hello(msg, out)
        elif not self._peer_ready:
            raise ProtocolError(f"{type(msg).__name__} received before HELLO")
        elif isinstance(msg, SyncStep1):
            self._on_step1(msg, out)
        elif isinstance(msg, SyncStep2):
            self._on_step2(msg, out)
        elif isinstance(msg, Update):
            self._on_update(msg)
        elif isinstance(msg, Awareness):
            if self._allow(msg.doc) and self._on_awareness is not None:
                self._on_awareness(msg.doc, msg.payload)
        elif isinstance(msg, Notice):
            if self._allow(msg.doc) and self._on_notice is not None:
                self._on_notice(msg)
        else:  # pragma: no cover - the codec only produces the types above
            raise ProtocolError(f"unexpected message {type(msg).__name__}")

    def _on_hello(self, msg: Hello, out: list[Message]) -> None:
        if msg.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol version {msg.version}, we speak {PROTOCOL_VERSION}",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        self._peer_ready = True
        self.stats.hellos_received += 1
        theirs = {d: h for d, h in msg.inventory.items() if self._allow(d)}
        ours = self._inventory()
        self._peer_digests = theirs
        differing = sorted(d for d in ours.keys() | theirs.keys() if ours.get(d) != theirs.get(d))
        # Replacing (not adding to) the awaited set means a lost SYNC_STEP_2 cannot wedge the
        # follow-up logic: the next HELLO starts the round afresh.
        self._awaiting = set(differing)
        for d in differing:
            out.append(SyncStep1(d, self.replica.state_vector(d)))
            self.stats.step1_sent += 1

    def _on_step1(self, msg: SyncStep1, out: list[Message]) -> None:
        if self._allow(msg.doc) and msg.doc in self.replica:
            update = self.replica.diff(msg.doc, msg.state_vector)
        else:
            if not self._allow(msg.doc):
                self.stats.denied += 1
            update = EMPTY_UPDATE
        out.append(SyncStep2(msg.doc, update))
        self.stats.step2_sent += 1

    def _on_step2(self, msg: SyncStep2, out: list[Message]) -> None:
        self._apply(msg.doc, msg.update)
        if msg.doc in self._awaiting:
            self._awaiting.discard(msg.doc)
            if not self._awaiting:
                self.stats.rounds_completed += 1
                if self._inventory() != self._sent_inventory:
                    out.append(self._hello())

    def _on_update(self, msg: Update) -> None:
        if msg.update in self.seen:
            self.stats.duplicates_skipped += 1
            return
        if self._apply(msg.doc, msg.update):
            self.seen.add(msg.update)
            self._peer_digests[msg.doc] = _UNKNOWN
            self._changed = True

    def _apply(self, doc: str, update: bytes) -> bool:
        if not self._allow(doc):
            self.stats.denied += 1
            return False
        if doc not in self.replica and is_empty_update(update):
            return False  # never create a doc out of nothing
        self.replica.apply_remote(doc, update, self.origin)
        self.stats.updates_applied += 1
        return True

    # -- helpers ----------------------------------------------------------------------------

    def _inventory(self) -> dict[str, bytes]:
        return {d: h for d, h in self.replica.inventory().items() if self._allow(d)}

    def _hello(self) -> Hello:
        inventory = self._inventory()
        self._sent_inventory = inventory
        self.stats.hellos_sent += 1
        return Hello(PROTOCOL_VERSION, inventory)


def _allow_all(doc: str) -> bool:
    return True
