"""`unity-crdt ...` / `python -m unity_crdt ...`: argument parsing and terminal output only.

Each subcommand is a `Command` (name, help, how to add its arguments, what to run), listed in
COMMANDS. `run` hosts a node and its control API (unity_crdt.control); `status`, `doc`,
`checkpoint`, `restore` and `search` are clients of that API, because the running node holds
the cache lock. Handlers import what they need lazily, so `unity-crdt keygen` stays instant.
Every error is one line on stderr saying what to do, with exit code 2. The group secret is
never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
import tomllib
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import CacheLockedError, ConfigError, UnityCrdtError

if TYPE_CHECKING:
    from .config import NodeConfig
    from .control import ControlClient, ControlServer
    from .node import Node

__all__ = [
    "COMMANDS", "Command", "build_parser", "default_cache_dir", "keygen", "main", "node_config",
]  # fmt: skip

PROG = "unity-crdt"
EXIT_USAGE = 2
SECRET_ENV = "UNITY_CRDT_SECRET"
CACHE_ENV = "UNITY_CRDT_CACHE_DIR"
PEER_POLL = 0.2


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line with a hint, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        """Print `<prog>: <message> (see <prog> --help)` and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, argument setup and handler (-> exit code)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def keygen() -> str:
    """A strong group secret: 32 random bytes, base64url without padding (43 characters)."""
    return secrets.token_urlsafe(32)


def default_cache_dir() -> Path:
    """$UNITY_CRDT_CACHE_DIR, else $XDG_DATA_HOME/unity-crdt, else ~/.local/share/unity-crdt."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "unity-crdt"


# -- formatting ---------------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in (headers, *rows)]  # fmt: skip


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


def _say(line: str) -> None:
    print(line, flush=True)


# -- `run` --------------------------------------------------------------------------------


def _configure_run(p: argparse.ArgumentParser) -> None:
    # fmt: off
    p.add_argument("--config", metavar="FILE", help="TOML file of NodeConfig keys (flags win)")
    p.add_argument("--name", help="this device's name as peers see it (default: host name)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help=f"local cache (default: {default_cache_dir()})")
    p.add_argument("--secret", help=f"group secret (visible in `ps`: prefer ${SECRET_ENV})")
    p.add_argument("--secret-file", metavar="FILE", help="read the group secret from FILE")
    p.add_argument("--host", help="listen address (default 127.0.0.1; 0.0.0.0 for the LAN)")
    p.add_argument("--port", type=int, help="listen port (default: any free port)")
    p.add_argument("--peer", action="append", metavar="URL", help="ws://host:port to keep dialling")
    p.add_argument("--no-mdns", action="store_true", help="do not discover peers by mDNS")
    p.add_argument("--mdns-interface", action="append", metavar="ADDR",
                   help="interface address to announce and browse on (default 127.0.0.1)")
    p.add_argument("--weaviate-url", metavar="URL", help="checkpoint to this Weaviate server")
    p.add_argument("--weaviate-grpc-port", type=int, metavar="PORT")
    p.add_argument("--checkpoint-interval", type=float, metavar="SECONDS")
    p.add_argument("--restore-on-start", action="store_true", default=None,
                   help="merge the group's checkpoints when the node starts")
    p.add_argument("--searchable", action="append", metavar="DOC",
                   help="index this doc's text for `unity-crdt search`")
    p.add_argument("--yjs", action="store_true", default=None,
                   help="serve a y-websocket endpoint on loopback for JS front ends")
    p.add_argument("--yjs-port", type=int, metavar="PORT")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus /metrics on this TCP port (0: any free port)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR")
    p.add_argument("--metrics-no-doc-names", action="store_true",
                   help="publish doc totals only, not one series per doc name")
    p.add_argument("--status-interval", type=float, default=5.0, metavar="SECONDS",
                   help="at most one sync summary line this often (0: never)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    # fmt: on


def _read_toml(path: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    table = data.get("node", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [node] must be a table")
    return dict(table)


def _secret(args: argparse.Namespace, from_file: Any) -> Any:
    if args.secret_file:
        try:
            return Path(args.secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the secret file {args.secret_file}: {exc.strerror}"
            ) from None
    if args.secret:
        print(f"{PROG}: warning: --secret is visible to other users in `ps`; prefer "
              f"${SECRET_ENV} or --secret-file", file=sys.stderr)  # fmt: skip
        return args.secret
    return os.environ.get(SECRET_ENV) or from_file


def node_config(args: argparse.Namespace) -> NodeConfig:
    """The NodeConfig of `run`: the --config file, then the environment, then flags on top."""
    from .config import NodeConfig

    values = _read_toml(args.config) if args.config else {}
    flags = {
        "name": args.name, "cache_dir": args.cache_dir, "host": args.host, "port": args.port,
        "peers": args.peer, "mdns_interfaces": args.mdns_interface,
        "weaviate_url": args.weaviate_url, "weaviate_grpc_port": args.weaviate_grpc_port,
        "checkpoint_interval": args.checkpoint_interval, "restore_on_start": args.restore_on_start,
        "searchable": args.searchable, "yjs_endpoint": args.yjs, "yjs_port": args.yjs_port,
    }  # fmt: skip
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.no_mdns:
        values["mdns"] = False
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
    return NodeConfig.from_mapping(values)


def _banner(node: Node, control: ControlServer) -> None:
    cfg = node.config
    cache = cfg.cache_path
    lines = [
        f'{PROG}: node "{cfg.name}" is running (device {node.device_id[:8]})',
        f"  listening   {node.url}",
        f"  cache       {cache}",
        f"  control     {control.path}  (try: {PROG} status --cache-dir {cache})",
        "  discovery   " + (f"mDNS on {', '.join(cfg.mdns_interfaces)}" if cfg.mdns else "off")
        + (f"; static peers {' '.join(cfg.peers)}" if cfg.peers else ""),
        "  checkpoints " + (f"{cfg.weaviate_url} every {cfg.checkpoint_interval:g} s"
                            if cfg.weaviate_url else "off (--weaviate-url to turn on)"),
    ]  # fmt: skip
    if cfg.yjs_endpoint:
        yjs = node.ywebsocket
        hint = ("token from your config (yjs_token)" if cfg.yjs_token
                else f"token for this run: {yjs.token}")  # fmt: skip
        lines.append(f"  yjs         {yjs.base_url + '/<doc>'}?token=...  ({hint})")
    if control.metrics_url:
        lines.append(f"  metrics     {control.metrics_url}")
    lines.append("Ctrl-C to stop.")
    _say("\n".join(lines))


def _summary(node: Node) -> str:
    st = node.status()
    synced = sum(d.peers_synced for d in st.docs)
    pending = sum(p.pending for p in st.peers)
    pairs = len(st.docs) * len(st.peers)
    return (f"sync: {_plural(len(st.docs), 'doc')}, {_plural(len(st.peers), 'peer')}, "
            f"synced {synced}/{pairs}, pending {_bytes(pending)}")  # fmt: skip


async def _report(node: Node, interval: float) -> None:
    """Print peers joining and leaving as they do, and the sync summary when it changes."""
    known: dict[str, Any] = {}
    last_line, last_at = "", float("-inf")
    while True:
        now = {p.device_id: p for p in node.peers}
        for dev, p in now.items():
            if dev not in known:
                _say(f"{_stamp()} peer joined: {p.name} ({dev[:8]}) {p.url}")
        for dev, p in known.items():
            if dev not in now:
                _say(f"{_stamp()} peer left: {p.name} ({dev[:8]})")
        known = now
        if interval > 0 and time.monotonic() - last_at >= interval:
            line = _summary(node)
            if line != last_line:
                _say(f"{_stamp()} {line}")
                last_line, last_at = line, time.monotonic()
        await asyncio.sleep(PEER_POLL)


async def _serve(cfg: NodeConfig, args: argparse.Namespace) -> int:
    from .control import ControlServer
    from .node import Node

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = Node(cfg)
    control = ControlServer(node, metrics_host=args.metrics_host, metrics_port=args.metrics_port,
                            doc_labels=not args.metrics_no_doc_names)  # fmt: skip
    try:
        try:
            await node.start()
        except CacheLockedError as exc:
            raise CacheLockedError(
                f"{exc}: stop that node (Ctrl-C) or use another --cache-dir"
            ) from None
        await control.start()
        _banner(node, control)
        reporter = loop.create_task(_report(node, args.status_interval))
        await stop.wait()
        reporter.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)  # a second Ctrl-C stops at once
        _say(f"{_stamp()} stopping: closing links and flushing the cache (Ctrl-C again to force)")
    finally:
        await control.close()
        await node.close()
    _say(f"{_stamp()} stopped; every edit is in {cfg.cache_path}")
    return 0


def _run_run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)  # fmt: skip
    cfg = node_config(args)
    if cfg.weaviate_url and not args.verbose:
        _quiet_authlib()
    return asyncio.run(_serve(cfg, args))


def _quiet_authlib() -> None:
    """Hide authlib's warning about its own httpx dependency, printed when weaviate loads.

    authlib forces its warnings to "always" when imported, so the filter must come after.
    """
    with contextlib.suppress(ImportError, AttributeError):
        category = importlib.import_module("authlib.deprecate").AuthlibDeprecationWarning
        warnings.filterwarnings("ignore", category=category)


# -- client commands ----------------------------------------------------------------------


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"the running node's cache dir (default: {default_cache_dir()})",
    )
    p.add_argument("--config", metavar="FILE", help="take cache_dir from this TOML config")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")  # fmt: skip


def _target(args: argparse.Namespace) -> Path:
    if args.cache_dir:
        return Path(args.cache_dir)
    if args.config:
        found = _read_toml(args.config).get("cache_dir")
        if not found:
            raise ConfigError(f"config file {args.config} has no cache_dir")
        return Path(found)
    return default_cache_dir()


def _call(args: argparse.Namespace, work: Callable[[ControlClient], Awaitable[int]]) -> int:
    from .control import ControlClient

    async def go() -> int:
        async with ControlClient(_target(args)) as client:
            return await work(client)

    return asyncio.run(go())


def _print_json(data: object) -> None:
    _say(json.dumps(data, indent=2, ensure_ascii=False))


def _configure_status(p: argparse.ArgumentParser) -> None:
    _add_target(p)


def _status_lines(st: dict[str, Any]) -> list[str]:
    cp = "off" if not st["checkpoints"] else (f"failing: {st['checkpoint_error']}"
                                              if st["checkpoint_error"] else "on")  # fmt: skip
    lines = [
        f"node    {st['name']} ({st['device_id'][:8]})  {st['url']}  up {_duration(st['uptime'])}",
        f"        pending writes {st['pending_writes']}, checkpoints {cp}"
        + (f", yjs {st['yjs_url']}" if st["yjs_url"] else ""),
        f"peers   {len(st['peers'])}",
    ]  # fmt: skip
    n_docs = len(st["docs"])
    if st["peers"]:
        lines += _table(
            ("NAME", "DEVICE", "CONNECTED", "LAST SEEN", "IN", "OUT", "PENDING", "SYNCED", "RTT"),
            [(p["name"], p["device_id"][:8], _duration(p["connected_for"]),
              _duration(p["last_seen_ago"]) + " ago", _bytes(p["bytes_in"]),
              _bytes(p["bytes_out"]), _bytes(p["pending"]), f"{len(p['synced_docs'])}/{n_docs}",
              "-" if p["rtt"] is None else f"{p['rtt'] * 1000:.1f} ms") for p in st["peers"]],
        )  # fmt: skip
    lines.append(f"docs    {n_docs}")
    if st["docs"]:
        now = time.time()
        lines += _table(
            ("NAME", "SIZE", "PEERS SYNCED", "LAST CHECKPOINT", "ERROR"),
            [(d["name"], _bytes(d["state_bytes"]), f"{d['peers_synced']}/{len(st['peers'])}",
              "never" if d["last_checkpoint"] is None
              else _duration(max(0.0, now - d["last_checkpoint"])) + " ago"
              + (" (changed since)" if d["dirty"] else ""),
              d["checkpoint_error"] or "-") for d in st["docs"]],
        )  # fmt: skip
    return lines


def _run_status(args: argparse.Namespace) -> int:
    async def work(client: ControlClient) -> int:
        st = await client.status()
        if args.json:
            _print_json(st)
        else:
            _say("\n".join(_status_lines(st)))
        return 0

    return _call(args, work)


# -- `doc` --------------------------------------------------------------------------------


def _add_types(p: argparse.ArgumentParser) -> None:
    for kind, shown in (("text", "str"), ("map", "dict"), ("array", "list")):
        p.add_argument(f"--{kind}", action="append", default=[], metavar="ROOT",
                       help=f"read root ROOT as a {kind.title()} ({shown})")  # fmt: skip


def _types(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [(kind, root) for kind in ("text", "map", "array") for root in getattr(args, kind)]


def _configure_doc(p: argparse.ArgumentParser) -> None:
    # fmt: off
    sub = p.add_subparsers(dest="doc_command", metavar="ACTION", parser_class=_Parser,
                           required=True)
    _add_target(sub.add_parser("list", help="names of the node's docs"))
    get = sub.add_parser("get", help="print a doc's roots as JSON")
    get.add_argument("name", metavar="NAME")
    _add_types(get)
    _add_target(get)
    watch = sub.add_parser("watch", help="print the doc's roots as one JSON line per change")
    watch.add_argument("name", metavar="NAME")
    watch.add_argument("--count", type=int, metavar="N", help="exit after N lines")
    _add_types(watch)
    _add_target(watch)
    set_ = sub.add_parser("set", help="edit one root of a doc (synced to peers like any edit)")
    set_.add_argument("name", metavar="NAME")
    what = set_.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", nargs=2, metavar=("ROOT", "VALUE"),
                      help="replace the Text ROOT with VALUE (- reads stdin)")
    what.add_argument("--map", nargs=2, metavar=("ROOT", "KEY=JSON"),
                      help="set KEY of the Map ROOT (a value that is not JSON is a string)")
    what.add_argument("--unset", nargs=2, metavar=("ROOT", "KEY"), help="delete KEY of a Map")
    what.add_argument("--array", nargs=2, metavar=("ROOT", "JSON"), help="append to an Array")
    set_.add_argument("--append", action="store_true", help="with --text: append, not replace")
    _add_target(set_)
    # fmt: on


def _json_or_str(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _edit(args: argparse.Namespace) -> dict[str, Any]:
    if args.text:
        root, value = args.text
        value = sys.stdin.read() if value == "-" else value
        return {"kind": "text", "root": root, "value": value, "append": args.append}
    if args.append:
        raise ConfigError("--append only goes with --text")
    if args.map:
        root, pair = args.map
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise ConfigError(f"--map wants KEY=JSON, e.g. --map {root} tent='\"alice\"'")
        return {"kind": "map", "root": root, "key": key, "value": _json_or_str(raw)}
    if args.unset:
        return {"kind": "map", "root": args.unset[0], "key": args.unset[1], "delete": True}
    return {"kind": "array", "root": args.array[0], "value": _json_or_str(args.array[1])}


def _run_doc(args: argparse.Namespace) -> int:
    if args.doc_command == "set":
        edit = _edit(args)  # before connecting: usage errors need no node

    async def work(client: ControlClient) -> int:
        if args.doc_command == "list":
            names = await client.docs()
            _print_json(names) if args.json else _say("\n".join(names))
        elif args.doc_command == "get":
            view = await client.get_doc(args.name, _types(args))
            _show(view, args.json, indent=2)
        elif args.doc_command == "set":
            _show(await client.edit(args.name, edit), args.json, indent=2)
        else:
            seen, hinted = 0, None
            async with contextlib.aclosing(client.watch(args.name, _types(args))) as views:
                async for view in views:
                    hinted = _show(view, args.json, indent=None, hinted=hinted)
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        return 0
            raise UnityCrdtError(f"the node on {client.cache_dir} stopped; watch again once "
                                 "it runs")  # fmt: skip
        return 0

    try:
        return _call(args, work)
    except KeyboardInterrupt:
        if args.doc_command == "watch":
            return 0  # Ctrl-C is how a watch ends
        raise


def _show(
    view: dict[str, Any], whole: bool, indent: int | None, hinted: list[str] | None = None
) -> list[str]:
    """Print the roots (or, with --json, the whole answer); name new untyped roots on stderr."""
    _say(json.dumps(view if whole else view["roots"], indent=indent, ensure_ascii=False))
    if view["untyped"] and not whole and view["untyped"] != hinted:
        print(f"{PROG}: untyped roots {', '.join(view['untyped'])}: name their type with "
              "--text/--map/--array ROOT", file=sys.stderr, flush=True)  # fmt: skip
    return list(view["untyped"])


# -- checkpoints --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _progress(label: str) -> AsyncIterator[None]:
    """An elapsed-time line on stderr while long work runs (only on a terminal)."""
    if not sys.stderr.isatty():
        yield
        return
    started = time.monotonic()

    async def spin() -> None:
        for c in itertools.cycle("|/-\\"):
            sys.stderr.write(f"\r{c} {label} ... {time.monotonic() - started:.1f} s ")
            sys.stderr.flush()
            await asyncio.sleep(0.1)

    task = asyncio.get_running_loop().create_task(spin())
    try:
        yield
    finally:
        task.cancel()
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


def _configure_checkpoint(p: argparse.ArgumentParser) -> None:
    _add_target(p)


def _run_checkpoint(args: argparse.Namespace) -> int:
    async def work(client: ControlClient) -> int:
        dirty = [d["name"] for d in (await client.status())["docs"] if d["dirty"]]
        async with _progress(f"checkpointing {_plural(len(dirty), 'doc')}"):
            await client.checkpoint()
        if args.json:
            _print_json({"checkpointed": dirty})
        else:
            _say(f"checkpointed {_plural(len(dirty), 'changed doc')}"
                 + (f": {', '.join(dirty)}" if dirty else " (nothing had changed)"))  # fmt: skip
        return 0

    return _call(args, work)


def _configure_restore(p: argparse.ArgumentParser) -> None:
    _add_target(p)


def _run_restore(args: argparse.Namespace) -> int:
    async def work(client: ControlClient) -> int:
        async with _progress("restoring from Weaviate"):
            docs = await client.restore()
        if args.json:
            _print_json({"restored": docs})
        elif docs:
            _say(f"merged the group's checkpoints of {_plural(len(docs), 'doc')}: "
                 + ", ".join(docs))  # fmt: skip
        else:
            _say("nothing to restore: the group has no checkpoints yet")
        return 0

    return _call(args, work)


def _configure_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--limit", type=int, default=10, metavar="N")
    _add_target(p)


def _run_search(args: argparse.Namespace) -> int:
    async def work(client: ControlClient) -> int:
        hits = await client.search(args.query, args.limit)
        if args.json:
            _print_json(hits)
        elif not hits:
            _say("no match (only docs listed in --searchable and checkpointed are indexed)")
        else:
            rows = [(f"{h['score']:.3f}", h["doc"], " ".join(h["snippet"].split())[:80])
                    for h in hits]  # fmt: skip
            _say("\n".join(_table(("SCORE", "DOC", "SNIPPET"), rows)))
        return 0

    return _call(args, work)


# -- demo, keygen -------------------------------------------------------------------------


def _configure_keygen(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _run_keygen(args: argparse.Namespace) -> int:
    print(keygen())
    return 0


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    from . import demo

    demo.add_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(netns=args.netns, keep=args.keep)


COMMANDS: list[Command] = [
    Command("run", "run a node that syncs its docs with peers until Ctrl-C",
            _configure_run, _run_run),
    Command("status", "show a running node's peers, docs and sync state",
            _configure_status, _run_status),
    Command("doc", "list, read, edit or watch the docs of a running node",
            _configure_doc, _run_doc),
    Command("checkpoint", "push every changed doc of a running node to Weaviate now",
            _configure_checkpoint, _run_checkpoint),
    Command("restore", "merge the group's Weaviate checkpoints into a running node",
            _configure_restore, _run_restore),
    Command("search", "keyword search over the checkpointed text of searchable docs",
            _configure_search, _run_search),
    Command("demo", "three nodes edit offline, meet by mDNS and merge (the LAN demo)",
            _configure_demo, _run_demo),
    Command("keygen", "print a new random group secret (share it with the group's devices)",
            _configure_keygen, _run_keygen),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The `unity-crdt` parser with one subparser per entry of COMMANDS."""
    parser = _Parser(
        prog=PROG,
        description="Offline-first CRDT documents that merge peer to peer on a LAN.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in COMMANDS:
        cmd.configure(sub.add_parser(cmd.name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse argv (default sys.argv[1:]), run the subcommand, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler = next(c.run for c in COMMANDS if c.name == args.command)
    try:
        return handler(args)
    except UnityCrdtError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
