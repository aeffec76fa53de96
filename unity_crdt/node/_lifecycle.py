"""Starting and closing a node: the order its parts open in, and the order they close in.

Both live here, side by side, so the one can be read against the other: what a step opens,
`close_node` closes, and a start that fails part-way is closed the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..crypto.frames import PeerHello
from ..crypto.keys import DeviceIdentity
from ..errors import ConfigError, StoreError
from ..ids import PeerAddress
from ..net.mesh import Mesh
from ..store.files import load_or_create_secret_file, prepare_cache_dir
from ..sync.codec import PROTOCOL_VERSION
from ._discovery import start_discovery
from ._members import MembersService
from ._services import start_services
from ._traffic import FRONTEND

if TYPE_CHECKING:
    from . import Node

__all__ = ["close_node", "start_node", "stop_tasks"]

log = logging.getLogger(__name__)

STOP_ROUNDS, STOP_WAIT = 10, 1.0  # close(): cancel what still runs, up to 10 times, 1 s apart


async def start_node(node: Node) -> None:
    """Open the cache, load every doc, listen, link, and start the services an epoch allows."""
    cfg, traffic = node.config, node._traffic
    prepare_cache_dir(cfg.cache_path)
    key = await asyncio.to_thread(
        load_or_create_secret_file,
        cfg.cache_path / "device.key",
        lambda: DeviceIdentity.generate().private_bytes(),
    )
    identity = node._identity = DeviceIdentity.from_private_bytes(key)
    members = node._members = MembersService(node)
    keys = node._keys = await members.open(cfg.group_secret)
    if not keys.salted:
        log.info("the group secret has no salt of its own; `unity-crdt keygen` makes one")
    await _load_cache(node)
    hello = PeerHello(
        name=cfg.name,
        device_id=identity.device_id,
        version=PROTOCOL_VERSION,
        max_frame=2**20,
    )
    mesh = node._mesh = Mesh(
        config=cfg,
        transports=node._transports,
        keys=keys,
        identity=identity,
        hello=hello,
        make_session=traffic.make_session,
        spawn=node.spawn,
        on_joined=traffic.on_joined,
        lookup=members.gate.lookup,
        screen=members.gate.screen,
        dial_keys=members.dial_keys,
        on_failure=members.gate.on_failure,
        on_left=members.gate.on_left,
    )
    listen = node._transports.get(cfg.transport)
    if listen is None:
        raise ConfigError(f"no transport for {cfg.transport}:// to listen with")
    listener = node._listener = await listen.listen(
        PeerAddress(cfg.host, cfg.port, cfg.transport), mesh.accept
    )
    if members.state != "revoked":  # a revoked device links to no one
        for url in cfg.peers:
            mesh.add_address(PeerAddress.parse(url))
    node.spawn(traffic.presence_loop(), "presence")
    if cfg.mdns and members.state != "revoked":
        node._discovery = await start_discovery(cfg, members.beacons, listener.address, mesh)
    if cfg.yjs_endpoint:
        from ..frontends.ywebsocket import YWebsocketEndpoint

        node._endpoint = YWebsocketEndpoint(
            node._replica,
            cfg.yjs_token,
            on_awareness=lambda doc, update: traffic.spread_presence(doc, update, FRONTEND),
            on_join=traffic.front_end_joined,
            origins=cfg.yjs_origins,
        )
        await node._endpoint.start(cfg.yjs_host, cfg.yjs_port)
    if node._sink is None and cfg.checkpoint_url is not None:
        from ..checkpoint.sinks import open_sink

        node._sink = open_sink(cfg.checkpoint_url, cfg)
    if members.joined:  # an invited device starts these once it joined
        await start_services(node)
    log.info("node %r (%s) listening on %s", cfg.name, node.device_id[:8], node.url)


async def _load_cache(node: Node) -> None:
    store = node._store
    await store.open()
    if store.recovered_from is not None:
        log.error(
            "the local cache was damaged and rebuilt from what it still held (the damaged "
            "file is kept as %s); what it lost re-syncs from peers and checkpoints",
            store.recovered_from,
        )
    for name in await store.docs():
        try:
            blobs = await store.load(name)
        except StoreError as exc:  # one unreadable doc must not keep the others offline
            log.error("could not load doc %r from the local cache: %s", name, exc)
            continue
        bad = 0
        # One at a time: a bad update must not hide the rest. No blobs (all lost to
        # damage) makes no doc: it comes back with the next peer that has it.
        for blob in blobs:
            try:
                node._replica.load(name, [blob])
            except StoreError:
                bad += 1
        if bad:
            node._partial.add(name)
            log.error("doc %r: %d cached updates are not valid; skipped", name, bad)


async def close_node(node: Node) -> None:
    """Stop linking, stop every task, flush the cache, then close the services and the cache."""
    if node._identity is None:  # start failed before the cache was opened
        return
    if node._discovery is not None:
        await node._discovery.close()
    if node._endpoint is not None:
        await node._endpoint.close()
    if node._mesh is not None:
        await node._mesh.close()
    if node._listener is not None:
        await node._listener.close()
    await stop_tasks(node._tasks)
    await node._work.close()
    unsaved = None
    try:
        await node.flush()
    except StoreError as exc:  # close anyway (the lock must go), then say so
        unsaved = exc
    node._writer.close()
    if node._checkpoints is not None:
        await node._checkpoints.close()
    if node._relay is not None:
        await node._relay.close()
    if node._members is not None:
        await node._members.save()
    await node._store.close()
    if unsaved is not None:
        raise unsaved


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel every task still running, again and again until they stop (or log the rest)."""
    # A cancellation can be dropped (asyncio.wait_for on 3.11 returns a result that
    # raced it; some nats-py calls catch it): cancel again what is still running.
    for _ in range(STOP_ROUNDS):
        left = [t for t in tasks if not t.done()]
        if not left:
            return
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=STOP_WAIT)
    names = sorted(t.get_name() for t in tasks if not t.done())
    if names:
        log.error("tasks still running after %d cancellations: %s", STOP_ROUNDS, names)
