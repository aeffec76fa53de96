"""Admission policy of inbound handshakes and the summary of failed ones (no I/O, no clock).

Handshake slots are few (`max_handshakes`) and a silent socket holds one until it is cut, so
who gets a slot matters more than how many there are:

- per address (`max_handshakes_per_ip`) and per subnet (`max_handshakes_per_subnet`; /24 for
  IPv4, /64 for IPv6: what one attacker on a LAN can easily hold), so a handful of addresses
  cannot take every slot;
- addresses that completed a handshake before (remembered, bounded) skip the subnet cap, and
  when every slot is taken they take the slot of the oldest handshake from an address never
  seen to authenticate, so known members get in during a flood of strangers.

Failed handshakes are logged once per source per window, with a count of the rest, so a flood
costs a few log lines instead of one per attempt. Addresses learnt from mDNS are dialled only
inside the allowed networks (`allowed_networks`, `permitted`) and within a budget (`DialBudget`).
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = [
    "DialBudget",
    "FailureLog",
    "HandshakeSlots",
    "Network",
    "allowed_networks",
    "permitted",
    "subnet_of",
]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks(
    interfaces: Sequence[str], allow: Sequence[str] | None, prefixes: Sequence[tuple[str, int]]
) -> list[Network]:
    """Where announced peers may be dialled: `allow`, or else the subnets of `interfaces`.

    `prefixes` lists (address, prefix length) of the host's interfaces; an interface address
    not found there stands for itself alone.
    """
    try:
        if allow:
            return [ipaddress.ip_network(net, strict=False) for net in allow]
        known = dict(prefixes)
        out: list[Network] = []
        for ip in interfaces:
            width = known.get(ip, ipaddress.ip_address(ip).max_prefixlen)
            out.append(ipaddress.ip_network(f"{ip}/{width}", strict=False))
        return out
    except ValueError as exc:
        raise ConfigError(f"not a network: {exc}") from None


def permitted(address: str, networks: Sequence[Network], loopback_ok: bool) -> bool:
    """Whether an announced address may be dialled: inside `networks`, never loopback unless
    discovery itself runs on loopback (a replayed record must not reach local services)."""
    ip = ipaddress.ip_address(address)
    if ip.is_loopback and not loopback_ok:
        return False
    return any(ip in net for net in networks)


def subnet_of(host: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) holding `host`; a non-IP host is its own subnet."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class HandshakeSlots:
    """Concurrent inbound handshakes: who may start one, and whose slot a known peer takes."""

    def __init__(self, total: int, per_ip: int, per_subnet: int, *, remember: int = 1024) -> None:
        self.total, self.per_ip, self.per_subnet = total, per_ip, per_subnet
        self._remember = remember
        self._holders: OrderedDict[int, str] = OrderedDict()  # slot -> ip, oldest first
        self._ips: Counter[str] = Counter()
        self._subnets: Counter[str] = Counter()
        self._known: OrderedDict[str, None] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._holders)

    def known(self, ip: str) -> bool:
        """Whether `ip` completed a handshake with this node before (and is still remembered)."""
        return ip in self._known

    def remember(self, ip: str) -> None:
        """Record that `ip` authenticated: it is preferred from now on."""
        self._known[ip] = None
        self._known.move_to_end(ip)
        while len(self._known) > self._remember:
            self._known.popitem(last=False)

    def admit(self, ip: str) -> tuple[int | None, int | None]:
        """-> (slot, or None if refused; the slot taken from a stranger to make room, if any)."""
        known = ip in self._known
        subnet = subnet_of(ip)
        if self._ips[ip] >= self.per_ip:
            return None, None
        if not known and self._subnets[subnet] >= self.per_subnet:
            return None, None
        evicted = None
        if len(self._holders) >= self.total:
            if not known:
                return None, None
            evicted = next((s for s, who in self._holders.items() if who not in self._known), None)
            if evicted is None:
                return None, None
            self.release(evicted)
        slot = self._next
        self._next += 1
        self._holders[slot] = ip
        self._ips[ip] += 1
        self._subnets[subnet] += 1
        return slot, evicted

    def release(self, slot: int) -> None:
        """Free a slot (idempotent: an evicted slot is already free)."""
        ip = self._holders.pop(slot, None)
        if ip is None:
            return
        subnet = subnet_of(ip)
        for counter, key in ((self._ips, ip), (self._subnets, subnet)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]


@dataclass
class _Window:
    start: float
    suppressed: int = 0
    last: str = ""


class FailureLog:
    """One line per source per `window` seconds for failed handshakes; the rest are counted.

    A source is a label such as "from 10.0.0.9" (handshakes it started) or "to 10.0.0.9" (ours
    it refused), so one kind never hides the other. `note` returns the line to log now (the
    first failure of a window) or None; `flush` returns one summary line per source whose
    window ended with failures left unsaid. Past `max_sources` tracked sources, the others
    share one entry.
    """

    OTHERS = "from or to other addresses"

    def __init__(self, window: float = 60.0, max_sources: int = 256) -> None:
        self.window = window
        self._max = max_sources
        self._sources: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def note(self, source: str, reason: str, now: float) -> str | None:
        """Count one failure; return a line to log now, or None when it is summarised later."""
        if source not in self._sources and len(self._sources) >= self._max:
            source = self.OTHERS
        entry = self._sources.get(source)
        if entry is not None and now - entry.start < self.window:
            entry.suppressed += 1
            entry.last = reason
            return None
        self._sources[source] = _Window(now)
        self._sources.move_to_end(source)
        return f"{reason} ({source}; more like it are summarised every {self.window:g} s)"

    def flush(self, now: float, *, everything: bool = False) -> list[str]:
        """Summaries of windows that ended (all of them if `everything`); they are forgotten."""
        out = []
        for source, entry in list(self._sources.items()):
            if everything or now - entry.start >= self.window:
                del self._sources[source]
                if entry.suppressed:
                    span = now - entry.start
                    out.append(
                        f"{entry.suppressed} more failed handshake(s) {source} in the last "
                        f"{span:.0f} s (last: {entry.last})"
                    )
        return out


class DialBudget:
    """How often addresses learnt from mDNS are dialled (static peers are not limited).

    A replayed announcement can point at any host and port, and re-announcing it must not
    buy more attempts: an address that failed `max_failures` dials in a row is quarantined
    for `quarantine` seconds (re-announcements are ignored meanwhile), at most `max_dialers`
    discovered addresses are dialled at once, and their attempts share one token bucket
    (`burst`, then `rate` per second).
    """

    def __init__(
        self,
        *,
        max_dialers: int = 64,
        rate: float = 4.0,
        burst: int = 16,
        quarantine: float = 600.0,
        remember: int = 1024,
    ) -> None:
        self.max_dialers = max_dialers
        self.rate, self.burst = rate, burst
        self.quarantine_for = quarantine
        self._remember = remember
        self._quarantined: OrderedDict[object, float] = OrderedDict()  # address -> until
        self._tokens = float(burst)
        self._at: float | None = None

    def may_dial(self, address: object, dialers: int, now: float) -> bool:
        """Whether a newly discovered address gets a dialer (`dialers` running already)."""
        until = self._quarantined.get(address)
        if until is not None:
            if now < until:
                return False
            del self._quarantined[address]
        return dialers < self.max_dialers

    def quarantine(self, address: object, now: float) -> None:
        """Ignore `address` for a while: it failed every attempt it was given."""
        self._quarantined[address] = now + self.quarantine_for
        self._quarantined.move_to_end(address)
        while len(self._quarantined) > self._remember:
            self._quarantined.popitem(last=False)

    def take(self, now: float) -> float:
        """Take one attempt: 0.0 if granted, else the seconds to wait before asking again."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate
