"""Node: the composition root. It owns the replica, the local cache, every link and every task.

The adapters are passed in or chosen by URL scheme: the store (default `SqliteStore` in
`cache_dir`), the transports (`net.channel` registry: ws, wss, and any registered scheme), and
the checkpoint sink (`checkpoint.sinks.open_sink(config.checkpoint_url)`). Policy lives here
and in the mesh, never in an adapter: which links to keep, how many handshakes to admit,
where each committed update goes (the `sync.router.Router` rule: the local cache, every link
but the one it came from, the checkpointer, the front ends).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pycrdt

from .config import NodeConfig
from .crypto.frames import PeerHello
from .crypto.keys import DeviceIdentity, GroupKeys, derive_group_keys
from .errors import CheckpointError, ConfigError, ProtocolError, StoreError, UnityCrdtError
from .ids import PeerAddress, check_doc_id
from .net.channel import Listener, Transport, resolve_transports
from .net.link import Link
from .net.mesh import Mesh
from .status import DocStatus, NodeStatus, PeerInfo, PeerStatus
from .store.base import Store
from .store.files import load_or_create_secret_file, prepare_cache_dir
from .store.sqlite import SqliteStore
from .store.writer import CacheWriter
from .sync.codec import PROTOCOL_VERSION, Awareness
from .sync.presence import Presence
from .sync.replica import RemoteOrigin, Replica
from .sync.router import Router
from .sync.session import SeenFilter, SyncSession

if TYPE_CHECKING:
    from .checkpoint.format import CheckpointSink, DocHit
    from .checkpoint.policy import Checkpointer
    from .frontends.ywebsocket import YWebsocketEndpoint
    from .net.mdns import Discovery

log = logging.getLogger(__name__)

# Merged checkpoint states travel like a peer's updates: relayed to every link, never undone.
CHECKPOINT_ORIGIN = RemoteOrigin("checkpoint")
REFRESH_MIN_INTERVAL = 5.0
FRONTEND = "frontend"  # the source tag of presence set by y-websocket clients


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
        self._replica = Replica(on_update=self._on_update)
        self._seen = SeenFilter()
        self._router = Router()
        self._presence = Presence(timeout=config.presence_timeout)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keys: GroupKeys | None = None
        self._identity: DeviceIdentity | None = None
        self._listener: Listener | None = None
        self._mesh: Mesh | None = None
        self._checkpointer: Checkpointer | None = None
        self._endpoint: YWebsocketEndpoint | None = None
        self._discovery: Discovery | None = None
        self._last_refresh = float("-inf")
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
        self._drain()
        await self._writer.flush()

    async def backup(self, path: str | Path) -> None:
        """Write a consistent copy of the local cache, with every edit made so far, to `path`."""
        if not isinstance(self._store, SqliteStore):
            raise UnityCrdtError("only the SQLite local cache can be backed up to a file")
        await self.flush()
        await self._store.backup(path)

    async def checkpoint(self) -> None:
        """Push every doc changed since its last checkpoint to Weaviate now."""
        cp = self._require_checkpointer()
        await self.flush()
        report = await cp.checkpoint()
        if report.failed:
            raise CheckpointError(f"checkpoint failed for {len(report.failed)} doc(s)")

    async def restore(self) -> list[str]:
        """Merge every device's checkpoint of every doc of the group; return the docs touched."""
        states = await self._require_checkpointer().restore()
        self._apply_checkpoints(states)
        return sorted(states)

    async def search(self, query: str, limit: int = 10) -> list[DocHit]:
        """Keyword (BM25) search over the checkpointed text of searchable docs."""
        return await self._require_checkpointer().search(query, limit)

    @property
    def ywebsocket(self) -> YWebsocketEndpoint:
        """The local y-websocket endpoint for JS front ends (NodeConfig.yjs_endpoint=True)."""
        if self._endpoint is None:
            raise UnityCrdtError("the y-websocket endpoint is off (set yjs_endpoint=True)")
        return self._endpoint

    def status(self) -> NodeStatus:
        """A snapshot of this node: links, docs, checkpoint state (see unity_crdt.status)."""
        now = self._now()
        links = list(self._mesh.links.values()) if self._mesh else []
        peers = []
        for link in links:
            if link.remote is None or link.session is None:
                continue
            st, session = link.stats, link.session
            peers.append(
                PeerStatus(
                    name=link.remote.name,
                    device_id=link.remote.device_id,
                    url=link.address.url,
                    connected_for=now - st.connected_at,
                    last_seen_ago=now - st.last_seen,
                    bytes_in=st.bytes_in,
                    bytes_out=st.bytes_out,
                    messages_in=st.messages_in,
                    messages_out=st.messages_out,
                    dropped=st.dropped,
                    rtt=session.stats.rtt,
                    synced_docs=tuple(sorted(session.synced_docs)),
                    pending=link.queued_bytes,
                )
            )
        cp = self._checkpointer
        docs = []
        for name in self._replica.names():
            cst = cp.status.get(name) if cp else None
            docs.append(
                DocStatus(
                    name=name,
                    state_bytes=len(self._replica.doc(name).get_update()),
                    peers_synced=sum(
                        1 for lk in links if lk.session and lk.session.is_synced(name)
                    ),
                    last_checkpoint=cst.last_ok if cst else None,
                    checkpoint_error=cst.last_error if cst else None,
                    dirty=bool(cp and name in cp.dirty),
                )
            )
        return NodeStatus(
            name=self.config.name,
            device_id=self.device_id,
            url=self.url,
            uptime=now - self._started_at,
            peers=tuple(peers),
            docs=tuple(docs),
            checkpoints=cp is not None,
            checkpoint_error=cp.last_error if cp else None,
            pending_writes=self._writer.pending,
            yjs_url=self._endpoint.base_url if self._endpoint else None,
            cache=self._writer.status(),
        )

    def set_presence(self, doc: str, state: Any) -> None:
        """Publish this node's presence in `doc` (any JSON value; None clears it)."""
        client_id = self._replica.doc(check_doc_id(doc)).client_id
        update = self._presence.set_local(doc, client_id, state, self._now())
        self._spread_presence(doc, update, source=None)

    def presence(self, doc: str) -> dict[int, Any]:
        """Live presence states in `doc` across the mesh and front ends: client id -> state."""
        return self._presence.states(doc)

    async def wait_for_peers(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least `count` peers are linked (handy in scripts and tests)."""
        if self._mesh is None:
            raise UnityCrdtError("node is not started")
        mesh = self._mesh
        await asyncio.wait_for(mesh.wait_until(lambda: len(mesh.links) >= count), timeout)

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
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        cfg = self.config
        prepare_cache_dir(cfg.cache_path)
        self._keys = await asyncio.to_thread(derive_group_keys, cfg.group_secret)
        key = await asyncio.to_thread(
            load_or_create_secret_file,
            cfg.cache_path / "device.key",
            lambda: DeviceIdentity.generate().private_bytes(),
        )
        self._identity = DeviceIdentity.from_private_bytes(key)
        await self._store.open()
        if self._store.recovered_from is not None:
            log.error(
                "the local cache was damaged and rebuilt from what it still held (the damaged "
                "file is kept as %s); what it lost re-syncs from peers and checkpoints",
                self._store.recovered_from,
            )
        for name in await self._store.docs():
            try:
                blobs = await self._store.load(name)
            except StoreError as exc:  # one unreadable doc must not keep the others offline
                log.error("could not load doc %r from the local cache: %s", name, exc)
                continue
            bad = 0
            # One at a time: a bad update must not hide the rest. No blobs (all lost to
            # damage) makes no doc: it comes back with the next peer that has it.
            for blob in blobs:
                try:
                    self._replica.load(name, [blob])
                except StoreError:
                    bad += 1
            if bad:
                self._partial.add(name)
                log.error("doc %r: %d cached updates are not valid; skipped", name, bad)
        hello = PeerHello(
            name=cfg.name,
            device_id=self._identity.device_id,
            version=PROTOCOL_VERSION,
            max_frame=2**20,
        )
        self._mesh = Mesh(
            config=cfg,
            transports=self._transports,
            keys=self._keys,
            identity=self._identity,
            hello=hello,
            make_session=self._make_session,
            spawn=self.spawn,
            on_joined=self._on_joined,
        )
        listen = self._transports.get(cfg.transport)
        if listen is None:
            raise ConfigError(f"no transport for {cfg.transport}:// to listen with")
        self._listener = await listen.listen(
            PeerAddress(cfg.host, cfg.port, cfg.transport), self._mesh.accept
        )
        for url in cfg.peers:
            self._mesh.add_address(PeerAddress.parse(url))
        self.spawn(self._presence_loop(), "presence")
        if cfg.mdns:
            await self._start_discovery()
        if cfg.yjs_endpoint:
            from .frontends.ywebsocket import YWebsocketEndpoint

            self._endpoint = YWebsocketEndpoint(
                self._replica,
                cfg.yjs_token,
                on_awareness=lambda doc, update: self._spread_presence(doc, update, FRONTEND),
            )
            await self._endpoint.start(cfg.yjs_host, cfg.yjs_port)
        if self._sink is None and cfg.checkpoint_url is not None:
            from .checkpoint.sinks import open_sink

            self._sink = open_sink(cfg.checkpoint_url, cfg)
        if self._sink is not None:
            await self._start_checkpoints(self._sink)
        log.info("node %r (%s) listening on %s", cfg.name, self.device_id[:8], self.url)

    async def close(self) -> None:
        """Close every link, flush the cache, and stop every task."""
        if self._closed or not self._started:
            return
        self._closed = True
        if self._identity is None:  # start failed before the cache was opened
            return
        if self._discovery is not None:
            await self._discovery.close()
        if self._endpoint is not None:
            await self._endpoint.close()
        if self._mesh is not None:
            await self._mesh.close()
        if self._listener is not None:
            await self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        unsaved = None
        try:
            await self.flush()
        except StoreError as exc:  # close anyway (the lock must go), then say so
            unsaved = exc
        self._writer.close()
        if self._checkpointer is not None:
            await self._final_checkpoint(self._checkpointer)
        await self._store.close()
        if unsaved is not None:
            raise unsaved

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

    # -- wiring -----------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _make_session(self, link: Link) -> SyncSession:
        assert link.remote is not None
        cfg = self.config
        peer = link.remote.device_id
        session = SyncSession(
            self._replica,
            peer=peer,
            now=self._now(),
            seen=self._seen,
            anti_entropy_interval=cfg.anti_entropy_interval,
            ping_interval=cfg.ping_interval,
            idle_timeout=cfg.idle_timeout,
            on_awareness=lambda doc, update: self._spread_presence(doc, update, source=peer),
        )
        # After the HELLO the link queues next: tell the newcomer who is here.
        snapshot = [Awareness(doc, snap) for doc, snap in self._presence.snapshot(self._now())]
        if snapshot:
            asyncio.get_running_loop().call_soon(link.send, snapshot)
        return session

    def _spread_presence(self, doc: str, update: bytes, source: str | None) -> None:
        """Merge presence from a peer, a front end or this node; relay only what is new."""
        fresh = self._presence.apply(doc, update, self._now()) if source is not None else update
        if fresh is None:
            return
        if self._mesh is not None:
            mesh = self._mesh
            for peer, msgs in Router.fan_out_presence(doc, fresh, source, mesh.sessions).items():
                mesh.send(peer, msgs)
        if self._endpoint is not None and source != FRONTEND:
            self._endpoint.apply_peer_awareness(doc, fresh)

    async def _presence_loop(self) -> None:
        while True:
            await asyncio.sleep(self._presence.timeout / 6)
            now = self._now()
            self._presence.expire(now)
            for doc, update in self._presence.renew(now):
                self._spread_presence(doc, update, source=None)

    def _on_update(self, doc: str, update: bytes, origin: object | None) -> None:
        """Take one committed transaction from the replica's observer.

        The doc is borrowed here, so this only queues: the router coalesces updates per
        (doc, source) until `_drain` runs at the end of this loop turn.
        """
        if self._router.add(doc, update, origin):
            asyncio.get_running_loop().call_soon(self._drain)
        if self._checkpointer is not None:
            self._checkpointer.mark_dirty(doc)
        if self._endpoint is not None:
            self._endpoint.publish(doc, update, origin)

    def _drain(self) -> None:
        """Cache each merged update, and send it to every link but the one it came from."""
        for routed in self._router.drain():
            self._persist(routed.doc, routed.update)
            if self._mesh is not None:
                mesh = self._mesh
                for peer, msgs in Router.fan_out(routed, mesh.sessions).items():
                    mesh.send(peer, msgs)

    def _persist(self, doc: str, update: bytes) -> None:
        self._writer.persist(doc, update)

    def _full_state(self, name: str) -> bytes | None:
        return self._replica.diff(name, b"\x00") if name in self._replica else None

    def _loaded_state(self, name: str) -> bytes | None:
        # Compaction deletes the rows a state covers: never for a doc missing some rows.
        return None if name in self._partial else self._full_state(name)

    def _on_joined(self, link: Link) -> None:
        # A link coming back often means a network came back: peers that appeared meanwhile
        # are not re-announced by mDNS on their own, so ask again (at most every few seconds).
        now = self._now()
        if self._discovery is not None and now - self._last_refresh > REFRESH_MIN_INTERVAL:
            self._last_refresh = now
            self.spawn(self._discovery.refresh(), "mdns refresh")

    # -- discovery --------------------------------------------------------------------------

    async def _start_discovery(self) -> None:
        from .net.mdns import Discovery, Found

        assert self._keys is not None and self._listener is not None and self._mesh is not None
        mesh = self._mesh
        if self._listener.address.scheme != "ws":
            log.warning(
                "mDNS announces websocket peers only; this node listens with %s://",
                self._listener.address.scheme,
            )
            return

        def found(peer: Found) -> None:
            # mDNS is only a hint: the handshake decides whether it is one of us.
            mesh.add_address(PeerAddress(peer.host, peer.port, "ws"), persistent=False)

        self._discovery = Discovery(
            beacon=self._keys.beacon,
            port=self._listener.address.port,
            on_found=found,
            interfaces=self.config.mdns_interfaces,
            requery_interval=self.config.mdns_requery_interval,
        )
        await self._discovery.start()

    # -- checkpoints ------------------------------------------------------------------------

    def _require_checkpointer(self) -> Checkpointer:
        if self._checkpointer is None:
            raise UnityCrdtError(
                "checkpoints are off: set NodeConfig.checkpoint_url (or pass Node(sink=...))"
            )
        return self._checkpointer

    async def _start_checkpoints(self, sink: CheckpointSink) -> None:
        from .checkpoint.policy import Checkpointer

        cfg = self.config
        assert self._keys is not None
        cp = Checkpointer(
            self._keys,
            self.device_id,
            sink,
            get_state=lambda name: self._replica.doc(name).get_update(),
            text_of=self._text_of,
        )
        self._checkpointer = cp
        # Docs loaded from the cache may be newer than any checkpoint (offline edits).
        for name in self._replica.names():
            cp.mark_dirty(name)
        if cfg.restore_on_start:
            try:
                await self.restore()
            except CheckpointError as exc:
                log.warning("restore on start failed, continuing from the local cache: %s", exc)
        self.spawn(cp.run(cfg.checkpoint_interval), "checkpoint loop")
        if cfg.pull_interval is not None:
            self.spawn(cp.run_pull(cfg.pull_interval, self._apply_checkpoints), "pull loop")

    def _apply_checkpoints(self, states: dict[str, list[bytes]]) -> None:
        """Merge checkpointed states like any remote update: cached, gossiped, never undone."""
        for name, blobs in states.items():
            for state in blobs:
                try:
                    self._replica.apply_remote(name, state, CHECKPOINT_ORIGIN)
                except ProtocolError as exc:
                    log.warning("a checkpoint of one doc could not be merged: %s", exc)

    def _text_of(self, name: str) -> str | None:
        """The plain-text projection of a searchable doc: its Text roots, in name order."""
        if name not in self.config.searchable:
            return None
        doc = self._replica.doc(name)
        parts = []
        for key in sorted(doc.keys()):
            value = doc[key] if key in doc._roots and doc._roots[key] is not None else None
            if isinstance(value, pycrdt.Text):
                parts.append(str(value))
        return "\n".join(parts)

    async def _final_checkpoint(self, cp: Checkpointer) -> None:
        try:
            if cp.dirty:
                await asyncio.wait_for(cp.checkpoint(), 30.0)
        except (CheckpointError, TimeoutError) as exc:
            log.warning(
                "final checkpoint on close failed (the local cache has every edit): %s", exc
            )
        finally:
            await cp.close()
