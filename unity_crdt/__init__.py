"""unity_crdt: offline-first CRDT documents that merge peer to peer, encrypted, checkpointed to Weaviate."""

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

__all__ = [
    "CacheLockedError",
    "CheckpointError",
    "ConfigError",
    "CorruptCacheError",
    "ProtocolError",
    "SecurityError",
    "StoreError",
    "UnityCrdtError",
]
