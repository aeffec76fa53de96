"""Node: the composition root. It owns the replica, the local cache, every link and every task.

The adapters are passed in or chosen by URL scheme: the store (default `SqliteStore` in
`cache_dir`), the transports (`net.channel` registry: ws, wss, and any registered scheme), and
the checkpoint sink (`checkpoint.sinks.open_sink(config.checkpoint_url)`). Policy lives in
this package and in the mesh, never in an adapter: which links to keep, how many handshakes
to admit, where each committed update goes (`_traffic`, by the `sync.router.Router` rule: the
local cache, every link but the one it came from, the checkpointer, the front ends). The
order parts start and close in is `_lifecycle`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pycrdt

from ..config import NodeConfig
from ..crypto.keys import DeviceIdentity, GroupKeys
from ..errors import ConfigError, UnityCrdtError
from ..ids import PeerAddress, check_doc_id
from ..net.channel import Listener, Transport, resolve_transports
from ..net.mesh import Mesh
from ..status import Member, NodeStatus, PeerInfo
from ..store.base import Store
from ..store.sqlite import SqliteStore
from ..store.writer import CacheWriter
from ..sync.nodewide import DocQuota, PullGate, SeenFilter
from ..sync.presence import Presence
from ..sync.replica import Replica
from ._lifecycle import close_node, start_node
from ._members import MembersService
from ._status import node_status
from ._traffic import Traffic
from ._work import Work

if TYPE_CHECKING:
    from ..checkpoint.format import CheckpointSink, DocHit, SearchMode
    from ..checkpoint.policy import RestoreProgress
    from ..frontends.ywebsocket import YWebsocketEndpoint
    from ..net.mdns import Discovery
    from ..net.relay import Relay
    from ..status import LeaseInfo
    from ..work.jobs import Job
    from ..work.leases import LeaseContext
    from ._checkpoints import Checkpoints

log = logging.getLogger(__name__)
H = TypeVar("H", bound=Callable[..., Any])


class Node:
    """One instance of the app: named CRDT docs, kept on disk and merged with every peer."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        store: Store | None = None,
        sink: CheckpointSink | None = None,
        transports: Mapping[str, Transport] | None = None,
    ) -> None:
        self.config = config
        self._transports = resolve_transports(transports)
        for url in config.peers:
            scheme = PeerAddress.parse(url).scheme
            if scheme not in self._transports:
                have = ", ".join(sorted(self._transports))
                raise ConfigError(f"no transport for {scheme}:// in peer {url!r} (have: {have})")
        self._sink = sink
        # The replica's full states let the store compact without re-applying logs and
        # re-write docs that lost rows to damage; they also repair failed writes.
        self._partial: set[str] = set()  # docs whose cached updates did not all load
        self._store: Store = store or SqliteStore(
            config.cache_path,
            snapshot_source=self._loaded_state,
            state_vector_source=lambda name: self._replica.state_vector(name),
        )
        self._writer = CacheWriter(self._store, self._full_state, self.spawn)
        self._traffic = Traffic(self)
        self._replica = Replica(on_update=self._traffic.on_update)
        self._seen = SeenFilter()
        self._pulls = PullGate(config.anti_entropy_interval)
        self._quota = DocQuota(config.new_docs_burst, config.new_docs_rate)
        self._presence = Presence(timeout=config.presence_timeout)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keys: GroupKeys | None = None
        self._identity: DeviceIdentity | None = None
        self._listener: Listener | None = None
        self._mesh: Mesh | None = None
        self._checkpoints: Checkpoints | None = None
        self._endpoint: YWebsocketEndpoint | None = None
        self._discovery: Discovery | None = None
        self._relay: Relay | None = None
        self._members: MembersService | None = None
        self._services_started = False
        self._work = Work(config)
        self._started_at = 0.0
        self._started = False
        self._closed = False

    # -- public API -------------------------------------------------------------------------

    def doc(self, name: str) -> pycrdt.Doc[Any]:
        """The named document: created on first use, or as loaded from the local cache."""
        return self._replica.doc(check_doc_id(name))

    @property
    def docs(self) -> list[str]:
        """Names of every document this node holds."""
        return self._replica.names()

    @property
    def url(self) -> str:
        """The URL this node listens on, such as ws://127.0.0.1:9001."""
        return self.address.url

    @property
    def address(self) -> PeerAddress:
        """The address this node listens on, as its transport bound it."""
        if self._listener is None:
            raise UnityCrdtError("node is not started")
        return self._listener.address

    @property
    def device_id(self) -> str:
        """This node's stable device id, derived from its device key."""
        if self._identity is None:
            raise UnityCrdtError("node is not started")
        return self._identity.device_id

    @property
    def peers(self) -> list[PeerInfo]:
        """Peers with a live, authenticated link."""
        return self._mesh.peer_infos() if self._mesh else []

    async def flush(self) -> None:
        """Wait until every edit made so far is durable in the local cache.

        Raises StoreError if some could not be written (see `NodeStatus.cache`); they stay
        in memory and are written as soon as the cache accepts writes again.
        """
        self._traffic.drain()
        await self._writer.flush()
        if self._relay is not None:
            await self._relay.flush()

    async def backup(self, path: str | Path) -> None:
        """Write a consistent copy of the local cache, with every edit made so far, to `path`."""
        if not isinstance(self._store, SqliteStore):
            raise UnityCrdtError("only the SQLite local cache can be backed up to a file")
        await self.flush()
        await self._store.backup(path)

    async def checkpoint(self) -> None:
        """Push every doc changed since its last checkpoint to the checkpoint store now."""
        checkpoints = self._require_checkpoints()
        await self.flush()
        await checkpoints.checkpoint()

    async def restore(
        self, *, progress: Callable[[RestoreProgress], None] | None = None
    ) -> list[str]:
        """Merge the group's checkpoint of every doc; return the docs touched.

        `progress` is called as objects are read (for a progress bar).
        """
        return await self._require_checkpoints().restore(progress=progress)

    async def search(
        self, query: str, limit: int = 10, mode: SearchMode | None = None, alpha: float = 0.5
    ) -> list[DocHit]:
        """Search the checkpointed passages of searchable docs: "keyword" (BM25), "vector"
        (by meaning) or "hybrid"; None = hybrid with an embedder, keyword without."""
        return await self._require_checkpoints().search(query, limit, mode, alpha)

    @property
    def ywebsocket(self) -> YWebsocketEndpoint:
        """The local y-websocket endpoint for JS front ends (NodeConfig.yjs_endpoint=True)."""
        if self._endpoint is None:
            raise UnityCrdtError("the y-websocket endpoint is off (set yjs_endpoint=True)")
        return self._endpoint

    def status(self) -> NodeStatus:
        """A snapshot of this node: links, docs, checkpoint state (see unity_crdt.status)."""
        return node_status(self)

    def set_presence(self, doc: str, state: Any) -> None:
        """Publish this node's presence in `doc` (any JSON value; None clears it)."""
        client_id = self._replica.doc(check_doc_id(doc)).client_id
        update = self._presence.set_local(doc, client_id, state, self._now())
        self._traffic.spread_presence(doc, update, source=None)

    def presence(self, doc: str) -> dict[int, Any]:
        """Live presence states in `doc` across the mesh and front ends: client id -> state."""
        return self._presence.states(doc)

    @property
    def members(self) -> list[Member]:
        """The group's roster: every device admitted, "active" or "revoked"."""
        return self._require_members().members()

    async def invite(self, ttl: float = 600.0) -> str:
        """A single-use join code for one new device (its `group_secret`), valid `ttl` s."""
        return await self._require_members().invite(ttl)

    async def revoke(self, device_id: str) -> None:
        """Cut a device out: the others move to new keys; it gets nothing written after."""
        await self._require_members().revoke(device_id)

    def _require_members(self) -> MembersService:
        if self._members is None:
            raise UnityCrdtError("node is not started")
        return self._members

    async def wait_for_peers(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least `count` peers are linked (handy in scripts and tests)."""
        if self._mesh is None:
            raise UnityCrdtError("node is not started")
        mesh = self._mesh
        await asyncio.wait_for(mesh.wait_until(lambda: len(mesh.links) >= count), timeout)

    # -- collective work (unity_crdt.work; docs/collective.md) --------------------------------

    def worker(self, kind: str, concurrency: int = 1) -> Callable[[H], H]:
        """Decorator: this node runs tasks of `kind` with the decorated `async def f(task)`."""
        return self._work.worker(kind, concurrency)

    async def submit(
        self,
        kind: str,
        inputs: list[Any],
        *,
        lease: float = 30.0,
        max_attempts: int = 3,
        redundancy: int = 1,
    ) -> Job:
        """Start a job: one task per input (times `redundancy`), run by the group's workers."""
        return await self._work.require().submit(kind, inputs, lease, max_attempts, redundancy)  # type: ignore[no-any-return]

    def job(self, job_id: str) -> Job:
        """Follow a job by id, from any node of the group."""
        return self._work.require().job(job_id)  # type: ignore[no-any-return]

    def lease(self, name: str, ttl: float = 15.0, timeout: float | None = None) -> LeaseContext:
        """`async with node.lease(name) as lease:` exclusive across the group; `lease.token`
        fences writes, `lease.lost` is set if it passed on."""
        from ..work.leases import LeaseContext

        self._work.require()
        return LeaseContext(self._work.leases, name, ttl, timeout)

    def lease_holder(self, name: str) -> LeaseInfo | None:
        """Who holds the lease `name` now (as this node knows it), or None."""
        return self._work.lease_holder(name)

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the cache, load every doc, listen, and start linking to peers.

        If any step fails, whatever was already opened is closed again before the error
        propagates, so a failed start leaves no socket, task or cache lock behind.
        """
        if self._started:
            raise UnityCrdtError("node already started")
        self._started = True
        self._started_at = self._now()
        try:
            await start_node(self)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close every link, flush the cache, and stop every task."""
        if self._closed or not self._started:
            return
        self._closed = True
        await close_node(self)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start a supervised task owned by this node: a crash is logged, never propagated."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("task %s crashed", t.get_name(), exc_info=t.exception())

        task.add_done_callback(done)
        return task

    # -- wiring (the parts: _lifecycle, _services, _traffic) --------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _full_state(self, name: str) -> bytes | None:
        return self._replica.diff(name, b"\x00") if name in self._replica else None

    def _loaded_state(self, name: str) -> bytes | None:
        # Compaction deletes the rows a state covers: never for a doc missing some rows.
        return None if name in self._partial else self._full_state(name)

    def _require_checkpoints(self) -> Checkpoints:
        if self._checkpoints is None:
            raise UnityCrdtError(
                "checkpoints are off: set NodeConfig.checkpoint_url (or pass Node(sink=...))"
            )
        return self._checkpoints
