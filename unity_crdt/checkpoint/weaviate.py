"""CheckpointSink on Weaviate (async client v4): its collections, and the sink over them.

Three multi-tenant collections, one tenant per sync group (`GroupKeys.tenant`):
- `UnityCrdtCheckpoint`: one manifest object per write, id = the object id; properties
  doc_key, device, gen (FIELD-tokenised TEXT), parts, nbytes (INT), blob (the sealed header).
- `UnityCrdtCheckpointChunk`: the sealed chunks, id = `chunk_id(object, gen, index)`;
  properties owner, gen, idx, blob.
- `UnityCrdtPassage`: the passages of searchable docs, id = `passage_id(doc_key, pid)`;
  properties doc_key, pid (FIELD), text (WORD, BM25) and the app's vector (flat index: exact).
The first two have no vector index (no vectorizer, no index cost). Every query passes a limit
or pages, and every request stays under the ~100 MiB gRPC cap.

A cluster: give several URLs (any of its servers). Collections are created with replication
factor min(3, servers in the cluster) and deletions win conflicts; every read and write asks
for QUORUM, so one server of three may be down. When the server in use stops answering, the
sink moves on to the next URL.

This module and its helpers are the only ones importing `weaviate`: `_weaviate_client` (the
connection and failover), `_weaviate_objects` (manifests and chunks), `_weaviate_search`
(passages and search). They are imported through this module, after the warning filter below.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

# authlib (a weaviate-client dependency) forces its own deprecation warnings to "always" when
# imported, so a warning about its httpx shim would reach every user on every start. Import it
# first, then silence exactly that category; nothing of ours uses authlib.
from authlib.deprecate import AuthlibDeprecationWarning

warnings.filterwarnings("ignore", category=AuthlibDeprecationWarning)

import weaviate
from weaviate.classes.config import (
    Configure,
    DataType,
    Property,
    ReplicationDeletionStrategy,
    Tokenization,
)
from weaviate.classes.init import Timeout
from weaviate.exceptions import WeaviateBaseError

from . import _weaviate_objects as objects
from . import _weaviate_search as passages
from ._weaviate_client import Connection, Endpoint
from .format import Manifest, Passage, SearchHit, SearchQuery, SinkRecord

MANIFESTS = "UnityCrdtCheckpoint"
CHUNKS = "UnityCrdtCheckpointChunk"
PASSAGES = "UnityCrdtPassage"
MAX_REPLICAS = 3


def _field(name: str, data_type: DataType = DataType.TEXT) -> Property:
    if data_type == DataType.TEXT:
        return Property(name=name, data_type=data_type, tokenization=Tokenization.FIELD)
    return Property(name=name, data_type=data_type)


async def _ensure_schema(client: weaviate.WeaviateAsyncClient) -> None:
    """Create the collections that do not exist yet (multi-tenant, replicated)."""
    no_index = Configure.Vectors.self_provided(vector_index_config=Configure.VectorIndex.none())
    specs = {
        MANIFESTS: (
            [
                _field("doc_key"),
                _field("device"),
                _field("gen"),
                _field("parts", DataType.INT),
                _field("nbytes", DataType.INT),
                _field("blob", DataType.BLOB),
            ],
            no_index,
        ),
        CHUNKS: (
            [
                _field("owner"),
                _field("gen"),
                _field("idx", DataType.INT),
                _field("blob", DataType.BLOB),
            ],
            no_index,
        ),
        PASSAGES: (
            [
                _field("doc_key"),
                _field("pid"),
                Property(name="text", data_type=DataType.TEXT, tokenization=Tokenization.WORD),
            ],
            # Exact (flat) search: a group's passages are few enough, and ranking then
            # follows the embedder exactly (HNSW can miss a lone match among look-alikes).
            Configure.Vectors.self_provided(vector_index_config=Configure.VectorIndex.flat()),
        ),
    }
    replication = None
    for name, (props, vectors) in specs.items():
        if await client.collections.exists(name):
            continue
        if replication is None:
            servers = len(await client.cluster.nodes())
            replication = Configure.replication(
                factor=max(1, min(MAX_REPLICAS, servers)),
                deletion_strategy=ReplicationDeletionStrategy.DELETE_ON_CONFLICT,
            )
        try:
            await client.collections.create(
                name,
                properties=props,
                multi_tenancy_config=Configure.multi_tenancy(enabled=True),
                vector_config=vectors,
                replication_config=replication,
            )
        except WeaviateBaseError as exc:
            if "already exists" not in str(exc):  # another device created it first
                raise


class WeaviateSink:
    """CheckpointSink over Weaviate (one server or a cluster). Connects lazily, inside the
    loop that uses it, and fails over between the URLs given."""

    def __init__(
        self,
        url: str | Sequence[str],
        grpc_port: int = 50051,
        api_key: str | None = None,
        *,
        init_timeout: float = 10,
        query_timeout: float = 60,
        insert_timeout: float = 120,
    ) -> None:
        self._conn = Connection(
            url,
            grpc_port,
            api_key,
            Timeout(init=init_timeout, query=query_timeout, insert=insert_timeout),
            collections=(MANIFESTS, CHUNKS, PASSAGES),
            setup=_ensure_schema,
        )

    @property
    def endpoints(self) -> list[Endpoint]:
        """The servers given, in the order they are tried."""
        return self._conn.endpoints

    @property
    def url(self) -> str:
        """The URL of the server in use."""
        return self._conn.url

    @property
    def failovers(self) -> int:
        """Times the sink moved to another server."""
        return self._conn.failovers

    async def put(self, tenant: str, records: Sequence[SinkRecord]) -> None:
        """Store new objects: all chunks first (size-bounded batches), then the manifests."""
        await objects.put(self._conn, tenant, records)

    async def manifests(self, tenant: str, doc_keys: Sequence[str] | None = None) -> list[Manifest]:
        """Every manifest of the tenant (cursor-paged), or only those of the given doc keys."""
        return await objects.manifests(self._conn, tenant, doc_keys)

    async def chunks(self, tenant: str, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        """object_id -> its chunks in index order, fetched by id in size-bounded batches."""
        return await objects.chunks(self._conn, tenant, manifests)

    async def confirm(self, tenant: str, manifests: Sequence[Manifest]) -> set[str]:
        """The object ids among `manifests` whose manifest a QUORUM read finds now."""
        return await objects.confirm(self._conn, tenant, manifests)

    async def delete(self, tenant: str, manifests: Sequence[Manifest]) -> None:
        """Delete objects: their manifests first (readers stop seeing them), then chunks."""
        await objects.delete(self._conn, tenant, manifests)

    async def passage_ids(self, tenant: str, doc_keys: Sequence[str]) -> dict[str, set[str]]:
        """doc_key -> pids of its stored passages."""
        return await passages.passage_ids(self._conn, tenant, doc_keys)

    async def put_passages(
        self, tenant: str, add: Sequence[Passage], remove: Mapping[str, Sequence[str]]
    ) -> None:
        """Upsert `add` (with their vectors), then delete `remove`."""
        await passages.put_passages(self._conn, tenant, add, remove)

    async def search(self, tenant: str, query: SearchQuery) -> list[SearchHit]:
        """BM25, near-vector or hybrid over the passages (searchable docs only)."""
        return await passages.search(self._conn, tenant, query)

    async def close(self) -> None:
        """Close the client (a later call reconnects)."""
        await self._conn.drop()
