"""unity_crdt: offline-first CRDT documents merged peer to peer, encrypted, checkpointed."""

from .checkpoint.policy import Checkpointer
from .config import NodeConfig
from .errors import (
    CacheLockedError,
    CheckpointError,
    ConfigError,
    CorruptCacheError,
    JobFailed,
    MembershipError,
    ProtocolError,
    SecurityError,
    StoreError,
    UnityCrdtError,
)
from .ids import PeerAddress
from .node import Node
from .status import LeaseInfo, Member, PeerInfo, Progress
from .store.memory import MemoryStore
from .threaded import ThreadedNode

__all__ = [
    "CacheLockedError",
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "CorruptCacheError",
    "JobFailed",
    "LeaseInfo",
    "Member",
    "MembershipError",
    "MemoryStore",
    "Node",
    "NodeConfig",
    "PeerAddress",
    "PeerInfo",
    "Progress",
    "ProtocolError",
    "SecurityError",
    "StoreError",
    "ThreadedNode",
    "UnityCrdtError",
]
