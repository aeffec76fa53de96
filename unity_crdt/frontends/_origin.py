"""Who may talk to a local HTTP endpoint from a browser: Origin and Host checks.

A web page the user visits can open a websocket to 127.0.0.1 (no same-origin policy applies to
websockets) and, by DNS rebinding, make its own host name resolve to 127.0.0.1 and read plain
HTTP answers. Browsers always send the page's `Origin` on a websocket and the name they
resolved in `Host`, so:

- the y-websocket endpoint accepts only the Origins its allowlist names (`OriginPolicy`), and,
  when it listens on loopback, only a loopback `Host` (`loopback_host`);
- the metrics port accepts only a `Host` that is `localhost`, an IP address, or a name the
  operator listed (`metrics_host`): a rebinding page always sends its own domain name.

Requests without an Origin (Node.js clients, native apps, curl) are not from a browser page;
they still need the endpoint's token.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from ..ids import parse_origin

__all__ = ["OriginPolicy", "host_name", "loopback_host", "metrics_host"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_ANY_OF_SCHEME = ("file", "app")  # entries "file://" and "app://": Electron pages


class OriginPolicy:
    """An Origin allowlist: entries `scheme://host[:port]`, `file://`, `app://`, `null`.

    An entry without a port matches any port of its scheme and host; `file://` and `app://`
    match every Origin of that scheme; the Origin `null` only if "null" is listed; a request
    without an Origin is allowed.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(entries)
        self._null = "null" in self.entries
        self._parsed = [parse_origin(e) for e in self.entries if e != "null"]

    def allows(self, origin: str | None) -> bool:
        """Whether a request carrying this Origin header value may proceed."""
        if origin is None:
            return True
        if origin.strip() == "null":
            return self._null
        try:
            scheme, host, port = parse_origin(origin)
        except ValueError:
            return False
        port = port if port is not None else _DEFAULT_PORTS.get(scheme)
        for e_scheme, e_host, e_port in self._parsed:
            if e_scheme != scheme:
                continue
            if e_scheme in _ANY_OF_SCHEME and not e_host:
                return True
            if e_host == host and (e_port is None or e_port == port):
                return True
        return False


def host_name(header: str | None) -> str | None:
    """The host part of a Host header, lower-cased, without port or IPv6 brackets."""
    if header is None:
        return None
    value = header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def loopback_host(header: str | None) -> bool:
    """Whether Host names this machine by a loopback name (no header: not a browser; yes)."""
    name = host_name(header)
    if name is None:
        return True
    ip = _ip(name)
    return name == "localhost" or (ip is not None and ip.is_loopback)


def metrics_host(header: str | None, names: Iterable[str] = ()) -> bool:
    """Whether Host is `localhost`, an IP address, or one of `names` (not a rebound domain)."""
    name = host_name(header)
    if name is None:
        return True
    return name == "localhost" or _ip(name) is not None or name in {n.lower() for n in names}
