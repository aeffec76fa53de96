"""What one node shares between the sync sessions of all its links (one of each per node).

`SeenFilter` remembers which updates already went by on any link, so an update relayed along
several paths is applied and forwarded once. `PullGate` lets one link at a time pull a given
doc, so peers met at once do not each send the same history. `DocQuota` caps how fast peers,
all links together, can make this node create docs. `Node` builds one of each and hands them
to every `SyncSession` (`sync/session.py`); its `SeenFilter` guards the cloud relay too.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict


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
