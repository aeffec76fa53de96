"""NodeConfig: every knob of a node in one frozen, validated value (stdlib only)."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .ids import PeerAddress, check_doc_id, check_scheme, parse_origin

DEFAULT_YJS_ORIGINS = (
    "file://",
    "app://",
    "http://localhost",
    "http://127.0.0.1",
    "http://[::1]",
)


def _check_origin_entry(entry: object) -> None:
    if entry == "null":
        return
    if not isinstance(entry, str):
        raise ConfigError(f"yjs_origins: {entry!r} is not a string")
    scheme, host, _ = parse_origin(entry)
    if not host and scheme not in ("file", "app"):
        raise ConfigError(f"yjs_origins: {entry!r} names no host (only file:// and app:// may)")


Embedder = Callable[[list[str]], list[list[float]] | Awaitable[list[list[float]]]]
"""An app's embedding function, sync or async: texts in, one vector per text out."""


@dataclass(frozen=True)
class NodeConfig:
    """Configuration of one Node. Secrets are excluded from the repr."""

    name: str
    cache_dir: str | Path
    group_secret: str | bytes = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 0
    transport: str = "ws"  # the URL scheme this node listens with (net.channel transports)
    peers: tuple[str, ...] = ()
    mdns: bool = True
    # Loopback by default: never multicast on an interface the user did not choose.
    mdns_interfaces: tuple[str, ...] = ("127.0.0.1",)
    mdns_requery_interval: float = 30.0
    # Networks (CIDR) where announced peers may be dialled; empty: the subnets of the
    # mDNS interfaces. Loopback only when discovery itself runs on loopback.
    mdns_allow: tuple[str, ...] = ()
    # Where checkpoints go, by URL scheme: "weaviate://host:8080?grpc=50051", "dir:///path"
    # (unity_crdt.checkpoint.sinks); a tuple of URLs names the servers of one cluster.
    # `weaviate_url` ("http://host:8080") is an alias.
    checkpoint_url: str | tuple[str, ...] | None = None
    weaviate_url: str | tuple[str, ...] | None = None
    weaviate_grpc_port: int = 50051
    weaviate_api_key: str | None = field(default=None, repr=False)
    checkpoint_interval: float = 30.0
    pull_interval: float | None = 60.0
    restore_on_start: bool = False
    searchable: tuple[str, ...] = ()
    # Gives passages of searchable docs vectors, for search by meaning (sync or async).
    embedder: Embedder | None = field(default=None, repr=False, compare=False)
    anti_entropy_interval: float = 30.0
    ping_interval: float = 10.0
    idle_timeout: float = 30.0
    handshake_timeout: float = 5.0
    max_handshakes: int = 64
    max_handshakes_per_ip: int = 8
    # /24 (IPv4) or /64 (IPv6); addresses that authenticated before are exempt.
    max_handshakes_per_subnet: int = 16
    # A socket that sends no handshake message this long is cut (silent sockets hold slots).
    first_message_timeout: float = 1.0
    reconnect_max: float = 30.0
    send_queue_bytes: int = 8 * 2**20
    # The largest doc a peer may send in one reply, and how many new docs one peer may make
    # this node create: a burst, refilled per second (docs over it re-sync later).
    max_doc_bytes: int = 256 * 2**20
    new_docs_burst: int = 50_000
    new_docs_rate: float = 1000.0
    presence_timeout: float = 30.0
    yjs_endpoint: bool = False
    yjs_host: str = "127.0.0.1"
    yjs_port: int = 0
    yjs_token: str | None = field(default=None, repr=False)
    # Browser Origins the y-websocket endpoint accepts: "scheme://host[:port]" (no port: any),
    # "file://" and "app://" (any page of that scheme: Electron), "null" (opaque origins).
    # Requests without an Origin (Node.js, native apps) are allowed; the token is still needed.
    yjs_origins: tuple[str, ...] = DEFAULT_YJS_ORIGINS
    # The cloud channel: NATS JetStream server URL(s) ("nats://h:4222", "tls://...", a tuple or
    # comma-separated list for a cluster); None keeps the node LAN-only. Credentials are
    # "user:password", a token, or the path of a .creds file.
    relay_url: tuple[str, ...] | str | None = None
    relay_credentials: str | None = field(default=None, repr=False)
    relay_deltas: bool = True  # False: only commit notices travel through the relay
    relay_max_age: float = 7 * 86400.0  # how long the group's stream keeps sealed deltas
    relay_max_bytes: int = 2**30  # ... and at most this many bytes of them
    # Strict collective work (claims and leases by compare-and-set on NATS JetStream key-value):
    # server URL(s) like relay_url. None: the relay's URL when that is NATS; "off": LAN mode
    # (claims in CRDT docs) even with a NATS relay. Credentials default to the relay's when
    # the URL is the relay's.
    coordination_url: tuple[str, ...] | str | None = None
    coordination_credentials: str | None = field(default=None, repr=False)
    # Seconds between a busy node's heartbeats in `_work/beats`; a LAN claim or lease whose
    # holder is silent for its lease time is free again (leases must be >= 3 heartbeats).
    work_heartbeat: float = 1.0

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or not 0 < len(self.name.encode()) <= 64
            or not self.name.isprintable()
        ):
            raise ConfigError("name must be 1-64 UTF-8 bytes of printable characters")
        if not self.group_secret:
            raise ConfigError("group_secret is required (generate one with `unity-crdt keygen`)")
        if not 0 <= self.port < 65536 or not 0 <= self.yjs_port < 65536:
            raise ConfigError(f"port out of range: {self.port}")
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "peers", tuple(self.peers))
        object.__setattr__(self, "searchable", tuple(self.searchable))
        object.__setattr__(self, "mdns_interfaces", tuple(self.mdns_interfaces))
        object.__setattr__(self, "mdns_allow", tuple(self.mdns_allow))
        object.__setattr__(self, "yjs_origins", tuple(self.yjs_origins))
        for entry in self.yjs_origins:
            _check_origin_entry(entry)
        for net in self.mdns_allow:
            try:
                ipaddress.ip_network(net, strict=False)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"mdns_allow: {net!r} is not a network like 10.0.0.0/24"
                ) from None
        for url in self.peers:
            PeerAddress.parse(url)
        check_scheme(self.transport)
        for knob in ("checkpoint_url", "weaviate_url"):
            value = getattr(self, knob)
            if value is not None and not isinstance(value, str):
                urls = tuple(value)
                if not urls or not all(isinstance(u, str) and u for u in urls):
                    raise ConfigError(f"{knob} must be a URL or a non-empty list of URLs")
                object.__setattr__(self, knob, urls[0] if len(urls) == 1 else urls)
        if self.embedder is not None and not callable(self.embedder):
            raise ConfigError("embedder must be a callable: list[str] -> list[list[float]]")
        if self.weaviate_url is not None:
            if self.checkpoint_url is None:
                object.__setattr__(self, "checkpoint_url", self.weaviate_url)
            elif self.checkpoint_url != self.weaviate_url:
                raise ConfigError("set checkpoint_url or its alias weaviate_url, not both")
        for doc in self.searchable:
            check_doc_id(doc)
        for knob in (
            "checkpoint_interval",
            "anti_entropy_interval",
            "ping_interval",
            "idle_timeout",
            "handshake_timeout",
            "reconnect_max",
            "mdns_requery_interval",
            "presence_timeout",
            "first_message_timeout",
        ):
            if getattr(self, knob) <= 0:
                raise ConfigError(f"{knob} must be > 0")
        if self.pull_interval is not None and self.pull_interval <= 0:
            raise ConfigError("pull_interval must be > 0 or None")
        if min(self.max_handshakes, self.max_handshakes_per_ip, self.max_handshakes_per_subnet) < 1:
            raise ConfigError("handshake limits must be >= 1")
        object.__setattr__(self, "relay_url", _relay_urls(self.relay_url))
        if self.coordination_url != "off":
            object.__setattr__(self, "coordination_url", _relay_urls(self.coordination_url))
        if self.work_heartbeat <= 0:
            raise ConfigError("work_heartbeat must be > 0")
        if self.relay_max_age <= 0 or self.relay_max_bytes <= 0:
            raise ConfigError("relay_max_age and relay_max_bytes must be > 0")
        if self.idle_timeout <= self.ping_interval:
            raise ConfigError("idle_timeout must be longer than ping_interval")

    @property
    def coordination_urls(self) -> tuple[str, ...]:
        """Where strict claims and leases go: coordination_url, else a NATS relay_url; () = LAN."""
        if self.coordination_url == "off":
            return ()
        if self.coordination_url:
            return tuple(self.coordination_url)
        relay = tuple(self.relay_url or ())
        return relay if relay and all(u.split(":", 1)[0] in ("nats", "tls") for u in relay) else ()

    @property
    def coordination_credentials_effective(self) -> str | None:
        """The credentials for coordination_urls (the relay's when those are the relay's)."""
        if self.coordination_credentials is not None:
            return self.coordination_credentials
        return (
            self.relay_credentials
            if self.coordination_urls == tuple(self.relay_url or ())
            else None
        )

    @property
    def cache_path(self) -> Path:
        """cache_dir as a Path."""
        return Path(self.cache_dir)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> NodeConfig:
        """Build from a dict (TOML table, env), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        values = dict(data)
        for key in ("peers", "searchable", "mdns_interfaces", "mdns_allow", "yjs_origins"):
            if key in values:
                values[key] = tuple(values[key])
        for key in ("relay_url", "coordination_url"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        for key in ("checkpoint_url", "weaviate_url"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_toml(cls, path: str | Path) -> NodeConfig:
        """Read a TOML file; the table `[node]` or the top level holds the keys."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        return cls.from_mapping(data.get("node", data))

    @classmethod
    def from_env(cls, prefix: str = "UNITY_CRDT_", **overrides: Any) -> NodeConfig:
        """Read UNITY_CRDT_<KEY> variables (comma-separated lists), then apply overrides."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(prefix + f.name.upper())
            if raw is None:
                continue
            kind = str(f.type)
            if f.name == "embedder":
                continue  # a callable: only from code
            if "tuple" in kind:
                values[f.name] = tuple(x for x in raw.split(",") if x)
            elif "bool" in kind:
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif "float" in kind:
                values[f.name] = float(raw)
            elif "int" in kind:
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        values.update(overrides)
        return cls.from_mapping(values)


RELAY_SCHEMES = ("nats", "tls", "ws", "wss")


def _relay_urls(value: object) -> tuple[str, ...] | None:
    """relay_url as a tuple of validated URLs (a comma-separated string is split), or None."""
    if value is None:
        return None
    urls = tuple(u.strip() for u in value.split(",")) if isinstance(value, str) else value
    if not isinstance(urls, tuple) or not urls or not all(isinstance(u, str) for u in urls):
        raise ConfigError("relay_url must be a URL, a comma-separated list or a tuple of URLs")
    for url in urls:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ConfigError(f"invalid relay URL {url!r}: {exc}") from None
        if parts.scheme not in RELAY_SCHEMES or not parts.hostname:
            raise ConfigError(
                f"relay URL must look like nats://host:4222 ({', '.join(RELAY_SCHEMES)}), "
                f"got {url!r}"
            )
    return urls
