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
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pycrdt

from ..config import NodeConfig
from ..crypto.frames import PeerHello
from ..crypto.keys import DeviceIdentity, GroupKeys, work_names_key
from ..errors import ConfigError, StoreError, UnityCrdtError
from ..ids import PeerAddress, check_doc_id
from ..net.channel import Listener, Transport, resolve_transports
from ..net.link import Link
from ..net.mesh import Mesh
from ..net.relay import RELAY_ORIGIN
from ..status import Member, NodeStatus, PeerInfo
from ..store.base import Store
from ..store.files import load_or_create_secret_file, prepare_cache_dir
from ..store.sqlite import SqliteStore
from ..store.writer import CacheWriter
from ..sync.codec import PROTOCOL_VERSION, Awareness, Members, Notice
from ..sync.nodewide import DocQuota, PullGate, SeenFilter
from ..sync.presence import Presence
from ..sync.replica import Replica
from ..sync.router import Router
from ..sync.session import SyncSession
from ._discovery import start_discovery
from ._members import MembersService
from ._status import node_status
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

REFRESH_MIN_INTERVAL = 5.0
FRONTEND = "frontend"  # the source tag of presence set by y-websocket clients
STOP_ROUNDS, STOP_WAIT = 10, 1.0  # close(): cancel what still runs, up to 10 times, 1 s apart


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
        self._pulls = PullGate(config.anti_entropy_interval)
        self._quota = DocQuota(config.new_docs_burst, config.new_docs_rate)
        self._router = Router()
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
        self._equivocations: set[str] = set()  # docs a peer holds differently under one id
        self._work = Work(config)
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
        self._spread_presence(doc, update, source=None)

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
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        cfg = self.config
        prepare_cache_dir(cfg.cache_path)
        key = await asyncio.to_thread(
            load_or_create_secret_file,
            cfg.cache_path / "device.key",
            lambda: DeviceIdentity.generate().private_bytes(),
        )
        self._identity = DeviceIdentity.from_private_bytes(key)
        members = self._members = MembersService(self)
        self._keys = await members.open(cfg.group_secret)
        if not self._keys.salted:
            log.info("the group secret has no salt of its own; `unity-crdt keygen` makes one")
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
            lookup=members.gate.lookup,
            screen=members.gate.screen,
            dial_keys=members.dial_keys,
            on_failure=members.gate.on_failure,
            on_left=members.gate.on_left,
        )
        listen = self._transports.get(cfg.transport)
        if listen is None:
            raise ConfigError(f"no transport for {cfg.transport}:// to listen with")
        self._listener = await listen.listen(
            PeerAddress(cfg.host, cfg.port, cfg.transport), self._mesh.accept
        )
        if members.state != "revoked":  # a revoked device links to no one
            for url in cfg.peers:
                self._mesh.add_address(PeerAddress.parse(url))
        self.spawn(self._presence_loop(), "presence")
        if cfg.mdns and members.state != "revoked":
            await self._start_discovery()
        if cfg.yjs_endpoint:
            from ..frontends.ywebsocket import YWebsocketEndpoint

            self._endpoint = YWebsocketEndpoint(
                self._replica,
                cfg.yjs_token,
                on_awareness=lambda doc, update: self._spread_presence(doc, update, FRONTEND),
                on_join=self._front_end_joined,
                origins=cfg.yjs_origins,
            )
            await self._endpoint.start(cfg.yjs_host, cfg.yjs_port)
        if self._sink is None and cfg.checkpoint_url is not None:
            from ..checkpoint.sinks import open_sink

            self._sink = open_sink(cfg.checkpoint_url, cfg)
        if members.joined:  # an invited device starts these once it joined
            await self._start_services()
        log.info("node %r (%s) listening on %s", cfg.name, self.device_id[:8], self.url)

    async def _start_services(self) -> None:
        """Checkpoints, the relay and collective work: they need the keys of an epoch of the
        group (an invited device starts them once it joined)."""
        assert self._keys is not None and self._members is not None
        self._services_started = True
        cfg, keys = self.config, self._keys
        ledger, outbox, readers = self._members.startup_names()
        if self._sink is not None and self._checkpoints is None:
            from ._checkpoints import Checkpoints

            self._checkpoints = Checkpoints(
                cfg,
                keys,
                self.device_id,
                self._sink,
                self._replica,
                spawn=self.spawn,
                notify=self._notify,
                ledger=ledger,
                readers=readers,
            )
            await self._checkpoints.start()
        await self._start_relay(keys, outbox)
        # Collective work too: its coordination store (NATS KV) is keyed by the epoch's keys.
        await self._work.start(
            device_id=self.device_id,
            keys=keys,
            names=work_names_key(self._members.roster.group_id),
            doc=self._replica.doc,
            has=self._replica.__contains__,
            connected=lambda: {p.device_id for p in self.peers},
            settle=self._settle,
            spawn=self.spawn,
        )

    async def _start_relay(self, keys: GroupKeys, outbox: str) -> None:
        if not self.config.relay_url or self._relay is not None:
            return
        from ._relay import make_relay

        checkpoints, members = self._checkpoints, self._members
        assert members is not None
        self._relay = make_relay(
            self.config,
            keys,
            self.device_id,
            self._replica,
            self._seen,
            spawn=self.spawn,
            on_notice=self._on_notice,
            on_gap=checkpoints.pull_everything if checkpoints else None,
            on_members=lambda msg: members.receive(None, msg),
            outbox=outbox,
        )
        if self._relay is not None:
            await self._relay.start()
            # Relay-only members learn of us too (and of what we did while it was down).
            self._relay.send_members(members.own_ops())

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
        await self._stop_tasks()
        await self._work.close()
        unsaved = None
        try:
            await self.flush()
        except StoreError as exc:  # close anyway (the lock must go), then say so
            unsaved = exc
        self._writer.close()
        if self._checkpoints is not None:
            await self._checkpoints.close()
        if self._relay is not None:
            await self._relay.close()
        if self._members is not None:
            await self._members.save()
        await self._store.close()
        if unsaved is not None:
            raise unsaved

    async def _stop_tasks(self) -> None:
        # A cancellation can be dropped (asyncio.wait_for on 3.11 returns a result that
        # raced it; some nats-py calls catch it): cancel again what is still running.
        for _ in range(STOP_ROUNDS):
            left = [t for t in self._tasks if not t.done()]
            if not left:
                return
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=STOP_WAIT)
        names = sorted(t.get_name() for t in self._tasks if not t.done())
        if names:
            log.error("tasks still running after %d cancellations: %s", STOP_ROUNDS, names)

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

    def _settle(self) -> float:
        """One sync round with every linked peer (for LAN leases): twice the slowest RTT."""
        rtts = [
            lk.session.stats.rtt or 0.0
            for lk in (self._mesh.links.values() if self._mesh else ())
            if lk.session
        ]
        return min(1.0, max(0.05, 2 * max(rtts, default=0.0) + 0.03))

    def _make_session(self, link: Link) -> SyncSession:
        assert link.remote is not None
        cfg = self.config
        peer = link.remote.device_id
        session = SyncSession(
            self._replica,
            peer=peer,
            now=self._now(),
            seen=self._seen,
            pulls=self._pulls,
            anti_entropy_interval=cfg.anti_entropy_interval,
            ping_interval=cfg.ping_interval,
            idle_timeout=cfg.idle_timeout,
            on_awareness=lambda doc, update: self._spread_presence(doc, update, source=peer),
            max_doc_bytes=cfg.max_doc_bytes,
            quota=self._quota,
            on_notice=self._on_notice,
            allow=self._members.gate.allow(link) if self._members else None,
            on_members=lambda msg: self._receive_members(link, msg),
            on_equivocation=lambda doc: self._equivocation(doc, link),
        )
        # After the HELLO the link queues next: tell the newcomer who is here.
        snapshot = [Awareness(doc, snap) for doc, snap in self._presence.snapshot(self._now())]
        if snapshot:
            asyncio.get_running_loop().call_soon(link.send, snapshot)
        return session

    def _equivocation(self, doc: str, link: Link) -> None:
        """A peer holds other content than ours under the same ids: someone equivocated."""
        if doc not in self._equivocations:
            log.error(
                "doc %r: %s holds different content under the same ids (a member sent two "
                "versions of one edit); the copies will not converge on their own",
                doc,
                link.label,
            )
        self._equivocations.add(doc)

    def _spread_presence(self, doc: str, update: bytes, source: str | None) -> None:
        """Merge presence from a peer, a front end or this node; relay only what is new.

        Only for docs this node holds or a front end has open: presence for made-up names is
        kept aside (bounded) and relayed nowhere.
        """
        held = doc in self._replica or bool(self._endpoint and self._endpoint.clients(doc))
        now = self._now()
        fresh = self._presence.apply(doc, update, now, held=held) if source is not None else update
        if fresh is None:
            return
        if self._mesh is not None:
            mesh = self._mesh
            for peer, msgs in Router.fan_out_presence(doc, fresh, source, mesh.sessions).items():
                mesh.send(peer, msgs)
        if self._endpoint is not None and source != FRONTEND:
            self._endpoint.apply_peer_awareness(doc, fresh)

    def _front_end_joined(self, doc: str) -> None:
        """A front end opened `doc`: show it what peers said before anyone here held it."""
        snapshot = self._presence.promote(doc, self._now())
        if snapshot is not None and self._endpoint is not None:
            self._endpoint.apply_peer_awareness(doc, snapshot)

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
        if self._checkpoints is not None:
            self._checkpoints.cp.mark_dirty(doc)
        if self._endpoint is not None:
            self._endpoint.publish(doc, update, origin)

    def _drain(self) -> None:
        """Cache each merged update, and send it to every link (and the relay) but its source."""
        for routed in self._router.drain():
            self._persist(routed.doc, routed.update)
            if self._relay is not None and Router.forwards(routed, RELAY_ORIGIN.peer):
                self._relay.send(routed.doc, routed.update)
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

    def _receive_members(self, link: Link, msg: Members) -> None:
        if self._members is not None:
            self._members.receive(link, msg)

    def _on_joined(self, link: Link) -> None:
        if self._members is not None:
            self._members.gate.on_joined(link)
        # A link coming back often means a network came back: peers that appeared meanwhile
        # are not re-announced by mDNS on their own, so ask again (at most every few seconds).
        now = self._now()
        if self._discovery is not None and now - self._last_refresh > REFRESH_MIN_INTERVAL:
            self._last_refresh = now
            self.spawn(self._discovery.refresh(), "mdns refresh")

    # -- discovery --------------------------------------------------------------------------

    async def _start_discovery(self) -> None:
        assert self._members is not None and self._listener is not None and self._mesh is not None
        self._discovery = await start_discovery(
            self.config, self._members.beacons, self._listener.address, self._mesh
        )

    # -- checkpoints and commit notices -----------------------------------------------------

    def _require_checkpoints(self) -> Checkpoints:
        if self._checkpoints is None:
            raise UnityCrdtError(
                "checkpoints are off: set NodeConfig.checkpoint_url (or pass Node(sink=...))"
            )
        return self._checkpoints

    def _notify(self, notice: Notice) -> None:
        """Tell linked peers and the relay that a doc was just checkpointed at this state."""
        if self._mesh is not None:
            for peer in self._mesh.sessions:
                self._mesh.send(peer, [notice])
        if self._relay is not None:
            self._relay.notify(notice)

    def _on_notice(self, notice: Notice) -> None:
        if self._checkpoints is not None:
            self._checkpoints.on_notice(notice)
