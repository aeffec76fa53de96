"""The sync rules of one peer link, as a sans-IO state machine (`SyncSession`).

Theory of operation
===================

A node holds many named documents and links to several peers. For each link it runs one
`SyncSession`, which turns messages received from that peer into messages to send back, and
which never touches a socket or a clock: the driver (`net.link`) feeds it decoded messages with
the current time and sends whatever it returns. Everything here is a pure function of the
replica's state and the calls made, which is what lets the property tests run thousands of
lossy, reordered, partitioned schedules in seconds.

Inventories that scale. Each side opens with HELLO (the protocol version) and a SUMMARY: a
16-byte fingerprint of its whole inventory (doc name -> digest of state vector *and* delete
set: deleting content never moves a state vector) and the number of docs. Equal fingerprints
mean nothing to do, whatever the number of docs. Otherwise the receiver asks for the peer's
256 bucket fingerprints (a doc's bucket is a hash of its name), and pages only the buckets
that differ (INVENTORY_REQUEST / INVENTORY, 1,024 entries a page). For each entry whose digest
differs from ours it PULLS: SYNC_STEP_1 with our state vector; the peer answers SYNC_STEP_2
with what we lack plus its delete set. Each side pulls what it is missing, and asks only about
docs the peer has: a doc only we hold is the peer's to pull. There is no cap on the number of
docs, only on each message.

Replies are computed when they can be sent. A SYNC_STEP_1 yields a `Reply` marker, not bytes;
the driver calls `reply()` when its queue has room, so a peer asking for 20,000 docs costs a
queue of names, not of diffs, and a 50 MB doc costs one diff at a time. A diff larger than
PART_SIZE travels as PART messages (the driver interleaves them with live traffic and pings)
and is reassembled here, up to `max_doc_bytes`.

Live updates, pull-only history. A local change goes out as UPDATE; the node's router pushes
live updates from one peer on to the others. What a node *pulled* (SYNC_STEP_2) is not pushed:
the other links learn of it from our next SUMMARY and pull exactly what they lack. So a node
meeting several peers at once receives each history once, not once per path. A live update
bigger than PART_SIZE is not pushed either: an ADVERT (doc, digest) makes the peer pull it.

Acknowledgement. Once a link has been quiet for `ack_delay` after a change, a side whose
fingerprint moved since its last SUMMARY sends a fresh one, so the peer can acknowledge (or
repair) what a burst carried within about a second. A completed round of pulls does the same.

Anti-entropy. `tick` sends a SUMMARY every `anti_entropy_interval`, so any difference (a lost
frame, a restart before persisting, state still pending in pycrdt) is found and repaired by
the same pull, on every link, forever.

Keepalive. `tick` sends PING when nothing was heard for `ping_interval` and raises
ProtocolError(TIMEOUT) once nothing was heard for `idle_timeout`; any authenticated frame
counts (`heard`), so a long transfer is not mistaken for silence.

Synced status. `is_synced(doc)` is True only when the digest the peer last advertised equals
ours now: acknowledged state, not "the first handshake finished".

Limits. New docs peers make this node create are rate limited by a node-wide `DocQuota` (a
burst, refilled per second): over it a pull or an update is skipped, counted, and retried by
anti-entropy. Errors: anything but PING/PONG before the peer's HELLO, a version
mismatch, an invalid update or state vector, or a part stream over `max_doc_bytes` raises
ProtocolError; the driver closes the link with its code, and the replica is left unchanged by
the bad input. A round whose answers stop coming for `anti_entropy_interval` is abandoned
(their late arrivals are ignored, a part stream under way is dropped to its final part), so
nothing can wedge the exchange; a slow 200 MB transfer that keeps moving is never cut off.
`allow(doc)` hides docs from a peer.
"""

from __future__ import annotations

import bisect
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
    Members,
    Message,
    Notice,
    Part,
    Ping,
    Pong,
    SyncStep1,
    SyncStep2,
    Update,
)
from .inventory import BUCKETS, Advert, Buckets, Check, Inventory, InventoryRequest, Summary
from .replica import RemoteOrigin, Replica
from .yjs import bucket_of, check_state_vector, entry_hash, is_empty_update

EMPTY_UPDATE = b"\x00\x00"
PAGE_ENTRIES = 1024
PART_SIZE = 512 * 1024  # well inside one 1 MiB frame, so parts interleave with live traffic
CHECKS_PER_ROUND = 8  # content checks sent with each anti-entropy SUMMARY (#11 F6)
_UNKNOWN = b""  # a peer digest made stale by an update from that peer


@dataclass(frozen=True, slots=True)
class Reply:
    """A SYNC_STEP_2 owed to the peer, computed by `SyncSession.reply` when it can be sent."""

    doc: str
    state_vector: bytes


Outgoing = Message | Reply


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


class PullGate:
    """One pull per doc at a time across all links of a node.

    When several peers meet at once, pulling a doc from each of them in parallel brings the
    same history over every link. A session that finds a doc's pull already under way on
    another link defers its own; once that pull is done it pulls again (at its next tick) with
    the state vector that now includes what arrived, so it only gets what is still missing.
    A pull held longer than `stale_after` (a link that vanished mid-pull) can be taken over.
    """

    def __init__(self, stale_after: float = 30.0) -> None:
        self.stale_after = stale_after
        self._owners: dict[str, tuple[object, float]] = {}

    def acquire(self, doc: str, who: object, now: float) -> bool:
        """Whether `who` may pull `doc` now (and then holds it until `release`)."""
        held = self._owners.get(doc)
        if held is not None and held[0] is not who and now - held[1] < self.stale_after:
            return False
        self._owners[doc] = (who, now)
        return True

    def release(self, doc: str, who: object) -> None:
        """`who` finished (or gave up) pulling `doc`."""
        held = self._owners.get(doc)
        if held is not None and held[0] is who:
            del self._owners[doc]

    def release_all(self, who: object) -> None:
        """`who` is gone: free every pull it held."""
        for doc in [d for d, (owner, _) in self._owners.items() if owner is who]:
            del self._owners[doc]


class DocQuota:
    """How many new docs peers may make this node create: a burst, refilled per second.

    One per node, shared by all its links: a member that reconnects (or mints a new device
    key) gets no fresh allowance. Over it, a pull or an update of a new doc is skipped and
    anti-entropy retries it later, so legitimate docs arrive late, never lost.
    """

    def __init__(self, burst: int = 50_000, rate: float = 1000.0) -> None:
        self.burst, self.rate = float(burst), rate
        self._tokens = float(burst)
        self._refilled: float | None = None

    def take(self, now: float) -> bool:
        """Spend one doc creation; False when the quota is used up."""
        if self._refilled is not None and now > self._refilled:
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now if self._refilled is None else max(self._refilled, now)
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


@dataclass(slots=True)
class SessionStats:
    """Counters of one session, for status pages and tests."""

    messages_received: int = 0
    summaries_sent: int = 0
    summaries_received: int = 0
    pages_received: int = 0
    step1_sent: int = 0
    step2_sent: int = 0
    parts_sent: int = 0
    updates_sent: int = 0
    adverts_sent: int = 0
    updates_applied: int = 0
    duplicates_skipped: int = 0
    denied: int = 0
    over_quota: int = 0
    pulls_deferred: int = 0
    equivocations: int = 0
    rounds_completed: int = 0
    rounds_abandoned: int = 0
    unsolicited: int = 0
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
        pulls: PullGate | None = None,
        anti_entropy_interval: float = 30.0,
        ping_interval: float = 10.0,
        idle_timeout: float = 30.0,
        ack_delay: float = 0.5,
        allow: Callable[[str], bool] | None = None,
        on_awareness: Callable[[str, bytes], None] | None = None,
        max_doc_bytes: int = 256 * 2**20,
        quota: DocQuota | None = None,
        on_notice: Callable[[Notice], None] | None = None,
        on_members: Callable[[Members], None] | None = None,
        on_equivocation: Callable[[str], None] | None = None,
    ) -> None:
        self.replica = replica
        self.peer = peer
        self.origin = RemoteOrigin(peer)
        self.pulled_origin = RemoteOrigin(peer, pulled=True)
        self.seen = seen if seen is not None else SeenFilter()
        self.pulls = pulls if pulls is not None else PullGate(anti_entropy_interval)
        self.anti_entropy_interval = anti_entropy_interval
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.ack_delay = ack_delay
        self.max_doc_bytes = max_doc_bytes
        self.stats = SessionStats()
        self._allow = allow
        self._on_awareness = on_awareness
        self._on_notice = on_notice
        self._on_members = on_members
        self._on_equivocation = on_equivocation
        self._check_cursor = ""  # content checks rotate through the docs by name
        self._last_heard = self._last_summary = self._last_ping = now
        self._ping_nonce = 0
        self._ping_sent: tuple[int, float] | None = None
        self._peer_ready = False
        self._peer_digests: dict[str, bytes] = {}
        self._peer_fp: bytes | None = None
        self._sent_fp: bytes | None = None
        self._paging: dict[int, str] = {}  # bucket -> last doc id asked about
        self._awaiting_buckets = False
        self._awaiting: set[str] = set()
        self._deferred: set[str] = set()  # pulls waiting for another link's pull of the doc
        self._partial: dict[str, list[bytes] | None] = {}  # None: drop to the final part
        self._partial_size: dict[str, int] = {}
        # Changes are counted where they happen and timed at the next tick, which has a clock.
        self._changes = self._changes_seen = 0
        self._changed_at: float | None = None
        self._round_peer_fp: bytes | None = None
        self._round_progress = now
        self.quota = quota if quota is not None else DocQuota()

    # -- status -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the peer's HELLO has arrived."""
        return self._peer_ready

    @property
    def busy(self) -> bool:
        """Whether a reconciliation round is in progress (pages or pulls outstanding)."""
        return bool(self._paging or self._awaiting or self._awaiting_buckets or self._deferred)

    def is_synced(self, doc: str) -> bool:
        """Whether the peer last advertised exactly our current state of `doc`."""
        if not self._peer_ready or not self._allowed(doc):
            return False
        return self._peer_digests.get(doc) == self._our_digest(doc)

    @property
    def synced_docs(self) -> frozenset[str]:
        """Every doc either side holds whose state the peer has acknowledged."""
        names = set(self._peer_digests) | set(self.replica.names())
        return frozenset(d for d in names if self.is_synced(d))

    # -- inputs -----------------------------------------------------------------------------

    def start(self, now: float | None = None) -> list[Outgoing]:
        """Open the exchange: our HELLO and SUMMARY."""
        if now is not None:
            self._last_summary = now
        return [Hello(PROTOCOL_VERSION, {}), self._summary()]

    def heard(self, now: float) -> None:
        """A sign of life that carried no whole message (a fragment of a large one)."""
        self._last_heard = max(self._last_heard, now)

    def receive(self, msg: Message, now: float) -> list[Outgoing]:
        """Handle one message from the peer; return the replies to send to it."""
        self.heard(now)
        out: list[Outgoing] = []
        self._receive(msg, now, out)
        return out

    def local_update(self, doc: str, update: bytes) -> list[Message]:
        """Forward an update that did not come from this peer."""
        if not self._allowed(doc):
            return []
        self._changes += 1
        if len(update) > PART_SIZE:
            # Too big to push inline: tell the peer, which pulls it in parts.
            self.stats.adverts_sent += 1
            return [Advert(doc, self.replica.digest(doc))]
        self.seen.add(update)
        self.stats.updates_sent += 1
        return [Update(doc, update)]

    def reply(self, pending: Reply) -> list[Message]:
        """The SYNC_STEP_2 owed for `pending`, in PART messages if it is large."""
        if self._allowed(pending.doc) and pending.doc in self.replica:
            update = self.replica.diff(pending.doc, pending.state_vector)
        else:
            update = EMPTY_UPDATE
        self.stats.step2_sent += 1
        if len(update) <= PART_SIZE:
            return [SyncStep2(pending.doc, update)]
        view = memoryview(update)
        n = len(update)
        parts: list[Message] = [
            Part(pending.doc, bytes(view[i : i + PART_SIZE]), i + PART_SIZE >= n)
            for i in range(0, n, PART_SIZE)
        ]
        self.stats.parts_sent += len(parts)
        return parts

    def resumed(self, now: float) -> None:
        """This side did not run for a while: the peer's silence counts from now (a ping asks)."""
        self._last_heard = max(self._last_heard, now - self.ping_interval)

    def tick(self, now: float) -> list[Outgoing]:
        """Periodic duties: SUMMARY (acknowledgement, anti-entropy), PING; raise on silence."""
        silent = now - self._last_heard
        if silent >= self.idle_timeout:
            raise ProtocolError(f"nothing heard from peer for {silent:.1f} s", ErrorCode.TIMEOUT)
        if self.busy and now - self._round_progress >= self.anti_entropy_interval:
            self._abandon_round()  # the answers stopped coming: the next SUMMARY starts afresh
        out: list[Outgoing] = []
        if self._deferred:  # another link's pull may be done: pull what still differs
            for doc in sorted(self._deferred):
                self._deferred.discard(doc)
                self._pull(doc, now, out)
            self._maybe_round_done(out)
        if now - self._last_summary >= self.anti_entropy_interval:
            # HELLO again too (3 bytes): whatever became of the first, the peer can answer.
            self._last_summary = now
            out += [Hello(PROTOCOL_VERSION, {}), self._summary(), *self._checks()]
        elif self._peer_ready and self._ack_due(now):
            self._last_summary = now
            out.append(self._summary())
        if silent >= self.ping_interval and now - self._last_ping >= self.ping_interval:
            self._last_ping = now
            self._ping_nonce += 1
            self._ping_sent = (self._ping_nonce, now)
            out.append(Ping(self._ping_nonce))
        return out

    def _ack_due(self, now: float) -> bool:
        """Quiet for `ack_delay` since the last change, no round open, and our inventory moved."""
        if self._changes != self._changes_seen:
            self._changes_seen = self._changes
            self._changed_at = now
            return False
        if self._changed_at is None or now - self._changed_at < self.ack_delay or self.busy:
            return False
        self._changed_at = None
        return self._fingerprint()[0] != self._sent_fp

    # -- dispatch ---------------------------------------------------------------------------

    def _receive(self, msg: Message, now: float, out: list[Outgoing]) -> None:
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
            self._on_hello(msg)
        elif not self._peer_ready:
            raise ProtocolError(f"{type(msg).__name__} received before HELLO")
        elif isinstance(msg, Update):
            self._on_update(msg, now)
        elif isinstance(msg, SyncStep2):
            self._on_step2(msg.doc, msg.update, now, out)
        elif isinstance(msg, Part):
            self._on_part(msg, now, out)
        elif isinstance(msg, SyncStep1):
            check_state_vector(msg.state_vector)  # before it waits in a queue
            out.append(Reply(msg.doc, msg.state_vector))
        elif isinstance(msg, Summary):
            self._on_summary(msg, out)
        elif isinstance(msg, InventoryRequest):
            self._on_inventory_request(msg, out)
        elif isinstance(msg, Buckets):
            self._on_buckets(msg, out)
        elif isinstance(msg, Inventory):
            self._on_inventory(msg, now, out)
        elif isinstance(msg, Advert):
            self._note_peer(msg.doc, msg.digest, now, out)
        elif (
            isinstance(msg, Awareness) and self._allowed(msg.doc) and self._on_awareness is not None
        ):
            self._on_awareness(msg.doc, msg.payload)
        elif isinstance(msg, Check):
            self._on_check(msg)
        elif isinstance(msg, Notice) and self._allowed(msg.doc) and self._on_notice is not None:
            self._on_notice(msg)
        elif isinstance(msg, Members) and self._on_members is not None:
            self._on_members(msg)

    def _on_hello(self, msg: Hello) -> None:
        if msg.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol version {msg.version}, we speak {PROTOCOL_VERSION}",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        self._peer_ready = True

    def _on_summary(self, msg: Summary, out: list[Outgoing]) -> None:
        self.stats.summaries_received += 1
        self._peer_fp = msg.fingerprint
        if msg.fingerprint == self._fingerprint()[0]:
            self._peer_digests = self._inventory()
            return
        if not self.busy:
            self._start_round(out)

    def _start_round(self, out: list[Outgoing]) -> None:
        self._awaiting_buckets = True
        self._round_peer_fp = self._peer_fp
        self._round_progress = self._last_heard
        out.append(InventoryRequest(None))

    def _abandon_round(self) -> None:
        self.stats.rounds_abandoned += 1
        self._awaiting_buckets = False
        self._paging.clear()
        self._awaiting.clear()
        self._deferred.clear()
        self.pulls.release_all(self)
        # Streams under way are dropped to their final part (see _on_part).
        self._partial = dict.fromkeys(self._partial)
        self._partial_size.clear()

    def _on_inventory_request(self, msg: InventoryRequest, out: list[Outgoing]) -> None:
        if msg.bucket is None:
            out.append(Buckets(self._bucket_fingerprints()))
            return
        entries, more = self.replica.bucket_page(msg.bucket, msg.after, PAGE_ENTRIES)
        if self._allow is not None:
            entries = [(d, h) for d, h in entries if self._allow(d)]
        out.append(Inventory(msg.bucket, tuple(entries), more))

    def _on_buckets(self, msg: Buckets, out: list[Outgoing]) -> None:
        if not self._awaiting_buckets:
            self.stats.unsolicited += 1  # late, from an abandoned round
            return
        self._awaiting_buckets = False
        ours = self._bucket_fingerprints()
        for bucket in range(BUCKETS):
            if msg.fingerprints[bucket] != ours[bucket]:
                self._paging[bucket] = ""
                out.append(InventoryRequest(bucket, ""))
            else:  # an equal bucket: the peer holds exactly our docs of it
                for doc in self.replica.bucket_names(bucket, "", None):
                    if self._allowed(doc):
                        self._peer_digests[doc] = self.replica.digest(doc)
        self._maybe_round_done(out)

    def _on_inventory(self, msg: Inventory, now: float, out: list[Outgoing]) -> None:
        after = self._paging.get(msg.bucket)
        if after is None:
            self.stats.unsolicited += 1  # late, from an abandoned round
            return
        self.stats.pages_received += 1
        self._round_progress = now
        names = [doc for doc, _ in msg.entries]
        if names and (names[0] <= after or any(bucket_of(d) != msg.bucket for d in names)):
            raise ProtocolError("inventory page out of order or of the wrong bucket")
        last = names[-1] if msg.more and names else None
        listed = set(names)
        # Our docs of this range that the peer did not list: it lacks them (and will pull).
        for doc in self.replica.bucket_names(msg.bucket, after, last):
            if doc not in listed:
                self._peer_digests.pop(doc, None)
        for doc, digest in msg.entries:
            self._note_peer(doc, digest, now, out)
        if msg.more and last is not None:
            self._paging[msg.bucket] = last
            out.append(InventoryRequest(msg.bucket, last))
        else:
            del self._paging[msg.bucket]
            self._maybe_round_done(out)

    def _note_peer(self, doc: str, digest: bytes, now: float, out: list[Outgoing]) -> None:
        """The peer holds `digest` of `doc`: pull when ours differs."""
        if not self._allowed(doc):
            self.stats.denied += 1
            return
        self._peer_digests[doc] = digest
        self._pull(doc, now, out)

    def _pull(self, doc: str, now: float, out: list[Outgoing]) -> None:
        """SYNC_STEP_1 for `doc` if the peer's digest still differs from ours."""
        if self._peer_digests.get(doc) in (self._our_digest(doc), None) or doc in self._awaiting:
            return
        if not self.pulls.acquire(doc, self, now):
            self.stats.pulls_deferred += 1
            self._deferred.add(doc)
            return
        if doc not in self.replica and not self._take_token(now):
            self.pulls.release(doc, self)
            return
        self._awaiting.add(doc)
        self.stats.step1_sent += 1
        out.append(SyncStep1(doc, self.replica.state_vector(doc)))

    def _checks(self) -> list[Outgoing]:
        """Content checks of up to CHECKS_PER_ROUND docs the peer acknowledged, in turn.

        Digests cover ids and deletions only; a member that sent different items under one id
        to two nodes leaves them with equal digests and different content. The content digest
        shows it.
        """
        names = self.replica.names()
        start = bisect.bisect_right(names, self._check_cursor)
        out: list[Outgoing] = []
        for name in names[start:] + names[:start]:
            if len(out) == CHECKS_PER_ROUND:
                break
            if self.is_synced(name) and not self.replica.is_empty(name):
                out.append(
                    Check(name, self.replica.digest(name), self.replica.content_digest(name))
                )
                self._check_cursor = name
        return out

    def _on_check(self, msg: Check) -> None:
        if not self._allowed(msg.doc) or msg.doc not in self.replica:
            return
        if self.replica.digest(msg.doc) != msg.digest:
            return  # not the same ids: an ordinary difference, for the pulls to settle
        if self.replica.content_digest(msg.doc) != msg.content:
            self.stats.equivocations += 1
            if self._on_equivocation is not None:
                self._on_equivocation(msg.doc)

    def _on_update(self, msg: Update, now: float) -> None:
        if msg.update in self.seen:
            self.stats.duplicates_skipped += 1
            return
        if not self._allowed(msg.doc):
            self.stats.denied += 1
            return
        if msg.doc not in self.replica and not self._take_token(now):
            return
        if self._apply(msg.doc, msg.update, self.origin):
            self.seen.add(msg.update)
            self._peer_digests[msg.doc] = _UNKNOWN
            self._changes += 1

    def _on_part(self, msg: Part, now: float, out: list[Outgoing]) -> None:
        # Parts carry no offset, and the peer sends one stream at a time: whether a stream is
        # ours is decided at its first part, and holds to its final one. A stream that began
        # before we pulled (a late answer) is dropped whole, never spliced into the next.
        if msg.doc not in self._partial:
            self._partial[msg.doc] = [] if msg.doc in self._awaiting else None
        chunks = self._partial[msg.doc]
        if chunks is None:
            self.stats.unsolicited += 1
            if msg.final:
                del self._partial[msg.doc]
            return
        size = self._partial_size.get(msg.doc, 0) + len(msg.data)
        if size > self.max_doc_bytes:
            raise ProtocolError(
                f"doc {msg.doc!r} is over the limit of {self.max_doc_bytes} bytes",
                ErrorCode.TOO_LARGE,
            )
        chunks.append(msg.data)  # joined once at the end: one copy of a 200 MB doc, not many
        self._partial_size[msg.doc] = size
        self._round_progress = now
        if msg.final:  # the replica guards the whole update as it applies it
            del self._partial[msg.doc], self._partial_size[msg.doc]
            self._on_step2(msg.doc, b"".join(chunks), now, out)

    def _on_step2(self, doc: str, update: bytes, now: float, out: list[Outgoing]) -> None:
        self._apply(doc, update, self.pulled_origin)
        if doc in self._awaiting:
            self._round_progress = now
            self._awaiting.discard(doc)
            self.pulls.release(doc, self)
            self._changes += 1
            self._maybe_round_done(out)

    def _maybe_round_done(self, out: list[Outgoing]) -> None:
        if self.busy:
            return
        self.stats.rounds_completed += 1
        ours = self._fingerprint()[0]
        if ours != self._sent_fp:
            out.append(self._summary())
        if self._peer_fp not in (ours, self._round_peer_fp):
            self._start_round(out)  # the peer moved on while we paged: look again

    def _apply(self, doc: str, update: bytes, origin: RemoteOrigin) -> bool:
        if not self._allowed(doc):
            self.stats.denied += 1
            return False
        if doc not in self.replica and is_empty_update(update):
            return False  # never create a doc out of nothing
        self.replica.apply_remote(doc, update, origin)
        self.stats.updates_applied += 1
        return True

    def close(self) -> None:
        """The link is gone: free the pulls it held, so other links can make them."""
        self._abandon_round()

    # -- helpers ----------------------------------------------------------------------------

    def _allowed(self, doc: str) -> bool:
        return self._allow is None or self._allow(doc)

    def _take_token(self, now: float) -> bool:
        if self.quota.take(now):
            return True
        self.stats.over_quota += 1
        return False

    def _our_digest(self, doc: str) -> bytes | None:
        return None if self.replica.is_empty(doc) else self.replica.digest(doc)

    def _inventory(self) -> dict[str, bytes]:
        return {d: h for d, h in self.replica.inventory().items() if self._allowed(d)}

    def _fingerprint(self) -> tuple[bytes, int]:
        if self._allow is None:
            return self.replica.fingerprint()
        acc = 0
        inventory = self._inventory()
        for doc, digest in inventory.items():
            acc ^= int.from_bytes(entry_hash(doc, digest), "big")
        return acc.to_bytes(16, "big"), len(inventory)

    def _bucket_fingerprints(self) -> tuple[bytes, ...]:
        if self._allow is None:
            return self.replica.bucket_fingerprints()
        acc = [0] * BUCKETS
        for doc, digest in self._inventory().items():
            acc[bucket_of(doc)] ^= int.from_bytes(entry_hash(doc, digest), "big")
        return tuple(a.to_bytes(16, "big") for a in acc)

    def _summary(self) -> Summary:
        fingerprint, count = self._fingerprint()
        self._sent_fp = fingerprint
        self.stats.summaries_sent += 1
        return Summary(fingerprint, count)
