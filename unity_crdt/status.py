"""Status snapshots of a node, its links and its docs: plain values, JSON-ready (stdlib only).

"Synced" here means acknowledged: the peer last advertised exactly our current digest of
that doc, not merely that a handshake happened.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class PeerInfo:
    """A connected peer as the application sees it."""

    name: str
    device_id: str
    url: str


@dataclass(frozen=True)
class Member:
    """A device on the group's roster."""

    device_id: str
    name: str
    state: str  # "active" | "revoked"
    added_by: str  # the device id that added it (itself: it joined with the group secret)
    added_at: float  # wall-clock seconds since the Unix epoch (the adder's clock)


@dataclass(frozen=True)
class MembershipStatus:
    """The group as this node sees it: its epoch, its roster, and this device's place in it."""

    epoch: int  # 0 until the first revocation; +1 with each key rotation
    state: str  # "member" | "joining" (invited, not yet added) | "revoked" | "outsider"
    members: int  # active members
    revoked: int
    invites: int  # open invitations (unused, unexpired, of this epoch)
    error: str | None = None  # why this device cannot join or sync, if it cannot


@dataclass(frozen=True)
class PeerStatus:
    """One live link."""

    name: str
    device_id: str
    url: str
    connected_for: float
    last_seen_ago: float
    bytes_in: int
    bytes_out: int
    messages_in: int
    messages_out: int
    rtt: float | None
    synced_docs: tuple[str, ...]
    pending: int


@dataclass(frozen=True)
class DocStatus:
    """One document."""

    name: str
    state_bytes: int
    peers_synced: int
    last_checkpoint: float | None  # wall-clock seconds since the epoch
    checkpoint_error: str | None
    dirty: bool


@dataclass(frozen=True)
class RelayStatus:
    """The cloud channel (NATS): where, whether it is up and why not, how far behind."""

    url: str  # the configured URL(s), comma-separated, without credentials
    connected: bool
    server: str | None  # the server this node is connected to right now
    error: str | None  # why it is not connected (or the last failure)
    lag: int  # stream messages not yet applied here
    outbox: int  # messages made here the stream has not acknowledged yet (held: one per doc)


@dataclass(frozen=True)
class CacheRecovery:
    """What one recovery of the local cache found, kept and lost."""

    at: float  # wall-clock seconds since the epoch
    reason: str  # what was found, e.g. "2 rows failed their checksum"
    moved_to: str | None  # the damaged file, kept as it was, when the cache was rebuilt
    quarantined: int  # damaged rows and snapshot parts copied into the quarantine table
    lost: tuple[tuple[str, int], ...]  # (doc, rows or snapshot parts of it not loaded)
    unattributed: int  # rows or regions lost whose doc cannot be told (unreadable pages)
    everything: bool  # nothing of the old file could be read
    repaired: int = 0  # rows whose doc name lost a bit (the CRC says which), kept whole

    def affects(self, doc: str) -> bool:
        """Whether `doc` may have lost content in this recovery."""
        return self.everything or self.unattributed > 0 or any(d == doc for d, _ in self.lost)


@dataclass(frozen=True)
class CacheStatus:
    """Health of the local cache: failing writes and what recoveries found."""

    store_error: str | None = None  # the last write error while edits are not on disk
    unsaved_docs: tuple[str, ...] = ()  # docs with edits only in memory until writes work
    failed_writes: int = 0  # writes that failed since start
    recoveries: int = 0  # recoveries since start
    last_recovery: CacheRecovery | None = None


@dataclass(frozen=True)
class Progress:
    """How far a job is: tasks in all (inputs x redundancy), done, failed for good, running."""

    total: int
    done: int
    failed: int
    running: int


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a lease now: its fencing token and how long it lasts without renewal."""

    device_id: str
    name: str
    token: int
    expires_in: float  # seconds, as this node sees it


@dataclass(frozen=True)
class JobStatus:
    """One job as this node sees it (`unity-crdt jobs`)."""

    job_id: str
    kind: str
    total: int
    done: int
    failed: int
    running: int
    submitted_by: str  # device id
    submitted_at: float  # wall-clock seconds since the epoch, by the submitter's clock


@dataclass(frozen=True)
class WorkStatus:
    """Collective work on this node: the coordination mode, kinds served, jobs and leases."""

    mode: str  # "strict" (NATS key-value reachable) or "lan" (CRDT claims)
    coordination_url: str | None  # without credentials
    connected: bool
    error: str | None  # why strict mode is not available (or the last failure)
    kinds: tuple[str, ...]  # the task kinds this node works on
    running: int  # tasks running on this node now
    jobs: tuple[JobStatus, ...] = ()
    leases: tuple[LeaseInfo, ...] = ()


@dataclass(frozen=True)
class NodeStatus:
    """Everything a status view shows, taken at one moment."""

    name: str
    device_id: str
    url: str
    uptime: float
    peers: tuple[PeerStatus, ...]
    docs: tuple[DocStatus, ...]
    checkpoints: bool
    checkpoint_error: str | None
    pending_writes: int
    yjs_url: str | None
    # Signs that the checkpoint store served an older copy of an object or lost one.
    checkpoint_warnings: tuple[str, ...] = ()
    relay: RelayStatus | None = None
    cache: CacheStatus = field(default_factory=CacheStatus)
    membership: MembershipStatus | None = None
    # Docs a peer holds with other content under the same ids (a member equivocated, #11 F6).
    equivocations: tuple[str, ...] = ()
    work: WorkStatus | None = None  # jobs, leases and the coordination mode

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)
