"""`unity-crdt run`: assemble the NodeConfig, host a node and its control API, live output.

The node, its config and the control server are imported when the command runs, not when the
CLI starts. Output is a banner, then one line per peer joining or leaving and a sync summary
when it changes; the group secret is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CacheLockedError, ConfigError
from ._common import (
    PROG,
    SECRET_ENV,
    YJS_TOKEN_ENV,
    default_cache_dir,
    human_bytes,
    plural,
    read_toml,
    say,
    stamp,
)

if TYPE_CHECKING:
    from ..config import NodeConfig
    from ..frontends.control import ControlServer
    from ..node import Node

__all__ = ["configure", "node_config", "run", "token_file"]

PEER_POLL = 0.2


def configure(p: argparse.ArgumentParser) -> None:
    """The options of `run`."""
    p.add_argument("--config", metavar="FILE", help="TOML file of NodeConfig keys (flags win)")
    p.add_argument("--name", help="this device's name as peers see it (default: host name)")
    p.add_argument(
        "--cache-dir", metavar="DIR", help=f"local cache (default: {default_cache_dir()})"
    )
    p.add_argument("--secret", help=f"group secret (visible in `ps`: prefer ${SECRET_ENV})")
    p.add_argument("--secret-file", metavar="FILE", help="read the group secret from FILE")
    p.add_argument("--host", help="listen address (default 127.0.0.1; 0.0.0.0 for the LAN)")
    p.add_argument("--port", type=int, help="listen port (default: any free port)")
    p.add_argument("--peer", action="append", metavar="URL", help="ws://host:port to keep dialling")
    p.add_argument("--no-mdns", action="store_true", help="do not discover peers by mDNS")
    p.add_argument(
        "--mdns-interface",
        action="append",
        metavar="ADDR",
        help="interface address to announce and browse on (default 127.0.0.1)",
    )
    p.add_argument(
        "--checkpoint-url",
        metavar="URL",
        help="checkpoint sink: weaviate://host:port?grpc=PORT or dir:///path "
        "(a cluster: its servers' URLs, comma-separated)",
    )
    p.add_argument(
        "--weaviate-url",
        metavar="URL",
        help="checkpoint to this Weaviate server (a cluster: URLs comma-separated)",
    )
    p.add_argument("--weaviate-grpc-port", type=int, metavar="PORT")
    p.add_argument("--checkpoint-interval", type=float, metavar="SECONDS")
    p.add_argument(
        "--relay",
        action="append",
        metavar="URL",
        help="NATS JetStream server of the group's cloud channel (repeat for a cluster)",
    )
    p.add_argument(
        "--relay-credentials",
        metavar="CREDS",
        help="a .creds file (or user:password; prefer $UNITY_CRDT_RELAY_CREDENTIALS)",
    )
    p.add_argument(
        "--coordination",
        action="append",
        metavar="URL",
        help="NATS server(s) for strict task claims and leases (default: a NATS --relay; "
        "'off': LAN mode)",
    )
    p.add_argument(
        "--restore-on-start",
        action="store_true",
        default=None,
        help="merge the group's checkpoints when the node starts",
    )
    p.add_argument(
        "--searchable",
        action="append",
        metavar="DOC",
        help="index this doc's text for `unity-crdt search`",
    )
    p.add_argument(
        "--yjs",
        action="store_true",
        default=None,
        help="serve a y-websocket endpoint on loopback for JS front ends",
    )
    p.add_argument("--yjs-port", type=int, metavar="PORT")
    p.add_argument(
        "--yjs-token-file",
        metavar="FILE",
        help=f"read the y-websocket token from FILE (0600), made if missing "
        f"(default: ${YJS_TOKEN_ENV}, yjs_token in --config, else <cache-dir>/yjs.token)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus /metrics on this TCP port (0: any free port)",
    )
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR")
    p.add_argument(
        "--metrics-doc-names",
        action="store_true",
        help="publish one series per doc name (default: totals only)",
    )
    p.add_argument("--metrics-no-doc-names", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--metrics-allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name scrapers use in Host (localhost and IP addresses always work)",
    )
    p.add_argument(
        "--status-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="at most one sync summary line this often (0: never)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def _secret(args: argparse.Namespace, from_file: Any) -> Any:
    if args.secret_file:
        try:
            return Path(args.secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the secret file {args.secret_file}: {exc.strerror}"
            ) from None
    if args.secret:
        print(
            f"{PROG}: warning: --secret is visible to other users in `ps`; prefer "
            f"${SECRET_ENV} or --secret-file",
            file=sys.stderr,
        )
        return args.secret
    return os.environ.get(SECRET_ENV) or from_file


def token_file(path: Path) -> str:
    """The token in `path` (refused if others may read it), or a new one written there 0600."""
    try:
        if path.exists():
            if path.stat().st_mode & 0o077:
                raise ConfigError(f"{path} may be read by other users: chmod 600 {path}")
            token = path.read_text(encoding="utf-8").strip()
            if len(token) < 16:
                raise ConfigError(f"the token in {path} must be at least 16 characters")
            return token
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        return token
    except OSError as exc:
        raise ConfigError(f"cannot use the token file {path}: {exc.strerror}") from None


def _yjs_token(args: argparse.Namespace, values: dict[str, Any]) -> tuple[str, str]:
    """(token, where it comes from): --yjs-token-file, the environment, the config, a file."""
    if args.yjs_token_file:
        return token_file(Path(args.yjs_token_file)), f"in {args.yjs_token_file}"
    if os.environ.get(YJS_TOKEN_ENV):
        return os.environ[YJS_TOKEN_ENV], f"from ${YJS_TOKEN_ENV}"
    if values.get("yjs_token"):
        return str(values["yjs_token"]), "from yjs_token in your config"
    path = Path(values["cache_dir"]) / "yjs.token"
    return token_file(path), f"in {path}"


def _urls(raw: str | None) -> str | tuple[str, ...] | None:
    """One URL, or the comma-separated URLs of a cluster's servers."""
    if raw is None or "," not in raw:
        return raw
    return tuple(u.strip() for u in raw.split(",") if u.strip())


def _shown(urls: str | tuple[str, ...] | None) -> str:
    return urls if isinstance(urls, str) else ", ".join(urls or ())


def node_config(args: argparse.Namespace) -> NodeConfig:
    """The NodeConfig of `run`: the --config file, then the environment, then flags on top."""
    from ..config import NodeConfig

    values = read_toml(args.config) if args.config else {}
    flags = {
        "name": args.name,
        "cache_dir": args.cache_dir,
        "host": args.host,
        "port": args.port,
        "peers": args.peer,
        "mdns_interfaces": args.mdns_interface,
        "checkpoint_url": _urls(args.checkpoint_url),
        "weaviate_url": _urls(args.weaviate_url),
        "weaviate_grpc_port": args.weaviate_grpc_port,
        "checkpoint_interval": args.checkpoint_interval,
        "restore_on_start": args.restore_on_start,
        "searchable": args.searchable,
        "yjs_endpoint": args.yjs,
        "yjs_port": args.yjs_port,
        "relay_url": tuple(args.relay) if args.relay else None,
        "relay_credentials": args.relay_credentials,
        "coordination_url": ("off" if args.coordination == ["off"] else tuple(args.coordination))
        if args.coordination
        else None,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.no_mdns:
        values["mdns"] = False
    if os.environ.get("UNITY_CRDT_RELAY_CREDENTIALS") and not args.relay_credentials:
        values["relay_credentials"] = os.environ["UNITY_CRDT_RELAY_CREDENTIALS"]
    if os.environ.get("UNITY_CRDT_WEAVIATE_API_KEY"):
        values["weaviate_api_key"] = os.environ["UNITY_CRDT_WEAVIATE_API_KEY"]
    values["group_secret"] = _secret(args, values.get("group_secret"))
    if not values["group_secret"]:
        raise ConfigError(
            f"no group secret: set ${SECRET_ENV}, pass --secret-file FILE or put "
            f"group_secret in the config file (make one with `{PROG} keygen`)"
        )
    values.setdefault("name", socket.gethostname()[:64] or "node")
    values.setdefault("cache_dir", str(default_cache_dir()))
    if values.get("yjs_endpoint"):
        # Never printed: front ends read it from the file (or the environment it came from).
        values["yjs_token"], args.yjs_token_where = _yjs_token(args, values)
    return NodeConfig.from_mapping(values)


def _banner(node: Node, control: ControlServer, args: argparse.Namespace) -> None:
    cfg = node.config
    cache = cfg.cache_path
    lines = [
        f'{PROG}: node "{cfg.name}" is running (device {node.device_id[:8]})',
        f"  listening   {node.url}",
        f"  cache       {cache}",
        f"  control     {control.path}  (try: {PROG} status --cache-dir {cache})",
        "  discovery   "
        + (f"mDNS on {', '.join(cfg.mdns_interfaces)}" if cfg.mdns else "off")
        + (f"; static peers {' '.join(cfg.peers)}" if cfg.peers else ""),
        "  checkpoints "
        + (
            f"{_shown(cfg.weaviate_url)} every {cfg.checkpoint_interval:g} s"
            if cfg.weaviate_url
            else "off (--weaviate-url to turn on)"
        ),
    ]
    relay = node.status().relay
    lines.append(
        "  relay       "
        + (f"{relay.url} (connecting in the background)" if relay else "off (--relay to turn on)")
    )
    work = node.status().work
    if work is not None and work.coordination_url:
        lines.append(f"  work        strict via {work.coordination_url} (connecting)")
    if cfg.yjs_endpoint:
        yjs = node.ywebsocket
        where = getattr(args, "yjs_token_where", "from yjs_token")
        lines.append(f"  yjs         {yjs.base_url + '/<doc>'}?token=...  (token {where})")
    if control.metrics_url:
        lines.append(f"  metrics     {control.metrics_url}")
    lines.append("Ctrl-C to stop.")
    say("\n".join(lines))


def _summary(node: Node) -> str:
    st = node.status()
    synced = sum(d.peers_synced for d in st.docs)
    pending = sum(p.pending for p in st.peers)
    pairs = len(st.docs) * len(st.peers)
    return (
        f"sync: {plural(len(st.docs), 'doc')}, {plural(len(st.peers), 'peer')}, "
        f"synced {synced}/{pairs}, pending {human_bytes(pending)}"
    )


async def _report(node: Node, interval: float) -> None:
    """Print peers joining and leaving as they do, and the sync summary when it changes."""
    known: dict[str, Any] = {}
    last_line, last_at = "", float("-inf")
    while True:
        now = {p.device_id: p for p in node.peers}
        for dev, p in now.items():
            if dev not in known:
                say(f"{stamp()} peer joined: {p.name} ({dev[:8]}) {p.url}")
        for dev, p in known.items():
            if dev not in now:
                say(f"{stamp()} peer left: {p.name} ({dev[:8]})")
        known = now
        if interval > 0 and time.monotonic() - last_at >= interval:
            line = _summary(node)
            if line != last_line:
                say(f"{stamp()} {line}")
                last_line, last_at = line, time.monotonic()
        await asyncio.sleep(PEER_POLL)


async def _serve(cfg: NodeConfig, args: argparse.Namespace) -> int:
    from ..frontends.control import ControlServer
    from ..node import Node

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = Node(cfg)
    control = ControlServer(
        node,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        doc_labels=args.metrics_doc_names and not args.metrics_no_doc_names,
        metrics_names=args.metrics_allow_host,
    )
    try:
        try:
            await node.start()
        except CacheLockedError as exc:
            raise CacheLockedError(
                f"{exc}: stop that node (Ctrl-C) or use another --cache-dir"
            ) from None
        await control.start()
        _banner(node, control, args)
        reporter = loop.create_task(_report(node, args.status_interval))
        await stop.wait()
        reporter.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)  # a second Ctrl-C stops at once
        say(f"{stamp()} stopping: closing links and flushing the cache (Ctrl-C again to force)")
    finally:
        await control.close()
        await node.close()
    say(f"{stamp()} stopped; every edit is in {cfg.cache_path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """`unity-crdt run`: host a node and its control API until Ctrl-C or SIGTERM."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    cfg = node_config(args)
    return asyncio.run(_serve(cfg, args))
