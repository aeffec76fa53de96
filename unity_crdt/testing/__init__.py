"""Test kit for users and adapter authors: contract suites every backend runs, in-memory
doubles, and the in-memory node harness.

- `check_store(factory)`: the local-cache contract (`store.base.Store`).
- `check_sink(factory)`: the checkpoint-sink contract (`checkpoint.format.CheckpointSink`).
- `ConceptEmbedder`: a deterministic embedder, so tests can check ranking by meaning.
- `check_channel(transport, address)`: the transport contract (`net.channel.Transport`).
- `MemoryTransport`, `channel_pair()`: channels inside one event loop.
- `Party`, `Net`: sans-IO nodes (replica + sessions + the node's router) on in-memory links.
"""

from ._channel import MemoryChannel, MemoryTransport, channel_pair, check_channel
from ._embedder import ConceptEmbedder
from ._sink import check_sink
from ._store import check_store
from .harness import Net, Party

__all__ = [
    "ConceptEmbedder",
    "MemoryChannel",
    "MemoryTransport",
    "Net",
    "Party",
    "channel_pair",
    "check_channel",
    "check_sink",
    "check_store",
]
