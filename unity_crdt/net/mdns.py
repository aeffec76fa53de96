"""LAN discovery over mDNS: announce this node and report peers of the same group.

The only module importing zeroconf. A node announces `_unity-crdt._tcp.local.` under a random
instance name with a TXT record of exactly `v=1` and `g=<beacon>`: the group's keyed beacon of
the current 15-minute window (re-announced at the first re-query after the window turns; the
windows either side are accepted), so nothing on the LAN learns names, device ids or documents,
nor recognises a group from one window to the next. Services of other groups, malformed
records and floods are dropped silently with bounded memory. Candidates are only hints: the
handshake decides who is a peer. An announced address is reported only inside the allowed
networks (`allow`, by default the subnets of the mDNS interfaces) and never on loopback unless
discovery runs on loopback, so a replayed record cannot point the node at any host or local
service; the mesh bounds how often the addresses it does report are dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ifaddr
from zeroconf import DNSQuestionType, IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..errors import ConfigError
from ._admission import allowed_networks, permitted

__all__ = ["SERVICE_TYPE", "Discovery", "Found"]

SERVICE_TYPE = "_unity-crdt._tcp.local."
# The version of this TXT record's layout (not of the sync protocol, which HELLO carries).
TXT_VERSION = "1"

log = logging.getLogger(__name__)

# Records live 2 min (not zeroconf's 75 min for PTR/TXT) so a peer that vanished without a
# goodbye stops being re-reported soon; the browser refreshes live ones before they expire.
_RECORD_TTL = 120
_RESOLVE_TIMEOUT_MS = 3000
_MAX_PENDING_RESOLVES = 64
_MAX_TXT_BYTES = 256  # our TXT is ~30 bytes; anything near a packet's size is an attack
_MAX_TXT_KEYS = 8
_MAX_ADDRESSES = 4  # per service; more is a flood vector, not a real host
_REPORT_INTERVAL = 5.0  # seconds between two reports of the same url (refresh() resets)
_BUCKET_SIZE = 64  # on_found burst; then _BUCKET_RATE per second
_BUCKET_RATE = 16.0


BeaconSchedule = Callable[[float], tuple[str, frozenset[str]]]
"""Wall-clock time -> (the beacon to announce, the beacons to accept); see GroupKeys.beacons."""


@dataclass(frozen=True)
class Found:
    """A candidate peer seen on the LAN, e.g. url "ws://10.77.0.2:9001"."""

    url: str
    host: str
    port: int


def _ip_list(values: Sequence[str], what: str) -> list[str]:
    """Validate a list of literal IP addresses (never an interface choice like 'all')."""
    if isinstance(values, str):
        raise ConfigError(f"{what} must be a sequence of IP addresses, not a string")
    out: list[str] = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_address(value)))
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: {value!r} is not an IP address") from None
    if not out:
        raise ConfigError(f"{what} must not be empty")
    return out


def _dialable(address: str) -> bool:
    """Whether an advertised address could be a peer (not 0.0.0.0, multicast or broadcast)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_multicast or address == "255.255.255.255")


def _host_prefixes() -> list[tuple[str, int]]:
    """(address, prefix length) of every interface of this host, from ifaddr."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            out.append((address, int(ip.network_prefix)))
    return out


def _parse_txt(text: bytes) -> dict[bytes, bytes] | None:
    """Strict TXT parse: small, ASCII `key=value` entries, no duplicates, no truncation."""
    if len(text) > _MAX_TXT_BYTES:
        return None
    props: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(text):
        end = pos + 1 + text[pos]
        entry = text[pos + 1 : end]
        if end > len(text) or not entry.isascii() or len(props) >= _MAX_TXT_KEYS:
            return None
        key, sep, value = entry.partition(b"=")
        if not key or not sep or key in props:
            return None
        props[key] = value
        pos = end
    return props


class Discovery:
    """Announces this node on the given interfaces and reports same-group candidates.

    on_found runs on the event loop and may repeat a candidate: at most once per url per 5 s,
    again after refresh() and on each periodic re-query, so the node must treat it as a hint
    (skip urls it is already linked to). Reports are paced by a token bucket (64, then 16/s).
    """

    def __init__(
        self,
        *,
        beacon: str | BeaconSchedule,
        port: int,
        on_found: Callable[[Found], None],
        interfaces: Sequence[str] = ("127.0.0.1",),
        instance: str | None = None,
        advertise_addresses: Sequence[str] | None = None,
        requery_interval: float = 30.0,
        max_candidates: int = 1024,
        allow: Sequence[str] | None = None,
    ) -> None:
        if isinstance(beacon, str):
            fixed = beacon
            self._schedule: BeaconSchedule = lambda now: (fixed, frozenset((fixed,)))
        else:
            self._schedule = beacon
        current = self._schedule(time.time())[0]
        if not current or len(current) > 64 or not current.isascii() or not current.isprintable():
            raise ConfigError("beacon must be 1-64 printable ASCII characters")
        if not 1 <= port <= 65535:
            raise ConfigError(f"port must be in 1..65535, got {port}")
        if requery_interval <= 0:
            raise ConfigError("requery_interval must be positive")
        if max_candidates < 1:
            raise ConfigError("max_candidates must be at least 1")
        self._interfaces = _ip_list(interfaces, "interfaces")
        self._allowed = allowed_networks(self._interfaces, allow, _host_prefixes())
        self._loopback_ok = any(ipaddress.ip_address(i).is_loopback for i in self._interfaces)
        self._advertise = _ip_list(
            self._interfaces if advertise_addresses is None else advertise_addresses,
            "advertise_addresses",
        )
        self._instance = instance if instance is not None else secrets.token_hex(8)
        if not 1 <= len(self._instance) <= 63 or "." in self._instance:
            raise ConfigError("instance must be 1-63 characters without dots")
        self._beacon = current  # the one announced now
        self._port = port
        self._on_found = on_found
        self._requery_interval = requery_interval
        self._max_candidates = max_candidates
        self._ip_version = (
            IPVersion.V4Only
            if all(ipaddress.ip_address(a).version == 4 for a in self._interfaces)
            else IPVersion.All
        )
        self._aiozc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._broadcasts: set[asyncio.Future[Any]] = set()
        self._known: OrderedDict[str, tuple[Found, ...]] = OrderedDict()
        self._last_report: OrderedDict[str, float] = OrderedDict()
        self._due: OrderedDict[str, Found] = OrderedDict()
        self._drain_handle: asyncio.TimerHandle | None = None
        self._tokens = float(_BUCKET_SIZE)
        self._tokens_at = time.monotonic()
        self._closed = False
        self.dropped = 0  # records ignored (bad, foreign, over a bound); a figure for tests/logs

    @property
    def instance(self) -> str:
        """Our opaque mDNS instance label (random unless given)."""
        return self._instance

    @property
    def candidates(self) -> list[Found]:
        """Same-group candidates currently believed present (bounded by max_candidates)."""
        return [f for founds in self._known.values() for f in founds]

    def stats(self) -> dict[str, int]:
        """Sizes of the internal tables, to check that they stay bounded."""
        return {
            "known": len(self._known),
            "pending": len(self._pending),
            "due": len(self._due),
            "last_report": len(self._last_report),
            "dropped": self.dropped,
        }

    async def start(self) -> None:
        """Open zeroconf on the configured interfaces only, register our service, browse."""
        if self._aiozc is not None or self._closed:
            raise RuntimeError("Discovery.start() may be called once")
        try:
            aiozc = AsyncZeroconf(interfaces=list(self._interfaces), ip_version=self._ip_version)
        except OSError as exc:
            raise OSError(
                exc.errno, f"mDNS cannot open interfaces {self._interfaces}: {exc.strerror}"
            ) from exc
        self._aiozc = aiozc
        self._info = self._service_info()
        try:
            # Names are random per run, so skipping the ~1 s of conflict probing is safe.
            self._track(await aiozc.async_register_service(self._info, cooperating_responders=True))
            await self._restart_browser()
        except BaseException:
            await self.close()
            raise
        self._ticker = asyncio.create_task(self._requery_loop(), name="discovery-requery")

    def _service_info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self._instance}.{SERVICE_TYPE}",
            port=self._port,
            properties={"v": TXT_VERSION, "g": self._beacon},
            server=f"{self._instance}.local.",
            parsed_addresses=list(self._advertise),
            host_ttl=_RECORD_TTL,
            other_ttl=_RECORD_TTL,
        )

    async def _rotate(self) -> None:
        """Announce the beacon of the current window once it changed."""
        current = self._schedule(time.time())[0]
        if current == self._beacon or self._aiozc is None or self._closed:
            return
        self._beacon = current
        self._info = self._service_info()
        self._track(await self._aiozc.async_update_service(self._info))

    async def refresh(self) -> None:
        """Re-announce and re-query now, and let every candidate be reported again."""
        if self._aiozc is None or self._info is None or self._closed:
            return
        self._last_report.clear()
        try:
            self._track(await self._aiozc.async_update_service(self._info))
        except Exception as exc:  # a vanished interface must not break the node
            log.warning("mDNS re-announce failed: %s", type(exc).__name__)
        await self._restart_browser()

    async def close(self) -> None:
        """Send goodbyes, cancel every pending query and timer, and close zeroconf."""
        self._closed = True
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        tasks: list[asyncio.Future[Any]] = [*self._pending.values(), *self._broadcasts]
        if self._ticker is not None:
            tasks.append(self._ticker)
            self._ticker = None
        self._pending.clear()
        self._broadcasts.clear()
        for task in tasks:
            task.cancel()
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
            self._browser = None
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is not None:
            try:
                await aiozc.async_close()
            except Exception as exc:
                log.warning("closing mDNS failed: %s", type(exc).__name__)
        self._due.clear()

    # -- browsing -----------------------------------------------------------------------------

    def _track(self, fut: Any) -> None:
        """Keep zeroconf's announce futures so close() can cancel them."""
        if isinstance(fut, asyncio.Future):
            self._broadcasts.add(fut)
            fut.add_done_callback(self._broadcasts.discard)

    async def _restart_browser(self) -> None:
        """(Re)start the browser: a new one replays cached services and sends fresh queries."""
        old, self._browser = self._browser, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.async_cancel()
        if self._aiozc is None or self._closed:
            return
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf,
            [SERVICE_TYPE],
            handlers=[self._on_change],
            # Multicast answers (not unicast QU ones) so one node's query teaches every node.
            question_type=DNSQuestionType.QM,
        )

    async def _requery_loop(self) -> None:
        """The browser alone stops asking after ~14 s; keep asking so partitions heal."""
        while True:
            await asyncio.sleep(self._requery_interval)
            try:
                await self._rotate()
                await self._restart_browser()
            except Exception as exc:
                log.warning("mDNS re-query failed: %s", type(exc).__name__)

    def _on_change(
        self, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """Browser callback (event loop): never lets an exception reach zeroconf."""
        try:
            self._handle_change(zeroconf, name, state_change)
        except Exception:
            self.dropped += 1
            log.debug("ignored an mDNS record that broke parsing", exc_info=True)

    def _handle_change(self, zc: Any, name: str, state_change: ServiceStateChange) -> None:
        """Resolve added/updated services from the cache now, or by a bounded query task."""
        if self._closed or self._info is None:
            return
        key = name.lower()
        if key == self._info.key:
            return
        if state_change is ServiceStateChange.Removed:
            self._known.pop(key, None)
            return
        if len(name) > 255:
            self.dropped += 1
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if info.load_from_cache(zc):
            self._accept(key, info)
            return
        if key in self._pending:
            return  # one resolution per instance at a time
        if len(self._pending) >= min(_MAX_PENDING_RESOLVES, self._max_candidates):
            self.dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._resolve(key, info, zc))
        self._pending[key] = task

    async def _resolve(self, key: str, info: AsyncServiceInfo, zc: Any) -> None:
        """Ask the network for a service's records; a cancelled or failed query is dropped."""
        try:
            if await info.async_request(zc, _RESOLVE_TIMEOUT_MS):
                self._accept(key, info)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.dropped += 1
            log.debug("mDNS resolution failed", exc_info=True)
        finally:
            if self._pending.get(key) is asyncio.current_task():
                del self._pending[key]

    # -- validation and reporting -------------------------------------------------------------

    def _parse(self, info: AsyncServiceInfo) -> tuple[Found, ...] | None:
        """The candidates a service offers, or None when it is not one of ours."""
        props = _parse_txt(info.text or b"")
        if props is None or props.get(b"v") != TXT_VERSION.encode():
            return None
        beacon = props.get(b"g", b"").decode("ascii")  # _parse_txt admits ASCII only
        if beacon not in self._schedule(time.time())[1]:
            return None  # another group, a stranger, or a clock far off: never dialled
        port = info.port
        if not isinstance(port, int) or not 1 <= port <= 65535:
            return None
        out: list[Found] = []
        for host in info.parsed_addresses(self._ip_version)[:_MAX_ADDRESSES]:
            if _dialable(host) and permitted(host, self._allowed, self._loopback_ok):
                url_host = f"[{host}]" if ":" in host else host
                out.append(Found(url=f"ws://{url_host}:{port}", host=host, port=port))
        return tuple(out) or None

    def _accept(self, key: str, info: AsyncServiceInfo) -> None:
        """Record a valid candidate and queue its report; forget it if it turned invalid."""
        if self._closed:
            return
        founds = self._parse(info)
        if founds is None:
            self.dropped += 1
            self._known.pop(key, None)
            return
        self._known[key] = founds
        self._known.move_to_end(key)
        while len(self._known) > self._max_candidates:
            self._known.popitem(last=False)
        for found in founds:
            self._queue(found)

    def _queue(self, found: Found) -> None:
        """Queue a report unless the same url was reported within _REPORT_INTERVAL."""
        now = time.monotonic()
        last = self._last_report.get(found.url)
        if last is not None and now - last < _REPORT_INTERVAL:
            return
        if found.url in self._due:
            return
        self._due[found.url] = found
        while len(self._due) > self._max_candidates:
            self._due.popitem(last=False)
            self.dropped += 1
        if self._drain_handle is None:
            self._drain()

    def _drain(self) -> None:
        """Report queued candidates within the token bucket; reschedule for the rest."""
        self._drain_handle = None
        if self._closed:
            return
        now = time.monotonic()
        self._tokens = min(_BUCKET_SIZE, self._tokens + (now - self._tokens_at) * _BUCKET_RATE)
        self._tokens_at = now
        while self._due and self._tokens >= 1.0:
            url, found = self._due.popitem(last=False)
            self._tokens -= 1.0
            self._last_report[url] = now
            self._last_report.move_to_end(url)
            try:
                self._on_found(found)
            except Exception:
                log.warning("on_found callback raised", exc_info=True)
            if self._closed:
                return
        self._trim_reports(now)
        if self._due:
            delay = (1.0 - self._tokens) / _BUCKET_RATE
            self._drain_handle = asyncio.get_running_loop().call_later(delay, self._drain)

    def _trim_reports(self, now: float) -> None:
        """Bound the last-report table: oldest entries first (they are in report order)."""
        table = self._last_report
        while table and (
            len(table) > self._max_candidates
            or now - next(iter(table.values())) >= _REPORT_INTERVAL
        ):
            table.popitem(last=False)
