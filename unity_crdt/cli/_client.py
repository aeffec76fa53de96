"""The commands that are clients of a running node: status, doc, checkpoint, restore, search.

The running node holds the cache lock, so these talk to it through its control socket
(unity_crdt.control_client), imported when a command runs. Usage errors are found before
connecting; `--json` gives machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, UnityCrdtError
from ._common import (
    PROG,
    Parser,
    default_cache_dir,
    human_bytes,
    human_duration,
    plural,
    read_toml,
    say,
    table,
)

if TYPE_CHECKING:
    from ..frontends.control_client import ControlClient


def membership_line(ms: dict[str, Any] | None) -> str:
    """One line about the group: epoch, this device's state, member counts."""
    if ms is None:
        return "unknown"
    line = (
        f"epoch {ms['epoch']}, this device {ms['state']}, {plural(ms['members'], 'active member')}"
    )
    if ms["revoked"]:
        line += f", {ms['revoked']} revoked"
    if ms["invites"]:
        line += f", {plural(ms['invites'], 'open invitation')}"
    if ms.get("error"):
        line += f"\n        error: {ms['error']}"
    return line


__all__ = [
    "add_target",
    "call",
    "configure_checkpoint",
    "configure_doc",
    "configure_restore",
    "configure_search",
    "configure_status",
    "membership_line",
    "print_json",
    "run_checkpoint",
    "run_doc",
    "run_restore",
    "run_search",
    "run_status",
]


def add_target(p: argparse.ArgumentParser) -> None:
    """--cache-dir, --config and --json: which running node, and how to print."""
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"the running node's cache dir (default: {default_cache_dir()})",
    )
    p.add_argument("--config", metavar="FILE", help="take cache_dir from this TOML config")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")


def _target(args: argparse.Namespace) -> Path:
    if args.cache_dir:
        return Path(args.cache_dir)
    if args.config:
        found = read_toml(args.config).get("cache_dir")
        if not found:
            raise ConfigError(f"config file {args.config} has no cache_dir")
        return Path(found)
    return default_cache_dir()


def call(args: argparse.Namespace, work: Callable[[ControlClient], Awaitable[int]]) -> int:
    """Run `work` with a client of the node `args` names."""
    from ..frontends.control_client import ControlClient

    async def go() -> int:
        async with ControlClient(_target(args)) as client:
            return await work(client)

    return asyncio.run(go())


def print_json(data: object) -> None:
    """Indented JSON on stdout."""
    say(json.dumps(data, indent=2, ensure_ascii=False))


def configure_status(p: argparse.ArgumentParser) -> None:
    """The options of `status`."""
    add_target(p)


def _status_lines(st: dict[str, Any]) -> list[str]:
    cp = (
        "off"
        if not st["checkpoints"]
        else (f"failing: {st['checkpoint_error']}" if st["checkpoint_error"] else "on")
    )
    lines = [
        f"node    {st['name']} ({st['device_id'][:8]})  {st['url']}  "
        f"up {human_duration(st['uptime'])}",
        f"        pending writes {st['pending_writes']}, checkpoints {cp}"
        + (f", yjs {st['yjs_url']}" if st["yjs_url"] else ""),
        f"relay   {_relay_line(st.get('relay'))}",
        f"group   {membership_line(st.get('membership'))}",
        f"cache   {_cache_line(st.get('cache') or {})}",
        f"work    {_work_line(st.get('work'))}",
        f"peers   {len(st['peers'])}",
    ]
    for warning in st.get("checkpoint_warnings", ()):
        lines.insert(2, f"        warning: {warning}")
    for doc in st.get("equivocations", ()):
        lines.insert(2, f"        EQUIVOCATION: a peer holds other content of {doc!r}, same ids")
    n_docs = len(st["docs"])
    if st["peers"]:
        lines += table(
            ("NAME", "DEVICE", "CONNECTED", "LAST SEEN", "IN", "OUT", "PENDING", "SYNCED", "RTT"),
            [
                (
                    p["name"],
                    p["device_id"][:8],
                    human_duration(p["connected_for"]),
                    human_duration(p["last_seen_ago"]) + " ago",
                    human_bytes(p["bytes_in"]),
                    human_bytes(p["bytes_out"]),
                    human_bytes(p["pending"]),
                    f"{len(p['synced_docs'])}/{n_docs}",
                    "-" if p["rtt"] is None else f"{p['rtt'] * 1000:.1f} ms",
                )
                for p in st["peers"]
            ],
        )
    lines.append(f"docs    {n_docs}")
    if st["docs"]:
        now = time.time()
        lines += table(
            ("NAME", "SIZE", "PEERS SYNCED", "LAST CHECKPOINT", "ERROR"),
            [
                (
                    d["name"],
                    human_bytes(d["state_bytes"]),
                    f"{d['peers_synced']}/{len(st['peers'])}",
                    "never"
                    if d["last_checkpoint"] is None
                    else human_duration(max(0.0, now - d["last_checkpoint"]))
                    + " ago"
                    + (" (changed since)" if d["dirty"] else ""),
                    d["checkpoint_error"] or "-",
                )
                for d in st["docs"]
            ],
        )
    return lines


def _work_line(work: dict[str, Any] | None) -> str:
    from ._work import work_line

    return work_line(work)


def _relay_line(relay: dict[str, Any] | None) -> str:
    if relay is None:
        return "off"
    if relay["connected"]:
        state = f"connected to {relay['server']}, lag {relay['lag']}"
    else:
        state = f"NOT connected ({relay['error'] or 'connecting'})"
    return f"{relay['url']}  {state}, outbox {relay['outbox']}"


def _cache_line(cache: dict[str, Any]) -> str:
    parts = [f"FAILING ({cache['store_error']})" if cache.get("store_error") else "ok"]
    if cache.get("unsaved_docs"):
        parts.append(f"{len(cache['unsaved_docs'])} docs only in memory")
    if cache.get("failed_writes"):
        parts.append(f"{cache['failed_writes']} failed writes")
    last = cache.get("last_recovery")
    if last:
        parts.append(f"recovered {cache['recoveries']}x, last: {last['reason']}")
    return ", ".join(parts)


def run_status(args: argparse.Namespace) -> int:
    """`unity-crdt status`: the node's peers, docs and sync state."""

    async def work(client: ControlClient) -> int:
        st = await client.status()
        if args.json:
            print_json(st)
        else:
            say("\n".join(_status_lines(st)))
        return 0

    return call(args, work)


# -- `doc` --------------------------------------------------------------------------------


def _add_types(p: argparse.ArgumentParser) -> None:
    for kind, shown in (("text", "str"), ("map", "dict"), ("array", "list")):
        p.add_argument(
            f"--{kind}",
            action="append",
            default=[],
            metavar="ROOT",
            help=f"read root ROOT as a {kind.title()} ({shown})",
        )


def _types(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [(kind, root) for kind in ("text", "map", "array") for root in getattr(args, kind)]


def configure_doc(p: argparse.ArgumentParser) -> None:
    """The actions of `doc`: list, get, watch, set."""
    sub = p.add_subparsers(dest="doc_command", metavar="ACTION", parser_class=Parser, required=True)
    add_target(sub.add_parser("list", help="names of the node's docs"))
    get = sub.add_parser("get", help="print a doc's roots as JSON")
    get.add_argument("name", metavar="NAME")
    _add_types(get)
    add_target(get)
    watch = sub.add_parser("watch", help="print the doc's roots as one JSON line per change")
    watch.add_argument("name", metavar="NAME")
    watch.add_argument("--count", type=int, metavar="N", help="exit after N lines")
    _add_types(watch)
    add_target(watch)
    set_ = sub.add_parser("set", help="edit one root of a doc (synced to peers like any edit)")
    set_.add_argument("name", metavar="NAME")
    what = set_.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--text",
        nargs=2,
        metavar=("ROOT", "VALUE"),
        help="replace the Text ROOT with VALUE (- reads stdin)",
    )
    what.add_argument(
        "--map",
        nargs=2,
        metavar=("ROOT", "KEY=JSON"),
        help="set KEY of the Map ROOT (a value that is not JSON is a string)",
    )
    what.add_argument("--unset", nargs=2, metavar=("ROOT", "KEY"), help="delete KEY of a Map")
    what.add_argument("--array", nargs=2, metavar=("ROOT", "JSON"), help="append to an Array")
    set_.add_argument("--append", action="store_true", help="with --text: append, not replace")
    add_target(set_)


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


def run_doc(args: argparse.Namespace) -> int:
    """`unity-crdt doc ACTION`: list, read, edit or watch a running node's docs."""
    if args.doc_command == "set":
        edit = _edit(args)  # before connecting: usage errors need no node

    async def work(client: ControlClient) -> int:
        if args.doc_command == "list":
            names = await client.docs()
            print_json(names) if args.json else say("\n".join(names))
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
            raise UnityCrdtError(
                f"the node on {client.cache_dir} stopped; watch again once it runs"
            )
        return 0

    try:
        return call(args, work)
    except KeyboardInterrupt:
        if args.doc_command == "watch":
            return 0  # Ctrl-C is how a watch ends
        raise


def _show(
    view: dict[str, Any], whole: bool, indent: int | None, hinted: list[str] | None = None
) -> list[str]:
    """Print the roots (or, with --json, the whole answer); name new untyped roots on stderr."""
    say(json.dumps(view if whole else view["roots"], indent=indent, ensure_ascii=False))
    if view["untyped"] and not whole and view["untyped"] != hinted:
        print(
            f"{PROG}: untyped roots {', '.join(view['untyped'])}: name their type with "
            "--text/--map/--array ROOT",
            file=sys.stderr,
            flush=True,
        )
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


BAR_WIDTH = 28


def progress_line(label: str, p: dict[str, int], elapsed: float) -> str:
    """One line of a restore's progress: a bar over the objects to read, counts, bytes, time."""
    total, done = p["total"], p["done"]
    if total <= 0:
        return f"{label}: listed {plural(p['listed'], 'object')} ... {elapsed:.1f} s"
    filled = min(BAR_WIDTH, BAR_WIDTH * done // total)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    return f"{label} [{bar}] {done}/{total} objects, {human_bytes(p['nbytes'])}, {elapsed:.1f} s"


class _Bar:
    """Draws `progress_line` on stderr (only on a terminal), redrawn in place."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.shown = False

    def __call__(self, p: dict[str, int]) -> None:
        if not sys.stderr.isatty():
            return
        line = progress_line(self.label, p, time.monotonic() - self.started)
        sys.stderr.write(f"\r\x1b[K{line}")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def configure_checkpoint(p: argparse.ArgumentParser) -> None:
    """The options of `checkpoint`."""
    add_target(p)


def run_checkpoint(args: argparse.Namespace) -> int:
    """`unity-crdt checkpoint`: push every changed doc to Weaviate now."""

    async def work(client: ControlClient) -> int:
        dirty = [d["name"] for d in (await client.status())["docs"] if d["dirty"]]
        async with _progress(f"checkpointing {plural(len(dirty), 'doc')}"):
            await client.checkpoint()
        if args.json:
            print_json({"checkpointed": dirty})
        else:
            say(
                f"checkpointed {plural(len(dirty), 'changed doc')}"
                + (f": {', '.join(dirty)}" if dirty else " (nothing had changed)")
            )
        return 0

    return call(args, work)


def configure_restore(p: argparse.ArgumentParser) -> None:
    """The options of `restore`."""
    add_target(p)


def run_restore(args: argparse.Namespace) -> int:
    """`unity-crdt restore`: merge the group's Weaviate checkpoints."""

    async def work(client: ControlClient) -> int:
        bar = _Bar("restoring")
        try:
            docs = await client.restore(progress=bar)
        finally:
            bar.clear()
        if args.json:
            print_json({"restored": docs})
        elif docs:
            say(f"merged the group's checkpoints of {plural(len(docs), 'doc')}: " + ", ".join(docs))
        else:
            say("nothing to restore: the group has no checkpoints yet")
        return 0

    return call(args, work)


def configure_search(p: argparse.ArgumentParser) -> None:
    """The options of `search`."""
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--limit", type=int, default=10, metavar="N")
    p.add_argument(
        "--mode",
        choices=("keyword", "vector", "hybrid"),
        help="default: hybrid if the node has an embedder, else keyword",
    )
    p.add_argument(
        "--alpha", type=float, default=0.5, metavar="A", help="hybrid: 0 keyword .. 1 vector"
    )
    add_target(p)


def run_search(args: argparse.Namespace) -> int:
    """`unity-crdt search QUERY`: search the checkpointed passages of searchable docs."""

    async def work(client: ControlClient) -> int:
        async with _progress("searching"):
            hits = await client.search(args.query, args.limit, args.mode, args.alpha)
        if args.json:
            print_json(hits)
        elif not hits:
            say("no match (only docs listed in --searchable and checkpointed are indexed)")
        else:
            rows = [
                (f"{h['score']:.3f}", h["doc"], " ".join(h["snippet"].split())[:80]) for h in hits
            ]
            say("\n".join(table(("SCORE", "DOC", "SNIPPET"), rows)))
        return 0

    return call(args, work)
