"""CheckpointSink on Weaviate (the only module importing `weaviate`; async client v4).

Two multi-tenant collections, one tenant per sync group (`GroupKeys.tenant`):
- `UnityCrdtCheckpoint`: one manifest object per (group, doc, device), id = the object id;
  properties doc_key, device, gen (FIELD-tokenised TEXT), parts, nbytes (INT), blob (the sealed
  header) and text (WORD-tokenised plain text; filled only for searchable docs, BM25 search).
- `UnityCrdtCheckpointChunk`: the sealed chunks, id = `chunk_id(object, gen, index)`;
  properties owner, gen, idx, blob.
Both use self-provided vectors with no vector index (no vectorizer, no index cost). Every query
passes a limit or pages with a cursor, and every request stays under the ~100 MiB gRPC cap.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import warnings
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

# authlib (a weaviate-client dependency) forces its own deprecation warnings to "always" when
# imported, so a warning about its httpx shim would reach every user on every start. Import it
# first, then silence exactly that category; nothing of ours uses authlib.
from authlib.deprecate import AuthlibDeprecationWarning

warnings.filterwarnings("ignore", category=AuthlibDeprecationWarning)

import weaviate
from weaviate.classes.config import Configure, DataType, Property, Tokenization
from weaviate.classes.data import DataObject
from weaviate.classes.init import AdditionalConfig, Auth, Timeout
from weaviate.classes.query import Filter, MetadataQuery
from weaviate.classes.tenants import Tenant
from weaviate.exceptions import WeaviateBaseError

from ..errors import CheckpointError, ConfigError
from .format import (
    PUT_BUDGET,
    Manifest,
    SearchHit,
    SinkRecord,
    check_tenant,
    chunk_id,
    snippet_of,
)

MANIFESTS = "UnityCrdtCheckpoint"
CHUNKS = "UnityCrdtCheckpointChunk"
_PAGE = 500
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


class WeaviateSink:
    """CheckpointSink over Weaviate. Connects lazily, inside the loop that uses it."""

    def __init__(
        self,
        url: str,
        grpc_port: int = 50051,
        api_key: str | None = None,
        *,
        init_timeout: float = 10,
        query_timeout: float = 60,
        insert_timeout: float = 120,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"Weaviate URL must look like http://host:port, got {url!r}")
        self.url = url
        self._host = parts.hostname
        self._secure = parts.scheme == "https"
        self._port = parts.port or (443 if self._secure else 80)
        self._grpc_port = grpc_port
        self._api_key = api_key
        self._timeout = Timeout(init=init_timeout, query=query_timeout, insert=insert_timeout)
        self._client: weaviate.WeaviateAsyncClient | None = None
        self._schema_ready = False
        self._tenants: set[str] = set()
        self._connect_lock = asyncio.Lock()

    def _new_client(self) -> weaviate.WeaviateAsyncClient:
        config = AdditionalConfig(timeout=self._timeout)
        auth = Auth.api_key(self._api_key) if self._api_key else None
        if self._host.endswith((".weaviate.cloud", ".weaviate.network")):
            # Weaviate Cloud serves gRPC on its own "grpc-" host; the helper knows the layout.
            return weaviate.use_async_with_weaviate_cloud(
                cluster_url=self.url,
                auth_credentials=auth or "",
                additional_config=config,
                skip_init_checks=True,
            )
        if self._host in ("127.0.0.1", "localhost", "::1") and not self._secure:
            return weaviate.use_async_with_local(
                host=self._host,
                port=self._port,
                grpc_port=self._grpc_port,
                additional_config=config,
                skip_init_checks=True,
                auth_credentials=auth,
            )
        return weaviate.use_async_with_custom(
            http_host=self._host,
            http_port=self._port,
            http_secure=self._secure,
            grpc_host=self._host,
            grpc_port=self._grpc_port,
            grpc_secure=self._secure,
            additional_config=config,
            skip_init_checks=True,
            auth_credentials=auth,
        )

    async def _call(self, what: str, call: Awaitable[_T]) -> _T:
        """Await one client call, mapping every failure to CheckpointError with a clear reason."""
        try:
            return await call
        except CheckpointError:
            raise
        except TimeoutError as exc:
            await self._drop()
            raise CheckpointError(f"Weaviate at {self.url} timed out during {what}") from exc
        except (WeaviateBaseError, OSError, ConnectionError) as exc:
            text = str(exc)
            if any(s in text for s in ("onnect", "UNAVAILABLE", "unreachable", "refused")):
                await self._drop()
                raise CheckpointError(
                    f"Weaviate at {self.url} is unreachable during {what}"
                ) from exc
            if "tenant not found" in text:
                self._tenants.clear()
            if "timed out" in text or "DEADLINE_EXCEEDED" in text:
                await self._drop()
                raise CheckpointError(f"Weaviate at {self.url} timed out during {what}") from exc
            raise CheckpointError(f"Weaviate {what} failed: {text[:300]}") from exc

    async def _drop(self) -> None:
        """Forget the client after a connection failure so the next call reconnects."""
        client, self._client = self._client, None
        self._schema_ready = False
        self._tenants.clear()
        if client is not None:
            # closing a broken client must not hide the real error
            with contextlib.suppress(Exception):
                await client.close()

    async def _collections(self, tenant: str, *, write: bool = False) -> tuple[Any, Any]:
        """Connected (manifests, chunks) collection handles for `tenant` (schema ensured).

        Before a write on an existing connection, a cheap liveness probe runs first: the
        client's `insert_many` retries an unreachable server for ~15 s on its own, while the
        Checkpointer should see the failure at once and apply its own backoff.
        """
        check_tenant(tenant)
        async with self._connect_lock:
            if self._client is None:
                self._client = self._new_client()
                await self._call("connect", self._client.connect())
            elif write and not await self._call("liveness check", self._client.is_live()):
                await self._drop()
                raise CheckpointError(f"Weaviate at {self.url} is unreachable during write")
            client = self._client
            assert client is not None
            if not self._schema_ready:
                await self._call("schema setup", self._ensure_schema())
                self._schema_ready = True
            man, chk = client.collections.get(MANIFESTS), client.collections.get(CHUNKS)
            if tenant not in self._tenants:
                for col in (man, chk):
                    await self._call("tenant setup", col.tenants.create([Tenant(name=tenant)]))
                self._tenants.add(tenant)
        return man.with_tenant(tenant), chk.with_tenant(tenant)

    async def _ensure_schema(self) -> None:
        assert self._client is not None
        client = self._client
        specs = {
            MANIFESTS: [
                _field("doc_key"),
                _field("device"),
                _field("gen"),
                _field("parts", DataType.INT),
                _field("nbytes", DataType.INT),
                _field("blob", DataType.BLOB),
                Property(name="text", data_type=DataType.TEXT, tokenization=Tokenization.WORD),
            ],
            CHUNKS: [
                _field("owner"),
                _field("gen"),
                _field("idx", DataType.INT),
                _field("blob", DataType.BLOB),
            ],
        }
        for name, props in specs.items():
            if await client.collections.exists(name):
                continue
            try:
                await client.collections.create(
                    name,
                    properties=props,
                    multi_tenancy_config=Configure.multi_tenancy(enabled=True),
                    vector_config=Configure.Vectors.self_provided(
                        vector_index_config=Configure.VectorIndex.none()
                    ),
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
        """Store records: all chunks first, then the manifests, then drop stale chunks."""
        man, chk = await self._collections(tenant, write=True)
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
                "text": rec.text,
            }
            manifests.append(DataObject(properties=fields, uuid=m.object_id))
        result = await self._call("manifest write", man.data.insert_many(manifests))
        self._check(result, "manifest write")
        stale = [
            Filter.by_property("owner").equal(r.manifest.object_id)
            & Filter.by_property("gen").not_equal(r.manifest.generation)
            for r in records
        ]
        for i in range(0, len(stale), 100):
            part = stale[i : i + 100]
            where = part[0] if len(part) == 1 else Filter.any_of(part)
            await self._call("stale chunk cleanup", chk.data.delete_many(where=where))

    async def manifests(self, tenant: str, doc_keys: Sequence[str] | None = None) -> list[Manifest]:
        """Every manifest of the tenant (cursor-paged), or only those of the given doc keys."""
        man, _ = await self._collections(tenant)
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
                offset = 0
                while True:
                    res = await self._call(
                        "manifest listing",
                        man.query.fetch_objects(
                            filters=where,
                            limit=_PAGE,
                            offset=offset,
                            return_properties=_MANIFEST_PROPS,
                        ),
                    )
                    objects.extend(res.objects)
                    if len(res.objects) < _PAGE:
                        break
                    offset += _PAGE
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
        _, chk = await self._collections(tenant)
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

    async def search(self, tenant: str, query: str, limit: int) -> list[SearchHit]:
        """BM25 over the `text` property (searchable docs only)."""
        man, _ = await self._collections(tenant)
        res = await self._call(
            "search",
            man.query.bm25(
                query=query,
                query_properties=["text"],
                limit=limit,
                return_metadata=MetadataQuery(score=True),
                return_properties=["doc_key", "device", "text"],
            ),
        )
        hits = []
        for o in res.objects:
            p = o.properties
            text = str(p.get("text") or "")
            score = float(o.metadata.score or 0.0)
            hits.append(
                SearchHit(str(p["doc_key"]), str(p["device"]), score, snippet_of(text, query))
            )
        return hits

    async def close(self) -> None:
        """Close the client (a later call reconnects)."""
        await self._drop()
