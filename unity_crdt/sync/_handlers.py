"""The message handlers of `SyncSession`: rounds, pulls, content checks, updates, parts.

`_Handlers` is the base class of `SyncSession` (`sync/session.py`, whose docstring is the
theory of operation). It holds what each message of the exchange does, once
`SyncSession._receive` has dispatched it: the reconciliation round (SUMMARY, BUCKETS,
INVENTORY, ADVERT) and its pulls, their answers (SYNC_STEP_2, PART streams), live UPDATEs,
content CHECKs, and the views of our inventory that `allow` filters. It lives apart only to
keep modules small: it owns no state and is never used alone; `SyncSession.__init__` sets
every attribute declared below.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ErrorCode, ProtocolError
from .codec import Part, SyncStep1, Update
from .inventory import BUCKETS, Buckets, Check, Inventory, InventoryRequest, Summary
from .nodewide import DocQuota, PullGate, SeenFilter
from .replica import RemoteOrigin, Replica
from .yjs import bucket_of, entry_hash, is_empty_update

if TYPE_CHECKING:  # session.py imports this module at run time; these are for the type checker
    from .session import Outgoing, SessionStats

PAGE_ENTRIES = 1024
CHECKS_PER_ROUND = 8  # content checks sent with each anti-entropy SUMMARY (#11 F6)
_UNKNOWN = b""  # a peer digest made stale by an update from that peer


class _Handlers:
    """The message handlers of `SyncSession` (see the module docstring)."""

    # Set by SyncSession.__init__ (see there for what each one means).
    replica: Replica
    origin: RemoteOrigin
    pulled_origin: RemoteOrigin
    seen: SeenFilter
    pulls: PullGate
    quota: DocQuota
    stats: SessionStats
    max_doc_bytes: int
    _allow: Callable[[str], bool] | None
    _on_equivocation: Callable[[str], None] | None
    _check_cursor: str
    _last_heard: float
    _peer_ready: bool
    _peer_digests: dict[str, bytes]
    _peer_fp: bytes | None
    _sent_fp: bytes | None
    _paging: dict[int, str]
    _awaiting_buckets: bool
    _awaiting: set[str]
    _deferred: set[str]
    _partial: dict[str, list[bytes] | None]
    _partial_size: dict[str, int]
    _changes: int
    _round_peer_fp: bytes | None
    _round_progress: float

    # -- status of the exchange -------------------------------------------------------------

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

    # -- handlers ---------------------------------------------------------------------------

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
