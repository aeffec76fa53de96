"""The mesh policy: which links exist, which survive, who is redialled, and when.

One link per device pair: when both sides dial, both keep the link whose initiator has the
smaller device id, so the two ends always agree without talking. Dialers back off with full
jitter up to `reconnect_max`, and pause while the device they reach is linked some other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from ..config import NodeConfig
from ..crypto.frames import PeerHello
from ..crypto.keys import DeviceIdentity, GroupKeys
from ..errors import ConfigError, ErrorCode, UnityCrdtError
from ..ids import PeerAddress
from ..status import PeerInfo
from ..sync.codec import Message
from ..sync.session import SyncSession
from ._admission import DialBudget, FailureLog, HandshakeSlots
from .channel import Channel, Transport
from .link import Link

log = logging.getLogger(__name__)

MIN_BACKOFF = 0.1
# A link that lived this long counts as healthy: the next failure starts backing off afresh.
HEALTHY_AFTER = 10.0
DISCOVERED_MAX_FAILURES = 5
FAILURE_LOG_WINDOW = 60.0  # one line per source per window for failed handshakes


class Mesh:
    """Every link of one node: admission, deduplication and dialling."""

    def __init__(
        self,
        *,
        config: NodeConfig,
        transports: Mapping[str, Transport],
        keys: GroupKeys,
        identity: DeviceIdentity,
        hello: PeerHello,
        make_session: Callable[[Link], SyncSession],
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
        on_joined: Callable[[Link], None] | None = None,
        lookup: Callable[[bytes], GroupKeys] | None = None,
        screen: Callable[[Link], None] | None = None,
        dial_keys: Callable[[], Sequence[GroupKeys]] | None = None,
        on_failure: Callable[[Link, str], None] | None = None,
        on_left: Callable[[Link], None] | None = None,
    ) -> None:
        """`lookup` (PSK id -> keys) answers handshakes of other epochs and invitations;
        `screen` raises Refused for an authenticated peer that may not link (membership);
        `dial_keys` lists what to dial with, the current keys first: a dialler whose
        handshake is refused tries the next (a member still in an older epoch); `on_failure`
        hears every failed handshake and `on_left` every link that ended."""
        self._cfg = config
        self._lookup, self._screen, self._dial_keys = lookup, screen, dial_keys
        self._on_failure, self._on_left = on_failure, on_left
        self._transports = transports
        self._keys, self._identity, self._hello = keys, identity, hello
        self._make_session = make_session
        self._spawn = spawn
        self._on_joined = on_joined
        self.links: dict[str, Link] = {}
        self._slots = HandshakeSlots(
            config.max_handshakes, config.max_handshakes_per_ip, config.max_handshakes_per_subnet
        )
        self._in_handshake: dict[Link, int] = {}  # link -> its handshake slot
        self._slot_links: dict[int, Link] = {}
        self._failures = FailureLog(FAILURE_LOG_WINDOW)
        self._budget = DialBudget()
        self._static: set[PeerAddress] = set()
        self._flush_at: asyncio.TimerHandle | None = None
        self._dialers: dict[PeerAddress, asyncio.Task[None]] = {}
        self._url_device: dict[PeerAddress, str] = {}
        self._link_gone: dict[str, asyncio.Event] = {}
        self._wake: dict[PeerAddress, asyncio.Event] = {}
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

    def set_keys(self, keys: GroupKeys) -> None:
        """Dial with these keys from now on (a new epoch); live links are kept."""
        self._keys = keys

    def peer_infos(self) -> list[PeerInfo]:
        """The authenticated peers, in link order."""
        return [
            PeerInfo(lk.remote.name, dev, lk.address.url)
            for dev, lk in self.links.items()
            if lk.remote is not None
        ]

    @property
    def sessions(self) -> dict[str, SyncSession]:
        """The sync session of every linked peer, by device id."""
        return {dev: lk.session for dev, lk in self.links.items() if lk.session is not None}

    def send(self, device_id: str, messages: list[Message]) -> None:
        """Queue messages for one linked peer (dropped if it is no longer linked)."""
        link = self.links.get(device_id)
        if link is not None and link.session is not None:
            link.send(messages)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds; it is re-checked whenever a peer joins or leaves."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        # Swap in a fresh event so every current waiter wakes exactly once.
        self._changed.set()
        self._changed = asyncio.Event()

    def add_address(self, address: PeerAddress, *, persistent: bool = True) -> None:
        """Keep a link to this address: dial now, and redial whenever it drops.

        A discovered (non-persistent) address is dropped after a few failed dials in a row
        and ignored for a while after that (`DialBudget`); discovered addresses share a dial
        rate and a cap on how many are dialled at once. Static peers are dialled forever.
        """
        if self._closing:
            return
        if address.scheme not in self._transports:
            have = ", ".join(sorted(self._transports))
            raise ConfigError(f"no transport for {address.scheme}:// (have: {have})")
        if address in self._dialers:
            # A static peer given again means "now"; a re-announcement means nothing new
            # (replaying one must not buy a stranger's address more attempts).
            if persistent:
                self._wake[address].set()
            return
        if not persistent:
            discovered = sum(1 for a in self._dialers if a not in self._static)
            if not self._budget.may_dial(address, discovered, self._loop.time()):
                return
        else:
            self._static.add(address)
        self._wake[address] = asyncio.Event()
        self._dialers[address] = self._spawn(self._dialer(address, persistent), f"dial {address}")

    async def accept(self, channel: Channel) -> None:
        """Transport handler for an inbound connection; admission limits apply before crypto."""
        ip = channel.remote.host
        slot, evicted = (None, None) if self._closing else self._slots.admit(ip)
        if slot is None:
            self._note_failure(f"from {ip}", "refused: too many handshakes in progress")
            await channel.close(1013, "try again later")
            return
        if evicted is not None:  # a member seen before takes the slot of a stranger
            victim = self._slot_links.pop(evicted, None)
            if victim is not None:
                self._in_handshake.pop(victim, None)
                self._spawn(victim.channel.close(1013, "try again later"), "evict handshake")
        link = self._new_link(channel, initiator=False, dial_address=None)
        self._in_handshake[link] = slot
        self._slot_links[slot] = link
        try:
            await link.run()
        finally:
            self._release_slot(link)
            self._forget(link)

    async def close(self) -> None:
        """Say goodbye on every link, give them a moment to flush, then stop dialling."""
        self._closing = True
        if self._flush_at is not None:
            self._flush_at.cancel()
        for line in self._failures.flush(self._loop.time(), everything=True):
            log.warning("%s", line)
        for link in list(self.links.values()):
            link.close_soon(ErrorCode.SHUTDOWN, "node shutting down")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_until(lambda: not self.links), 2.0)
        for task in self._dialers.values():
            task.cancel()
        await asyncio.gather(*self._dialers.values(), return_exceptions=True)

    # -- internals --------------------------------------------------------------------------

    def _new_link(
        self,
        channel: Channel,
        *,
        initiator: bool,
        dial_address: PeerAddress | None,
        keys: GroupKeys | None = None,
    ) -> Link:
        return Link(
            channel,
            keys=keys or self._keys,
            lookup=self._lookup,
            identity=self._identity,
            hello=self._hello,
            initiator=initiator,
            clock=self._loop.time,
            accept=self._admit,
            handshake_timeout=self._cfg.handshake_timeout,
            max_queue_bytes=self._cfg.send_queue_bytes,
            dial_address=dial_address,
            first_message_timeout=self._cfg.first_message_timeout,
            on_failed_handshake=self._failed_handshake,
        )

    def _release_slot(self, link: Link) -> None:
        slot = self._in_handshake.pop(link, None)
        if slot is not None:
            self._slots.release(slot)
            self._slot_links.pop(slot, None)

    def _failed_handshake(self, link: Link, reason: str) -> None:
        if self._on_failure is not None:
            self._on_failure(link, reason)
        where = "to" if link.initiator else "from"
        self._note_failure(f"{where} {(link.dial_address or link.channel.remote).host}", reason)

    def _note_failure(self, source: str, reason: str) -> None:
        """Log a failed handshake: the first per source and window now, the rest as a count."""
        line = self._failures.note(source, reason, self._loop.time())
        if line is not None:
            log.warning("%s", line)
        if self._flush_at is None and not self._closing:
            self._flush_at = self._loop.call_later(self._failures.window, self._flush_failures)

    def _flush_failures(self) -> None:
        self._flush_at = None
        for line in self._failures.flush(self._loop.time()):
            log.warning("%s", line)
        if len(self._failures) and not self._closing:
            self._flush_at = self._loop.call_later(self._failures.window, self._flush_failures)

    def _admit(self, link: Link) -> SyncSession | None:
        assert link.remote is not None
        dev = link.remote.device_id
        if link.dial_address is not None:
            self._url_device[link.dial_address] = dev
        self._release_slot(link)  # the handshake is over: its admission slot is free again
        if self._screen is not None and dev != self._identity.device_id:
            self._screen(link)  # raises Refused: the link ends with a sealed CLOSE
        self._slots.remember(link.channel.remote.host)  # preferred in the next flood
        if dev == self._identity.device_id:
            log.info("address %s is this node itself; not dialling it again", link.dial_address)
            return None
        existing = self.links.get(dev)
        if existing is not None and existing is not link:
            if self._initiator_of(link) > self._initiator_of(existing):
                return None
            existing.close_soon(ErrorCode.DUPLICATE_LINK, "replaced by a newer link")
        self.links[dev] = link
        self._link_gone.setdefault(dev, asyncio.Event()).clear()
        log.info("peer joined: %s", link.label)
        self._notify()
        if self._on_joined is not None:
            self._on_joined(link)
        return self._make_session(link)

    def _initiator_of(self, link: Link) -> str:
        """The device id that dialled this link: the smaller one's link wins (ties: newest)."""
        assert link.remote is not None
        return self._identity.device_id if link.initiator else link.remote.device_id

    def _forget(self, link: Link) -> None:
        if link.session is not None:
            link.session.close()  # frees its pulls for the other links
        if self._on_left is not None:
            self._on_left(link)
        if link.remote is None:
            return
        dev = link.remote.device_id
        if self.links.get(dev) is link:
            del self.links[dev]
            self._link_gone.setdefault(dev, asyncio.Event()).set()
            log.info("peer left: %s (%s)", link.label, link.close_reason or "closed")
            self._notify()

    async def _dial_turn(self) -> None:
        """Wait for a token of the dial budget that discovered addresses share."""
        for _ in range(1000):  # one wait normally refills a token; the bound is only a backstop
            wait = self._budget.take(self._loop.time())
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _dialer(self, address: PeerAddress, persistent: bool) -> None:
        try:
            await self._dial_loop(address, persistent)
        finally:
            self._dialers.pop(address, None)
            self._wake.pop(address, None)

    async def _dial_loop(self, address: PeerAddress, persistent: bool) -> None:
        backoff = MIN_BACKOFF
        failures = 0
        turn = 0  # which of `dial_keys` to try: the next one after a refused handshake
        while not self._closing:
            dev = self._url_device.get(address)
            if dev == self._identity.device_id:
                return
            if dev is not None and dev in self.links:
                # Linked some other way (it dialled us): wait for that link to go.
                await self._link_gone.setdefault(dev, asyncio.Event()).wait()
                continue
            if not persistent:
                await self._dial_turn()
            started = self._loop.time()
            try:
                transport = self._transports[address.scheme]
                channel = await transport.dial(address, timeout=self._cfg.handshake_timeout)
            except UnityCrdtError as exc:
                log.debug("dial %s failed: %s", address, exc)
                linked = False
            else:
                choices = list(self._dial_keys()) if self._dial_keys else [self._keys]
                keys = choices[turn % len(choices)] if choices else self._keys
                link = self._new_link(channel, initiator=True, dial_address=address, keys=keys)
                try:
                    await link.run()
                finally:
                    self._forget(link)
                # A refused handshake counts as a failure too: a replayed or spoofed
                # announcement must not be dialled forever.
                linked = link.session is not None
                turn = 0 if link.remote is not None else turn + 1
                if self._loop.time() - started > HEALTHY_AFTER:
                    backoff = MIN_BACKOFF
            failures = 0 if linked else failures + 1
            if not persistent and failures >= DISCOVERED_MAX_FAILURES:
                log.info(
                    "forgetting discovered address %s after %d failed attempts", address, failures
                )
                self._budget.quarantine(address, self._loop.time())
                return
            # Full jitter spreads reconnect storms when many peers lose the same network.
            wake = self._wake[address]
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), random.uniform(0, backoff))
            backoff = min(backoff * 2, self._cfg.reconnect_max)
