"""The connection of `checkpoint.weaviate` to a Weaviate deployment: which server, failover,
and every client failure turned into a CheckpointError with a clear reason.

Separate from what the sink stores (`checkpoint.weaviate`, `_weaviate_objects`,
`_weaviate_search`): those only ask for a tenant's collection handles and pass each client call
through `Connection.call`. Imported through `checkpoint.weaviate`, which silences authlib's
warning before `weaviate` is first imported.

A cluster: give several URLs (any of its servers). Every handle asks for QUORUM, so one server
of three may be down. When the server in use stops answering (a timeout, a refused
connection), the connection is dropped and the next call connects to the next URL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import weaviate
from weaviate.classes.config import ConsistencyLevel
from weaviate.classes.init import AdditionalConfig, Auth, Timeout
from weaviate.classes.tenants import Tenant
from weaviate.exceptions import WeaviateBaseError

from ..errors import CheckpointError, ConfigError
from .format import check_tenant

__all__ = ["PAGE", "Connection", "Endpoint"]

PAGE = 500  # objects per query page, and ids per filtered request
_UNREACHABLE = ("onnect", "UNAVAILABLE", "unreachable", "refused", "no such host")
_T = TypeVar("_T")


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


class Connection:
    """A lazily connected async client, failing over between `urls`.

    `collections` are the names whose handles `handles()` returns, in that order; `setup`
    creates them (once per connection, before the first handle).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        grpc_port: int,
        api_key: str | None,
        timeout: Timeout,
        *,
        collections: Sequence[str],
        setup: Callable[[weaviate.WeaviateAsyncClient], Awaitable[None]],
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ConfigError("a Weaviate sink needs at least one URL")
        self.endpoints = [Endpoint.parse(u, grpc_port) for u in urls]
        self._at = 0  # the endpoint in use
        self._api_key = api_key
        self._timeout = timeout
        self._names = tuple(collections)
        self._setup = setup
        self._client: weaviate.WeaviateAsyncClient | None = None
        self._schema_ready = False
        self._tenants: set[str] = set()
        self._handles: dict[str, tuple[Any, ...]] = {}  # tenant -> QUORUM handles
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

    async def call(self, what: str, call: Awaitable[_T]) -> _T:
        """Await one client call, mapping every failure to CheckpointError with a clear reason."""
        url = self.url
        try:
            return await call
        except CheckpointError:
            raise
        except TimeoutError as exc:
            await self.drop(failover=True)
            raise CheckpointError(f"Weaviate at {url} timed out during {what}") from exc
        except (WeaviateBaseError, OSError, ConnectionError) as exc:
            text = str(exc)
            if any(s in text for s in _UNREACHABLE):
                await self.drop(failover=True)
                raise CheckpointError(f"Weaviate at {url} is unreachable during {what}") from exc
            if "tenant not found" in text:
                self._tenants.clear()
                self._handles.clear()
            if "timed out" in text or "DEADLINE_EXCEEDED" in text:
                await self.drop(failover=True)
                raise CheckpointError(f"Weaviate at {url} timed out during {what}") from exc
            raise CheckpointError(f"Weaviate {what} failed: {text[:300]}") from exc

    async def drop(self, failover: bool = False) -> None:
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

    async def handles(self, tenant: str, *, write: bool = False) -> tuple[Any, ...]:
        """Connected handles of the collections for `tenant`, at QUORUM.

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
                    await self.call("connect", self._client.connect())
                else:
                    self._client = await self._connect()
            elif write and not await self.call("liveness check", self._client.is_live()):
                await self.drop(failover=True)
                raise CheckpointError(f"Weaviate at {self.url} is unreachable during write")
            client = self._client
            assert client is not None
            if not self._schema_ready:
                await self.call("schema setup", self._setup(client))
                self._schema_ready = True
            cols = [client.collections.get(n) for n in self._names]
            if tenant not in self._tenants:
                for col in cols:
                    await self.call("tenant setup", col.tenants.create([Tenant(name=tenant)]))
                self._tenants.add(tenant)
        handles = self._handles.get(tenant)
        if handles is None:
            handles = self._handles[tenant] = tuple(
                c.with_tenant(tenant).with_consistency_level(ConsistencyLevel.QUORUM) for c in cols
            )
        return handles

    async def fetch_all(self, col: Any, what: str, where: Any, props: list[str]) -> list[Any]:
        """Every object matching `where`, paged (offset paging: filters allow no cursor)."""
        out: list[Any] = []
        offset = 0
        while True:
            res = await self.call(
                what,
                col.query.fetch_objects(
                    filters=where, limit=PAGE, offset=offset, return_properties=props
                ),
            )
            out.extend(res.objects)
            if len(res.objects) < PAGE:
                return out
            offset += PAGE

    @staticmethod
    def check(result: Any, what: str) -> None:
        """Raise CheckpointError if a batch insert reports failed objects."""
        if result.has_errors:
            first = next(iter(result.errors.values()))
            msg = getattr(first, "message", str(first))
            raise CheckpointError(f"Weaviate {what}: {len(result.errors)} object(s) failed: {msg}")
