"""CheckpointSink on Weaviate (the only module importing `weaviate`; async client v4).

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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import warnings
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

# authlib (a weaviate-client dependency) forces its own deprecation warnings to "always" when
# imported, so a warning about its httpx shim would reach every user on every start. Import it
# first, then silence exactly that category; nothing of ours uses authlib.
from authlib.deprecate import AuthlibDeprecationWarning

warnings.filterwarnings("ignore", category=AuthlibDeprecationWarning)

import weaviate
from weaviate.classes.config import (
    Configure,
    ConsistencyLevel,
    DataType,
    Property,
    ReplicationDeletionStrategy,
    Tokenization,
)
from weaviate.classes.data import DataObject
from weaviate.classes.init import AdditionalConfig, Auth, Timeout
from weaviate.classes.query import Filter, MetadataQuery
from weaviate.classes.tenants import Tenant
from weaviate.exceptions import WeaviateBaseError

from ..errors import CheckpointError, ConfigError
from .format import (
    PUT_BUDGET,
    Manifest,
    Passage,
    SearchHit,
    SearchQuery,
    SinkRecord,
    check_tenant,
    chunk_id,
    passage_id,
)

MANIFESTS = "UnityCrdtCheckpoint"
CHUNKS = "UnityCrdtCheckpointChunk"
PASSAGES = "UnityCrdtPassage"
MAX_REPLICAS = 3
_PAGE = 500
_UNREACHABLE = ("onnect", "UNAVAILABLE", "unreachable", "refused", "no such host")
_MANIFEST_PROPS = ["doc_key", "device", "gen", "parts", "nbytes", "blob"]
_T = TypeVar("_T")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return base64.b64decode(str(value), validate=True)


def _field(name: str, data_type: DataType = DataType.TEXT) -> Property:
    if data_type == DataType.TEXT:
        return Property(name=name, data_type=data_type, tokenization=Tokenization.FIELD)
    return Property(name=name, data_type=data_type)


@dataclass(frozen=True)
class Endpoint:
    """One server of a Weaviate deployment: its HTTP URL and gRPC port."""

    url: str
    host: str
    port: int
    grpc_port: int
    secure: bool

    @classmethod
    def parse(cls, url: str, grpc_port: int = 50051) -> Endpoint:
        """Read `http(s)://host:port[?grpc=PORT]` (`weaviate://` means http)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "weaviate") or not parts.hostname:
            raise ConfigError(f"Weaviate URL must look like http://host:port, got {url!r}")
        query = parse_qs(parts.query)
        if "grpc" in query:
            try:
                grpc_port = int(query["grpc"][-1])
            except ValueError:
                raise ConfigError(f"grpc port must be a number in {url!r}") from None
        secure = parts.scheme == "https"
        try:
            port = parts.port or (443 if secure else 80)
        except ValueError:
            raise ConfigError(f"bad port in Weaviate URL {url!r}") from None
        base = f"{'https' if secure else 'http'}://{parts.netloc}"
        return cls(base, parts.hostname, port, grpc_port, secure)


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
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ConfigError("a Weaviate sink needs at least one URL")
        self.endpoints = [Endpoint.parse(u, grpc_port) for u in urls]
        self._at = 0  # the endpoint in use
        self._api_key = api_key
        self._timeout = Timeout(init=init_timeout, query=query_timeout, insert=insert_timeout)
        self._client: weaviate.WeaviateAsyncClient | None = None
        self._schema_ready = False
        self._tenants: set[str] = set()
        self._handles: dict[str, tuple[Any, Any, Any]] = {}  # tenant -> QUORUM handles
        self._connect_lock = asyncio.Lock()
        self.failovers = 0  # times the sink moved to another server

    @property
    def url(self) -> str:
        """The URL of the server in use."""
        return self.endpoints[self._at].url

    def _new_client(self, ep: Endpoint) -> weaviate.WeaviateAsyncClient:
        config = AdditionalConfig(timeout=self._timeout)
        auth = Auth.api_key(self._api_key) if self._api_key else None
        if ep.host.endswith((".weaviate.cloud", ".weaviate.network")):
            # Weaviate Cloud serves gRPC on its own "grpc-" host; the helper knows the layout.
            return weaviate.use_async_with_weaviate_cloud(
                cluster_url=ep.url,
                auth_credentials=auth or "",
                additional_config=config,
                skip_init_checks=True,
            )
        if ep.host in ("127.0.0.1", "localhost", "::1") and not ep.secure:
            return weaviate.use_async_with_local(
                host=ep.host,
                port=ep.port,
                grpc_port=ep.grpc_port,
                additional_config=config,
                skip_init_checks=True,
                auth_credentials=auth,
            )
        return weaviate.use_async_with_custom(
            http_host=ep.host,
            http_port=ep.port,
            http_secure=ep.secure,
            grpc_host=ep.host,
            grpc_port=ep.grpc_port,
            grpc_secure=ep.secure,
            additional_config=config,
            skip_init_checks=True,
            auth_credentials=auth,
        )

    async def _call(self, what: str, call: Awaitable[_T]) -> _T:
        """Await one client call, mapping every failure to CheckpointError with a clear reason."""
        url = self.url
        try:
            return await call
        except CheckpointError:
            raise
        except TimeoutError as exc:
            await self._drop(failover=True)
            raise CheckpointError(f"Weaviate at {url} timed out during {what}") from exc
        except (WeaviateBaseError, OSError, ConnectionError) as exc:
            text = str(exc)
            if any(s in text for s in _UNREACHABLE):
                await self._drop(failover=True)
                raise CheckpointError(f"Weaviate at {url} is unreachable during {what}") from exc
            if "tenant not found" in text:
                self._tenants.clear()
                self._handles.clear()
            if "timed out" in text or "DEADLINE_EXCEEDED" in text:
                await self._drop(failover=True)
                raise CheckpointError(f"Weaviate at {url} timed out during {what}") from exc
            raise CheckpointError(f"Weaviate {what} failed: {text[:300]}") from exc

    async def _drop(self, failover: bool = False) -> None:
        """Forget the client after a failure so the next call reconnects (to the next URL)."""
        client, self._client = self._client, None
        self._schema_ready = False
        self._tenants.clear()
        self._handles.clear()
        if failover and len(self.endpoints) > 1:
            self._at = (self._at + 1) % len(self.endpoints)
            self.failovers += 1
        if client is not None:
            # closing a broken client must not hide the real error
            with contextlib.suppress(Exception):
                await client.close()

    async def _connect(self) -> weaviate.WeaviateAsyncClient:
        """A live client, trying each URL once, starting with the one in use."""
        errors = []
        for _ in self.endpoints:
            client = self._new_client(self.endpoints[self._at])
            try:
                await client.connect()
                if len(self.endpoints) == 1 or await client.is_live():
                    return client
                errors.append(f"{self.url} is not live")
            except Exception as exc:  # every failure here means: try the next server
                errors.append(f"{self.url}: {str(exc)[:120] or type(exc).__name__}")
            with contextlib.suppress(Exception):
                await client.close()
            self._at = (self._at + 1) % len(self.endpoints)
        raise CheckpointError(f"Weaviate is unreachable during connect ({'; '.join(errors)})")

    async def _collections(self, tenant: str, *, write: bool = False) -> tuple[Any, Any, Any]:
        """Connected (manifests, chunks, passages) handles for `tenant`, at QUORUM.

        Before a write or a listing on an existing connection, a cheap liveness probe runs
        first: the client retries an unreachable server for ~15 s on its own, while the
        Checkpointer should see the failure at once, fail over, and apply its own backoff.
        """
        handles = self._handles.get(tenant)
        if handles is not None and not write and self._client is not None:
            return handles  # the hot path of queries: no lock, no new handle objects
        check_tenant(tenant)
        async with self._connect_lock:
            if self._client is None:
                if len(self.endpoints) == 1:
                    self._client = self._new_client(self.endpoints[0])
                    await self._call("connect", self._client.connect())
                else:
                    self._client = await self._connect()
            elif write and not await self._call("liveness check", self._client.is_live()):
                await self._drop(failover=True)
                raise CheckpointError(f"Weaviate at {self.url} is unreachable during write")
            client = self._client
            assert client is not None
            if not self._schema_ready:
                await self._call("schema setup", self._ensure_schema(client))
                self._schema_ready = True
            cols = [client.collections.get(n) for n in (MANIFESTS, CHUNKS, PASSAGES)]
            if tenant not in self._tenants:
                for col in cols:
                    await self._call("tenant setup", col.tenants.create([Tenant(name=tenant)]))
                self._tenants.add(tenant)
        handles = self._handles.get(tenant)
        if handles is None:
            man, chk, pas = (
                c.with_tenant(tenant).with_consistency_level(ConsistencyLevel.QUORUM) for c in cols
            )
            handles = self._handles[tenant] = (man, chk, pas)
        return handles

    async def _ensure_schema(self, client: weaviate.WeaviateAsyncClient) -> None:
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

    @staticmethod
    def _check(result: Any, what: str) -> None:
        if result.has_errors:
            first = next(iter(result.errors.values()))
            msg = getattr(first, "message", str(first))
            raise CheckpointError(f"Weaviate {what}: {len(result.errors)} object(s) failed: {msg}")

    async def put(self, tenant: str, records: Sequence[SinkRecord]) -> None:
        """Store new objects: all chunks first (size-bounded batches), then the manifests."""
        man, chk, _ = await self._collections(tenant, write=True)
        batch: list[DataObject[Any, Any]] = []
        size = 0

        async def flush() -> None:
            nonlocal size
            result = await self._call("chunk write", chk.data.insert_many(list(batch)))
            self._check(result, "chunk write")
            batch.clear()
            size = 0

        for rec in records:
            m = rec.manifest
            for i, blob in enumerate(rec.chunks):
                if batch and size + len(blob) > PUT_BUDGET:
                    await flush()
                props = {"owner": m.object_id, "gen": m.generation, "idx": i, "blob": _b64(blob)}
                batch.append(
                    DataObject(properties=props, uuid=chunk_id(m.object_id, m.generation, i))
                )
                size += len(blob)
        if batch:
            await flush()
        manifests = []
        for rec in records:
            m = rec.manifest
            fields: dict[str, Any] = {
                "doc_key": m.doc_key,
                "device": m.device,
                "gen": m.generation,
                "parts": m.parts,
                "nbytes": m.nbytes,
                "blob": _b64(m.header),
            }
            manifests.append(DataObject(properties=fields, uuid=m.object_id))
        result = await self._call("manifest write", man.data.insert_many(manifests))
        self._check(result, "manifest write")

    async def _fetch_all(self, col: Any, what: str, where: Any, props: list[str]) -> list[Any]:
        """Every object matching `where`, paged (offset paging: filters allow no cursor)."""
        out: list[Any] = []
        offset = 0
        while True:
            res = await self._call(
                what,
                col.query.fetch_objects(
                    filters=where, limit=_PAGE, offset=offset, return_properties=props
                ),
            )
            out.extend(res.objects)
            if len(res.objects) < _PAGE:
                return out
            offset += _PAGE

    async def manifests(self, tenant: str, doc_keys: Sequence[str] | None = None) -> list[Manifest]:
        """Every manifest of the tenant (cursor-paged), or only those of the given doc keys."""
        # Listing starts every checkpoint and restore: probe first, as before a write.
        man, _, _ = await self._collections(tenant, write=True)
        objects: list[Any] = []
        if doc_keys is None:
            after = None
            while True:
                res = await self._call(
                    "manifest listing",
                    man.query.fetch_objects(
                        limit=_PAGE,
                        after=after,
                        return_properties=_MANIFEST_PROPS,
                    ),
                )
                objects.extend(res.objects)
                if len(res.objects) < _PAGE:
                    break
                after = res.objects[-1].uuid
        else:
            keys = sorted(set(doc_keys))
            for i in range(0, len(keys), 100):
                where = Filter.by_property("doc_key").contains_any(keys[i : i + 100])
                objects += await self._fetch_all(man, "manifest listing", where, _MANIFEST_PROPS)
        out = []
        for o in objects:
            p = o.properties
            try:
                out.append(
                    Manifest(
                        str(o.uuid),
                        str(p["doc_key"]),
                        str(p["device"]),
                        str(p["gen"]),
                        int(p["parts"]),
                        int(p["nbytes"]),
                        _unb64(p["blob"]),
                    )
                )
            except (KeyError, TypeError, ValueError):
                continue  # an object we did not write; Checkpointer never sees it
        return out

    async def chunks(self, tenant: str, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        """object_id -> its chunks in index order, fetched by id in size-bounded batches."""
        _, chk, _ = await self._collections(tenant)
        wanted: list[tuple[str, int, str]] = []  # (chunk uuid, approx size, owner)
        for m in manifests:
            each = m.nbytes // max(m.parts, 1) + 64
            wanted += [
                (chunk_id(m.object_id, m.generation, i), each, m.object_id) for i in range(m.parts)
            ]
        found: dict[str, dict[int, bytes]] = {m.object_id: {} for m in manifests}
        gens = {m.object_id: m.generation for m in manifests}
        i = 0
        while i < len(wanted):
            ids: list[str] = []
            size = 0
            while i < len(wanted) and (not ids or size + wanted[i][1] <= PUT_BUDGET):
                ids.append(wanted[i][0])
                size += wanted[i][1]
                i += 1
            res = await self._call(
                "chunk read",
                chk.query.fetch_objects(
                    filters=Filter.by_id().contains_any(ids),
                    limit=len(ids),
                    return_properties=["owner", "gen", "idx", "blob"],
                ),
            )
            for o in res.objects:
                p = o.properties
                owner = str(p.get("owner"))
                if owner in found and p.get("gen") == gens[owner]:
                    try:
                        found[owner][int(p["idx"])] = _unb64(p["blob"])
                    except (KeyError, TypeError, ValueError):
                        continue
        out: dict[str, list[bytes]] = {}
        for owner, parts in found.items():
            seq: list[bytes] = []
            while len(seq) in parts:
                seq.append(parts[len(seq)])
            out[owner] = seq
        return out

    async def confirm(self, tenant: str, manifests: Sequence[Manifest]) -> set[str]:
        """The object ids among `manifests` whose manifest a QUORUM read finds now."""
        man, _, _ = await self._collections(tenant)
        ids = sorted({m.object_id for m in manifests})
        found: set[str] = set()
        for i in range(0, len(ids), _PAGE):
            part = ids[i : i + _PAGE]
            res = await self._call(
                "confirm",
                man.query.fetch_objects(
                    filters=Filter.by_id().contains_any(part),
                    limit=len(part),
                    return_properties=["gen"],
                ),
            )
            found |= {str(o.uuid) for o in res.objects}
        return found

    async def delete(self, tenant: str, manifests: Sequence[Manifest]) -> None:
        """Delete objects: their manifests first (readers stop seeing them), then chunks."""
        if not manifests:
            return
        man, chk, _ = await self._collections(tenant, write=True)
        objects = sorted({m.object_id for m in manifests})
        chunks = sorted(
            {chunk_id(m.object_id, m.generation, i) for m in manifests for i in range(m.parts)}
        )
        for col, ids, what in ((man, objects, "manifest delete"), (chk, chunks, "chunk delete")):
            for i in range(0, len(ids), _PAGE):
                where = Filter.by_id().contains_any(ids[i : i + _PAGE])
                result = await self._call(what, col.data.delete_many(where=where))
                if getattr(result, "failed", 0):
                    raise CheckpointError(f"Weaviate {what}: {result.failed} object(s) failed")

    async def passage_ids(self, tenant: str, doc_keys: Sequence[str]) -> dict[str, set[str]]:
        """doc_key -> pids of its stored passages."""
        _, _, pas = await self._collections(tenant)
        out: dict[str, set[str]] = {}
        keys = sorted(set(doc_keys))
        for i in range(0, len(keys), 20):
            where = Filter.by_property("doc_key").contains_any(keys[i : i + 20])
            for o in await self._fetch_all(pas, "passage listing", where, ["doc_key", "pid"]):
                p = o.properties
                out.setdefault(str(p.get("doc_key")), set()).add(str(p.get("pid")))
        return out

    async def put_passages(
        self, tenant: str, add: Sequence[Passage], remove: Mapping[str, Sequence[str]]
    ) -> None:
        """Upsert `add` (with their vectors), then delete `remove`."""
        _, _, pas = await self._collections(tenant, write=True)
        objs = [
            DataObject(
                properties={"doc_key": p.doc_key, "pid": p.pid, "text": p.text},
                uuid=passage_id(p.doc_key, p.pid),
                vector=list(p.vector) if p.vector is not None else None,
            )
            for p in add
        ]
        for i in range(0, len(objs), _PAGE):
            result = await self._call("passage write", pas.data.insert_many(objs[i : i + _PAGE]))
            self._check(result, "passage write")
        ids = sorted(passage_id(k, pid) for k, pids in remove.items() for pid in pids)
        for i in range(0, len(ids), _PAGE):
            where = Filter.by_id().contains_any(ids[i : i + _PAGE])
            await self._call("passage delete", pas.data.delete_many(where=where))

    async def search(self, tenant: str, query: SearchQuery) -> list[SearchHit]:
        """BM25, near-vector or hybrid over the passages (searchable docs only)."""
        _, _, pas = await self._collections(tenant)
        props = ["doc_key", "text"]
        if query.mode == "keyword":
            call = pas.query.bm25(
                query=query.text,
                query_properties=["text"],
                limit=query.limit,
                return_metadata=MetadataQuery(score=True),
                return_properties=props,
            )
        elif query.mode == "vector":
            call = pas.query.near_vector(
                near_vector=list(query.vector or ()),
                limit=query.limit,
                return_metadata=MetadataQuery(distance=True),
                return_properties=props,
            )
        else:
            call = pas.query.hybrid(
                query=query.text,
                vector=list(query.vector) if query.vector is not None else None,
                alpha=query.alpha,
                query_properties=["text"],
                limit=query.limit,
                return_metadata=MetadataQuery(score=True),
                return_properties=props,
            )
        res = await self._call("search", call)
        hits = []
        for o in res.objects:
            p, meta = o.properties, o.metadata
            if query.mode == "vector":
                score = 1.0 - float(meta.distance if meta.distance is not None else 1.0)
            else:
                score = float(meta.score or 0.0)
            hits.append(SearchHit(str(p["doc_key"]), str(p.get("text") or ""), score))
        return hits

    async def close(self) -> None:
        """Close the client (a later call reconnects)."""
        await self._drop()
