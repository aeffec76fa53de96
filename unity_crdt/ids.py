"""Value types for document names, device ids and peer addresses (stdlib only)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigError

MAX_DOC_ID_BYTES = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DEVICE_ID = re.compile(r"^[a-z2-7]{26}$")


def check_doc_id(name: object) -> str:
    """Return `name` if it is a valid document name (1-255 UTF-8 bytes, no control chars)."""
    if not isinstance(name, str):
        raise ConfigError(f"document name must be str, not {type(name).__name__}")
    if name in _VALID:  # every message names a doc: check each name once, not each time
        return name
    _check(name)
    if len(_VALID) >= _VALID_MAX:
        _VALID.clear()
    _VALID.add(name)
    return name


_VALID: set[str] = set()
_VALID_MAX = 100_000


def _check(name: str) -> None:
    size = len(name.encode("utf-8", "surrogatepass"))
    if not 0 < size <= MAX_DOC_ID_BYTES:
        raise ConfigError(f"document name must be 1-{MAX_DOC_ID_BYTES} UTF-8 bytes, got {size}")
    if _CONTROL.search(name):
        raise ConfigError("document name must not contain control characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError("document name must be valid Unicode (no lone surrogates)") from exc


def is_device_id(value: str) -> bool:
    """Whether `value` looks like a device id (26 lower-case base32 characters)."""
    return bool(_DEVICE_ID.match(value))


_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]{0,31}$")


def check_scheme(scheme: object) -> str:
    """Return `scheme` if it is a valid lower-case URL scheme such as "ws"."""
    if not isinstance(scheme, str) or not _SCHEME.match(scheme):
        raise ConfigError(f"invalid URL scheme {scheme!r}")
    return scheme


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """Where a peer listens, as a value: scheme (which transport), host and port.

    `ws://127.0.0.1:9001` is the websocket transport; other schemes name transports registered
    with `unity_crdt.net.channel.register_transport`.
    """

    host: str
    port: int
    scheme: str = "ws"

    @classmethod
    def parse(cls, url: str) -> PeerAddress:
        """Parse and validate a scheme://host:port URL (any path is ignored)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"invalid peer URL {url!r}: {exc}") from exc
        if not _SCHEME.match(parts.scheme) or not parts.hostname or port is None:
            raise ConfigError(f"peer URL must look like ws://host:port, got {url!r}")
        if not 0 < port < 65536:
            raise ConfigError(f"peer URL port out of range: {url!r}")
        return cls(parts.hostname, port, parts.scheme)

    @property
    def url(self) -> str:
        """The URL form, with IPv6 hosts bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]{0,31})://(\[[0-9a-f:.]+\]|[^/:?#@\[\]\s]*)(?::(\d{1,5}))?")


def parse_origin(value: str) -> tuple[str, str, int | None]:
    """Split an HTTP Origin or an allowlist entry `scheme://host[:port]` (lower-cased)."""
    m = _ORIGIN.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    if m is None or (m[3] is not None and not 0 < int(m[3]) < 65536):
        raise ConfigError(f"an origin looks like scheme://host[:port], got {value!r}")
    return m[1], m[2], None if m[3] is None else int(m[3])
