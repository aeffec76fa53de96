"""unity_crdt: offline-first CRDT documents merged peer to peer, encrypted, checkpointed."""

from .config import NodeConfig
from .errors import (
    CacheLockedError,
    CheckpointError,
    ConfigError,
    CorruptCacheError,
    ProtocolError,
    SecurityError,
    StoreError,
    UnityCrdtError,
)
from .mesh import PeerInfo
from .node import Node

__all__ = [
    "CacheLockedError",
    "CheckpointError",
    "ConfigError",
    "CorruptCacheError",
    "Node",
    "NodeConfig",
    "PeerInfo",
    "ProtocolError",
    "SecurityError",
    "StoreError",
    "UnityCrdtError",
]
