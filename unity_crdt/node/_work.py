"""The node's collective work: workers, jobs and leases (`unity_crdt.work`), wired to the node.

Built with the node (so `@node.worker` may come before `start()`), started by `start_services`:
it chooses the coordination mode from the config (strict on NATS key-value when
`coordination_url`, or a NATS `relay_url`, is set; LAN otherwise), connects with the cloud
channel's own `net.nats.connect` (so `work` never imports `net`) when the node first works,
submits or leases (a node that never does opens no second NATS connection), and hands the
engine the node's docs, links and task spawner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pycrdt

from ..config import NodeConfig
from ..crypto.keys import GroupKeys
from ..errors import UnityCrdtError
from ..status import LeaseInfo, WorkStatus

__all__ = ["Work"]

log = logging.getLogger(__name__)

H = TypeVar("H", bound=Callable[..., Any])
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class Work:
    """Collective work on one node; public methods of `Node` delegate here."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._early: list[tuple[str, Callable[..., Any], int]] = []
        self.engine: Any = None  # work.engine.WorkEngine once started
        self.leases: Any = None  # work.leases.LeaseManager once started
        self.kv: Any = None  # work._kv.KvStore in strict mode
        self.kv_started = False
        # Wall clock for display only (submission times, lease expiry shown to others). Tests
        # skew it to show that no decision depends on it.
        self.clock: Callable[[], float] = time.time

    def worker(self, kind: str, concurrency: int) -> Callable[[H], H]:
        """The decorator behind `node.worker`."""

        def register(handler: H) -> H:
            if self.engine is not None:
                self.engine.add_worker(kind, handler, concurrency)
            else:
                if concurrency < 1:
                    raise UnityCrdtError("concurrency must be >= 1")
                self._early.append((kind, handler, concurrency))
            return handler

        return register

    async def start(
        self,
        *,
        device_id: str,
        keys: GroupKeys,
        names: bytes,
        doc: Callable[[str], pycrdt.Doc[Any]],
        has: Callable[[str], bool],
        connected: Callable[[], set[str]],
        settle: Callable[[], float],
        spawn: Spawn,
    ) -> None:
        """Open the work docs, connect to the coordination server if any, start the loops."""
        from ..work.engine import WorkEngine
        from ..work.leases import LeaseManager

        cfg = self.config
        loop = asyncio.get_running_loop()
        urls = cfg.coordination_urls
        if urls:
            from ..net.nats import connect  # nats-py loads only when it is used
            from ..work._kv import KvStore

            self.kv = KvStore(
                urls,
                cfg.coordination_credentials_effective,
                keys,
                names,
                connect=connect,
                replicas=3 if len(urls) >= 3 else 1,
            )
        self.engine = WorkEngine(
            device_id=device_id,
            name=cfg.name,
            doc=doc,
            has=has,
            connected=connected,
            spawn=spawn,
            kv=self.kv,
            heartbeat=cfg.work_heartbeat,
            now=loop.time,
            clock=lambda: self.clock(),
        )
        self.leases = LeaseManager(
            me=device_id,
            names=names,
            doc=doc,
            has=has,
            kv=self.kv,
            spawn=spawn,
            now=loop.time,
            clock=lambda: self.clock(),
            connected=self.engine.connected,
            last_beat=lambda d: self.engine.beats.last_beat.get(d) if self.engine.beats else None,
            settle=settle,
        )
        self.engine.engaged_by_leases = lambda: bool(self.leases.held)
        kv = self.kv
        if kv is not None:
            kv.on_ready = self.engine.kick
            connecting: list[asyncio.Task[None]] = []

            def first_use() -> None:  # connect once, when this node first works or leases
                if not connecting:
                    connecting.append(spawn(kv.run(), "coordination"))
                    self.kv_started = True

            self.engine.on_use = self.leases.on_use = first_use
        self.engine.start()
        self.leases.start()
        for kind, handler, concurrency in self._early:
            self.engine.add_worker(kind, handler, concurrency)
        self._early.clear()

    def rekey(self, keys: GroupKeys) -> None:
        """Seal coordination values with a new epoch's key (lease and bucket names stay put)."""
        if self.kv is not None:
            self.kv.rekey(keys)

    async def close(self) -> None:
        """Stop observing docs and close the coordination connection (tasks are the node's)."""
        if self.engine is not None:
            self.engine.close()
        if self.leases is not None:
            self.leases.close()
        if self.kv is not None:
            await self.kv.close()

    def require(self) -> Any:
        """The engine; UnityCrdtError before start."""
        if self.engine is None:
            raise UnityCrdtError("node is not started")
        return self.engine

    def lease_holder(self, name: str) -> LeaseInfo | None:
        """Who holds a lease now."""
        self.require()
        return self.leases.holder(name)  # type: ignore[no-any-return]

    def status(self) -> WorkStatus | None:
        """The work part of the node's status."""
        if self.engine is None:
            return None
        kv = self.kv
        strict = kv is not None and kv.ready
        url = None
        if self.config.coordination_urls:
            from ..net.nats import public_url

            url = ",".join(public_url(u) for u in self.config.coordination_urls)
        return WorkStatus(
            mode="strict" if strict else "lan",
            coordination_url=url,
            connected=strict,
            error=None
            if kv is None or strict
            else (kv.last_error or "connecting")
            if self.kv_started
            else "not used yet (connects when this node first works, submits or leases)",
            kinds=tuple(sorted(self.engine.workers)),
            running=self.engine.running,
            jobs=tuple(self.engine.job_statuses()),
            leases=tuple(self.leases.infos()),
        )
