"""Leases: one holder at a time per name, with a fencing token that grows with every holder.

Strict (the key-value store is reachable): acquiring is `create` on the lease's key with the
lease's TTL, the token is the key's revision, the holder renews every `ttl / 3` by
compare-and-set (which restarts the server's TTL) and releases by a compare-and-set delete.
Waiters wake on the bucket's watch (a release) or poll every `min(ttl / 4, 0.5)` s (the server
lets an expired key go without an event). The holder sets `lost` when a renewal is refused, or
when `ttl` has passed since the last renewal it *sent* that succeeded: by then the server may
have let go, so the holder gives up before anyone else can get in.

LAN (no coordination server): entries in the `_work/leases` doc. An acquirer that sees no live
holder writes an entry with the next token, waits one sync round (`settle`), and holds the
lease if it still ranks first (`rules.lease_holder`); otherwise it withdraws. Holders stay
alive by their heartbeats; a lease whose holder went quiet for `ttl` is free. After a
partition heals, the holder with the lower token (the larger device id on a tie) sees `lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pycrdt

from ..errors import ConfigError, CoordinationError, UnityCrdtError
from ..status import LeaseInfo
from . import rules
from ._kv import KvStore, lease_key
from .board import LEASES_DOC, _dumps, _loads
from .rules import LeaseClaim

__all__ = ["Lease", "LeaseBoard", "LeaseContext", "LeaseManager"]

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]
MAX_NAME = 255
FIRST_CONNECT_WAIT = 5.0  # seconds a first lease waits for the coordination server to answer


@dataclass
class Lease:
    """A held lease: `token` fences every write made under it; `lost` is set if it passed on."""

    name: str
    token: int
    device_id: str
    ttl: float
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    strict: bool = False
    kv_key: str = ""
    rev: int = 0
    valid_until: float = 0.0
    renewed_at: float = 0.0
    renewing: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # renewals and release take turns
    nonces: set[str] = field(default_factory=set, repr=False)  # strict: our writes to the key


class LeaseContext:
    """`async with node.lease(name, ttl) as lease:` acquires on entry and releases on exit."""

    def __init__(self, manager: LeaseManager, name: str, ttl: float, timeout: float | None):
        self._manager, self._name, self._ttl, self._timeout = manager, name, ttl, timeout
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._manager.acquire(self._name, self._ttl, self._timeout)
        return self._lease

    async def __aexit__(self, *exc: object) -> None:
        if self._lease is not None:
            await self._manager.release(self._lease)


class LeaseManager:
    """This node's leases: acquiring, keeping, releasing, and who holds what."""

    def __init__(
        self,
        *,
        me: str,
        names: bytes,
        doc: Callable[[str], pycrdt.Doc[Any]],
        has: Callable[[str], bool],
        kv: KvStore | None,
        spawn: Spawn,
        now: Callable[[], float],
        clock: Callable[[], float],
        connected: Callable[[], set[str]],
        last_beat: Callable[[str], float | None],
        settle: Callable[[], float],
    ) -> None:
        self.me = me
        self._names = names
        self._doc = doc
        self._has = has
        self.kv = kv
        self._spawn = spawn
        self.now = now
        self.clock = clock
        self._connected = connected
        self._last_beat = last_beat
        self._settle = settle
        self.held: dict[str, Lease] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._kv_view: dict[str, tuple[int, dict[str, Any], float]] = {}
        self.board: LeaseBoard | None = None
        self._started = False
        self.on_use: Callable[[], None] = lambda: None  # the first use (connects strict mode)

    def start(self) -> None:
        """Follow the bucket's leases, start the renewal loop, open the leases doc if here."""
        self._started = True
        if self._has(LEASES_DOC):
            self._board()
        if self.kv is not None:
            self.kv.on_lease = self._on_kv
        self._spawn(self._renew_loop(), "lease renewals")

    def _board(self) -> LeaseBoard:
        """The leases doc (opened on first use: a node that never leases has none)."""
        if self.board is None:
            self.on_use()
            self.board = LeaseBoard(self._doc(LEASES_DOC), now=self.now, on_change=self._on_board)
        return self.board

    def close(self) -> None:
        """Stop observing the doc."""
        if self.board is not None:
            self.board.close()

    @property
    def strict(self) -> bool:
        """Whether leases go through the key-value store right now."""
        return self.kv is not None and self.kv.ready

    # -- acquiring and releasing --------------------------------------------------------------

    async def acquire(self, name: str, ttl: float, timeout: float | None) -> Lease:
        """Wait until this node holds `name` (TimeoutError after `timeout` seconds)."""
        if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_NAME:
            raise ConfigError(f"a lease name is 1-{MAX_NAME} UTF-8 bytes")
        if ttl < 1.0:
            raise ConfigError("ttl must be >= 1 second (the coordination server's granularity)")
        if not self._started:
            raise UnityCrdtError("node is not started")
        self._board()
        if name in self.held:
            raise UnityCrdtError(f"this node already holds the lease {name!r}")
        wake = self._wake.setdefault(name, asyncio.Event())
        ours: set[str] = set()  # our claims of `name`: one whose answer was lost may have landed
        async with asyncio.timeout(timeout):
            if self.kv is not None and not self.kv.settled.is_set():
                # The first use starts the connection. A lease taken in LAN mode a moment
                # before strict mode comes up would be exclusive only among linked peers.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.kv.settled.wait(), FIRST_CONNECT_WAIT)
            while True:
                wake.clear()
                lease = await (
                    self._try_strict(name, ttl, ours) if self.strict else self._try_lan(name, ttl)
                )
                if lease is not None:
                    self.held[name] = lease
                    return lease
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(ttl / 4, 0.5))

    async def _try_strict(self, name: str, ttl: float, ours: set[str]) -> Lease | None:
        assert self.kv is not None and self.board is not None
        key = lease_key(self._names, name)
        sent = self.now()
        payload = {"n": name, "d": self.me, "ttl": ttl, "exp": self.clock() + ttl}
        try:
            rev = await self.kv.create(key, payload, ttl, ours)
        except CoordinationError as exc:
            log.warning("lease %r: %s", name, exc)
            return None
        if rev is None:
            return None
        self.board.write(LeaseClaim(name, self.me, rev, True, ttl, strict=True))
        return Lease(name, rev, self.me, ttl, strict=True, kv_key=key, rev=rev,
                     valid_until=sent + ttl, renewed_at=sent, nonces=ours)  # fmt: skip

    async def _try_lan(self, name: str, ttl: float) -> Lease | None:
        assert self.board is not None
        entries = self.board.of(name)
        holder = self._holder(name)
        if holder is not None and holder.device != self.me:
            return None
        token = rules.next_lease_token(entries)
        self.board.write(LeaseClaim(name, self.me, token, True, ttl))
        await asyncio.sleep(self._settle())  # concurrent claims of linked peers arrive meanwhile
        holder = self._holder(name)
        if holder is None or holder.device != self.me or holder.token != token:
            self.board.write(LeaseClaim(name, self.me, token, False, ttl))
            return None
        return Lease(name, token, self.me, ttl)

    async def release(self, lease: Lease) -> None:
        """Let go of a lease (waiters are woken at once)."""
        if self.held.get(lease.name) is lease:
            del self.held[lease.name]
        assert self.board is not None
        self.board.write(
            LeaseClaim(lease.name, self.me, lease.token, False, lease.ttl, lease.strict)
        )
        if lease.strict and self.kv is not None and not lease.lost.is_set():
            try:
                async with lease.lock:
                    await self.kv.delete(lease.kv_key, lease.rev)
            except CoordinationError as exc:
                log.warning("lease %r: release not confirmed (%s); it expires", lease.name, exc)
        lease.lost.set()  # nothing done under this lease from now on is fenced by it

    # -- views --------------------------------------------------------------------------------

    def _last_alive(self, c: LeaseClaim) -> float:
        if c.device == self.me or c.device in self._connected():
            return self.now()
        assert self.board is not None
        seen = self.board.seen_at.get((c.name, c.device), self.now())
        beat = self._last_beat(c.device)
        return seen if beat is None else max(seen, beat)

    def _holder(self, name: str) -> LeaseClaim | None:
        assert self.board is not None
        return rules.lease_holder(
            self.board.of(name), me=self.me, now=self.now(), last_alive=self._last_alive
        )

    def holder(self, name: str) -> LeaseInfo | None:
        """Who holds `name` now, as this node knows it."""
        self.on_use()  # in strict mode the bucket's watch knows; follow it from now on
        mine = self.held.get(name)
        now = self.now()
        if mine is not None and not mine.lost.is_set():
            left = mine.valid_until - now if mine.strict else mine.ttl
            return LeaseInfo(self.me, name, mine.token, max(0.0, left))
        if self.strict:
            found = self._kv_view.get(lease_key(self._names, name))
            if found is None:
                return None
            rev, payload, seen = found
            left = float(payload.get("ttl", 0.0)) - (now - seen)
            if left <= 0:
                return None
            return LeaseInfo(str(payload.get("d", "")), name, rev, left)
        if self.board is None:
            return None
        holder = self._holder(name)
        if holder is None:
            return None
        left = (
            holder.ttl
            if holder.device == self.me
            else holder.ttl - (now - self._last_alive(holder))
        )
        return LeaseInfo(holder.device, name, holder.token, max(0.0, left))

    def infos(self) -> list[LeaseInfo]:
        """Every lease known here that has a holder now."""
        names = set(self.held)
        if self.board is not None:
            names |= set(self.board.entries)
        names |= {str(p.get("n")) for _, p, _ in self._kv_view.values() if p.get("n")}
        found = [self.holder(n) for n in sorted(names)]
        return [i for i in found if i is not None]

    # -- events and renewals ------------------------------------------------------------------

    def _on_board(self, names: set[str]) -> None:
        for name in names:
            if (ev := self._wake.get(name)) is not None:
                ev.set()
            lease = self.held.get(name)
            if lease is not None and not lease.strict and not lease.lost.is_set():
                holder = self._holder(name)
                if holder is None or holder.device != self.me:
                    lease.lost.set()

    def _on_kv(self, key: str, rev: int, payload: dict[str, Any] | None) -> None:
        if payload is None:
            self._kv_view.pop(key, None)
        else:
            self._kv_view[key] = (rev, payload, self.now())
        for lease in self.held.values():
            mine = lease.strict and lease.kv_key == key
            if mine and rev > lease.rev and payload is not None and payload.get("d") != self.me:
                lease.lost.set()
        for name, ev in self._wake.items():
            if lease_key(self._names, name) == key:
                ev.set()

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if self.board is None and self._has(LEASES_DOC):
                self._board()  # a peer's lease entries arrived
            now = self.now()
            for lease in list(self.held.values()):
                if not lease.strict or lease.lost.is_set() or lease.renewing:
                    continue
                if now >= lease.valid_until:
                    lease.lost.set()
                elif now - lease.renewed_at >= lease.ttl / 3:
                    lease.renewing = True
                    self._spawn(self._renew(lease), "lease renew")

    async def _renew(self, lease: Lease) -> None:
        assert self.kv is not None
        try:
            async with lease.lock:
                if self.held.get(lease.name) is not lease:
                    return  # released meanwhile
                sent = self.now()
                payload = {
                    "n": lease.name,
                    "d": self.me,
                    "ttl": lease.ttl,
                    "exp": self.clock() + lease.ttl,
                }
                rev = await self.kv.update(
                    lease.kv_key, payload, lease.rev, lease.ttl, lease.nonces
                )
        except CoordinationError:
            return  # the next tick tries again; the deadline does not move
        finally:
            lease.renewing = False
        if rev is None:
            lease.lost.set()
        else:
            lease.rev, lease.renewed_at, lease.valid_until = rev, sent, sent + lease.ttl


class LeaseBoard:
    """Lease entries (`_work/leases`): per name, each device's token and whether it holds it."""

    def __init__(
        self,
        doc: pycrdt.Doc[Any],
        *,
        now: Callable[[], float],
        on_change: Callable[[set[str]], None],
    ) -> None:
        self._map = doc.get("leases", type=pycrdt.Map)
        self.doc = doc
        self._now = now
        self._on_change = on_change
        self.entries: dict[str, dict[str, LeaseClaim]] = {}  # name -> device -> entry
        self.seen_at: dict[tuple[str, str], float] = {}
        self._sub = self._map.observe(self._on_event)
        self._ingest(dict(self._map.items()))

    def _on_event(self, event: Any) -> None:
        self._ingest(
            {
                k: c.get("newValue")
                for k, c in event.keys.items()
                if c.get("action") in ("add", "update")
            }
        )

    def _ingest(self, entries: dict[str, Any]) -> None:
        names: set[str] = set()
        now = self._now()
        for key, raw in entries.items():
            try:
                name, device = _loads(key)
                rec = _loads(raw)
                entry = LeaseClaim(
                    str(name),
                    str(device),
                    int(rec["t"]),
                    bool(rec["h"]),
                    float(rec["ttl"]),
                    bool(rec.get("x")),
                )
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("leases: entry %r ignored: %s", key, exc)
                continue
            self.entries.setdefault(entry.name, {})[entry.device] = entry
            self.seen_at[(entry.name, entry.device)] = now
            names.add(entry.name)
        if names:
            self._on_change(names)

    def write(self, entry: LeaseClaim) -> None:
        """Record this device's entry for a lease (one transaction)."""
        rec: dict[str, Any] = {"t": entry.token, "h": entry.held, "ttl": entry.ttl}
        if entry.strict:
            rec["x"] = 1
        self._map[_dumps([entry.name, entry.device])] = _dumps(rec)

    def of(self, name: str) -> list[LeaseClaim]:
        """Every entry for a lease name."""
        return list(self.entries.get(name, {}).values())

    def close(self) -> None:
        """Stop observing."""
        self._map.unobserve(self._sub)
