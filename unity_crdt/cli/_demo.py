"""The multi-peer merge demo: three node processes edit offline, meet by mDNS, and converge.

    unity-crdt demo [--netns] [--keep]        (or: python demos/lan_merge.py, make demo)

The parent starts every node as a separate process running this module in `--child` mode
(one JSON object per stdout line; commands on stdin). Phase 1: each node starts OFFLINE (no
mDNS, no peers), edits the shared doc and closes, so its edits live only in its own cache dir.
Phase 2: each restarts ONLINE on the same cache dir with mDNS discovery, and the parent waits
until all three report the same text and map. By default the nodes share loopback
(mDNS on 127.0.0.1); with --netns (root) each runs on its own host of a throwaway LAN of
network namespaces (scripts/netlab.py of a source checkout) and multicasts on that host's
eth0 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pycrdt

from ..config import NodeConfig
from ..errors import ConfigError
from ..node import Node
from ._procs import PACKAGE_ROOT, JsonProc, spawn_local

__all__ = ["DOC", "NODES", "main", "run"]

DOC = "trip"
NODES = ("alice", "bob", "carol")
SECRET_ENV = "UNITY_CRDT_DEMO_SECRET"  # never on the command line, where `ps` would show it
OFFLINE_TIMEOUT = 15.0
ONLINE_TIMEOUT = 20.0
_POLL = 0.02

# What each node does while offline: a line of the shared Text, its own key of the Map, and
# (carol) a deletion, to show that deletions merge too.
_LINES = {
    "alice": "alice: bring the tent",
    "bob": "bob: bring the stove",
    "carol": "carol: bring the map and snacks",
}
_CLAIMS = {"alice": "tent", "bob": "stove", "carol": "map"}
_DELETE = {"carol": " and snacks"}


def _emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def _view(doc: pycrdt.Doc[Any]) -> dict[str, Any]:
    """The demo's state of a doc: the Text and the Map, as plain values."""
    text = doc.get("list", type=pycrdt.Text)
    claims = doc.get("claims", type=pycrdt.Map)
    return {"text": str(text), "map": dict(sorted(claims.to_py().items()))}


def _child_config(opts: argparse.Namespace, online: bool) -> NodeConfig:
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise ConfigError(f"the child needs the group secret in ${SECRET_ENV}")
    return NodeConfig(
        name=opts.name,
        cache_dir=opts.cache,
        group_secret=secret,
        host=opts.host,
        mdns=online,
        mdns_interfaces=(opts.host,),
    )


async def _child_offline(opts: argparse.Namespace) -> int:
    """Edit the shared doc with no network at all, then close (the cache keeps the edits)."""
    async with Node(_child_config(opts, online=False)) as node:
        doc = node.doc(DOC)
        text = doc.get("list", type=pycrdt.Text)
        claims = doc.get("claims", type=pycrdt.Map)
        text += _LINES[opts.name] + "\n"  # one transaction per edit, as a user would type
        claims[opts.name] = _CLAIMS[opts.name]
        cut = _DELETE.get(opts.name)
        if cut:
            at = str(text).index(cut)  # ASCII only, so byte and character indices agree
            del text[at : at + len(cut)]
        await node.flush()
        _emit(event="offline", name=opts.name, view=_view(doc), t=time.monotonic())
    _emit(event="closed", name=opts.name)
    return 0


async def _child_online(opts: argparse.Namespace) -> int:
    """Reopen the same cache with mDNS on; report the view on every change until told to quit."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Before the node starts, so an early SIGTERM still closes it (and sends mDNS goodbyes).
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        # EOF (the parent is gone) stops the child too: no orphan outlives a killed parent.
        while line := (await reader.readline()).decode().strip():
            if line == "quit":
                break
        stop.set()

    async with Node(_child_config(opts, online=True)) as node:
        doc = node.doc(DOC)
        _emit(event="online", name=opts.name, url=node.url, view=_view(doc), t=time.monotonic())
        task = asyncio.create_task(commands())
        last: tuple[str, list[str]] | None = None
        while not stop.is_set():
            view, peers = _view(doc), sorted(p.name for p in node.peers)
            if (json.dumps(view), peers) != last:
                last = (json.dumps(view), peers)
                _emit(event="view", name=opts.name, view=view, peers=peers, t=time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _POLL)
        task.cancel()
    _emit(event="closed", name=opts.name)
    return 0


def _child_main(argv: list[str]) -> int:
    """`python -m unity_crdt.cli._demo --child offline|online ...`: one node of the demo."""
    parser = argparse.ArgumentParser(prog="unity_crdt.cli._demo --child")
    parser.add_argument("--child", choices=("offline", "online"), required=True)
    parser.add_argument("--name", choices=NODES, required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    opts = parser.parse_args(argv)
    run_child = _child_offline if opts.child == "offline" else _child_online
    return asyncio.run(run_child(opts))


# -- the parent ---------------------------------------------------------------------------------


@dataclass
class _Net:
    """Where the children run: loopback processes, or one host each of a namespaced LAN."""

    lan: Any

    def host(self, i: int) -> str:
        """The address node i listens and multicasts on."""
        return self.lan.hosts[i + 1].ip if self.lan else "127.0.0.1"

    def spawn(self, i: int, argv: list[str], env: dict[str, str]) -> JsonProc:
        """Start node i's process where it lives."""
        if self.lan is not None:
            proc: JsonProc = self.lan.spawn(i + 1, argv, env)
            return proc
        return spawn_local(argv, env, label=NODES[i])

    def describe(self) -> str:
        """One line (or two) for the header."""
        if self.lan is None:
            return "loopback, 3 processes, mDNS on 127.0.0.1 only"
        return (
            f"3 processes, each on its own host of a namespaced LAN ({self.lan.subnet}.0/24),"
            "\n            mDNS on each host's eth0 only"
        )


def _start_phase(net: _Net, phase: str, work: Path, secret: str) -> list[JsonProc]:
    return [
        net.spawn(
            i,
            [
                sys.executable,
                "-m",
                "unity_crdt.cli._demo",
                "--child",
                phase,
                "--name",
                name,
                "--cache",
                str(work / name),
                "--host",
                net.host(i),
            ],
            {SECRET_ENV: secret},
        )
        for i, name in enumerate(NODES)
    ]


def _latest_views(procs: list[JsonProc]) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for proc in procs:
        views = [e for e in proc.snapshot() if e.get("event") == "view"]
        out.append(views[-1] if views else None)
    return out


def _wait_converged(procs: list[JsonProc], timeout: float) -> list[dict[str, Any]] | None:
    """Poll until all children report one identical view; None on timeout or a dead child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = _latest_views(procs)
        if all(latest):
            views = [e for e in latest if e is not None]
            if all(e["view"] == views[0]["view"] for e in views):
                return views
        if any(p.returncode is not None for p in procs):
            return None
        time.sleep(_POLL)
    return None


def _first_seen(proc: JsonProc, view: dict[str, Any]) -> float:
    """When a child first reported the given view (its monotonic clock is the parent's)."""
    seen = [e for e in proc.snapshot() if e.get("event") == "view" and e["view"] == view]
    return min(float(e["t"]) for e in seen)


def _table(views: dict[str, dict[str, Any]]) -> str:
    """Nodes side by side: one column each, rows for the text lines and the map entries."""
    cols = {
        n: (
            v["text"].splitlines() or ["(empty)"],
            [f"{k} = {val}" for k, val in v["map"].items()] or ["(empty)"],
        )
        for n, v in views.items()
    }
    width = max(len(s) for t, m in cols.values() for s in (*t, *m, "")) + 1
    width = max(width, max(len(n) for n in cols))
    lines = ["        | " + " | ".join(n.ljust(width) for n in cols)]
    lines.append("  " + "-" * (len(lines[0]) - 2))
    for row, part in (("text", 0), ("map", 1)):
        height = max(len(c[part]) for c in cols.values())
        for k in range(height):
            cells = [(c[part][k] if k < len(c[part]) else "").ljust(width) for c in cols.values()]
            lines.append(f"  {row if k == 0 else '':5} | " + " | ".join(cells))
    return "\n".join(line.rstrip() for line in lines)


def _fail(what: str, procs: list[JsonProc]) -> int:
    print(f"\nFAILED: {what}", flush=True)
    for proc in procs:
        tail = proc.stderr_tail(8)
        if tail:
            print(f"--- {proc.label} (exit {proc.returncode}) stderr:\n{tail}", flush=True)
    return 1


def _story(net: _Net, work: Path, keep: bool, procs: list[JsonProc]) -> int:
    secret = secrets.token_urlsafe(32)
    print(f'unity-crdt demo: three nodes in three processes, one shared doc "{DOC}"')
    print(f"  network : {net.describe()}")
    print("  group   : a fresh random secret for this run (not shown)")
    print(f"  caches  : {work}/<node> ({'kept: --keep' if keep else 'deleted at the end'})\n")
    print("[1/2] OFFLINE: each node starts with no network, edits the doc alone, and closes;")
    print("      carol also deletes ' and snacks' from her line. Views before merging:", flush=True)
    offline = _start_phase(net, "offline", work, secret)
    procs.extend(offline)
    before: dict[str, dict[str, Any]] = {}
    for name, proc in zip(NODES, offline, strict=True):
        try:
            proc.wait_for(lambda e: e.get("event") == "closed", OFFLINE_TIMEOUT)
            event = proc.wait_for(lambda e: e.get("event") == "offline", 0.1)
        except AssertionError:
            return _fail(f"{name} did not finish its offline edits", offline)
        before[name] = event["view"]
    for proc in offline:
        proc.wait(5.0)
    print(_table(before) + "\n")

    print("[2/2] ONLINE: the same caches restart with mDNS discovery; waiting until all three")
    print("      hold identical text and map...", flush=True)
    started = time.monotonic()
    online = _start_phase(net, "online", work, secret)
    procs.extend(online)
    final = _wait_converged(online, ONLINE_TIMEOUT)
    if final is None:
        return _fail(f"not converged within {ONLINE_TIMEOUT:.0f} s", online)
    up = {e["name"]: e for p in online for e in p.snapshot() if e.get("event") == "online"}
    first_up, last_up = min(e["t"] for e in up.values()), max(e["t"] for e in up.values())
    done = max(_first_seen(p, final[0]["view"]) for p in online)
    for name in NODES:
        print(
            f"  {name:5} came online at {up[name]['url']} "
            f"(+{up[name]['t'] - started:.2f} s, process start + cache load + mDNS)"
        )
    print(
        f"\nconverged: all three hold identical text and map "
        f"{max(0.0, done - last_up):.2f} s after the last node came online\n"
        f"  ({done - first_up:.2f} s after the first came online, "
        f"{done - started:.2f} s after the processes were started)"
    )
    print(_table({e["name"]: e["view"] for e in final}))
    links = ", ".join(f"{e['name']}->{'+'.join(e['peers']) or 'none yet'}" for e in final)
    print(f"  links at that moment: {links}", flush=True)
    expected = [_LINES[n].replace(_DELETE.get(n, "\0"), "") for n in NODES]
    merged = final[0]["view"]
    if not all(line in merged["text"].splitlines() for line in expected) or any(
        cut in merged["text"] for cut in _DELETE.values()
    ):
        return _fail("the views agree but the merged text is not what the nodes wrote", online)
    return 0


def _stop_all(procs: list[JsonProc]) -> None:
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(RuntimeError):
                proc.send("quit")
    for proc in procs:
        proc.wait(3.0)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.stop(timeout=2.0)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same cleanup as Ctrl-C


def _netlab() -> Any:
    """The network-namespace kit of a source checkout (it is not part of the installed package)."""
    path = PACKAGE_ROOT / "scripts" / "netlab.py"
    if not path.exists():
        raise ConfigError("--netns needs a source checkout of unity_crdt (scripts/netlab.py)")
    spec = importlib.util.spec_from_file_location("unity_crdt_netlab", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while executing it
    spec.loader.exec_module(module)
    return module


def run(*, netns: bool = False, keep: bool = False) -> int:
    """Run the demo; 0 only if the three nodes converged. Cleans up processes, dirs, namespaces."""
    netlab = _netlab() if netns else None
    if netlab is not None:
        reason = netlab.unavailable_reason()
        if reason:
            raise ConfigError(
                f"--netns is unavailable: {reason}; run it as root (sudo), "
                "or drop --netns for the loopback demo"
            )
    in_main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in _SIGNALS} if in_main else {}
    for sig in saved:
        signal.signal(sig, _raise_interrupt)
    work = Path(tempfile.mkdtemp(prefix="unity-crdt-demo-"))
    procs: list[JsonProc] = []
    lan: Any = None
    try:
        if netlab is not None:
            netlab.sweep_stale()
            try:
                lan = netlab.Lan(hosts=len(NODES))
            except RuntimeError as exc:  # an `ip` command failed; Lan already cleaned up
                raise ConfigError(
                    f"could not build the namespaced LAN ({exc}); "
                    "check `ip netns list`, or drop --netns"
                ) from None
        return _story(_Net(lan), work, keep, procs)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", flush=True)
        return 130
    finally:
        # A second Ctrl-C or SIGTERM must not cut the cleanup short and leave things behind.
        for sig in saved:
            signal.signal(sig, signal.SIG_IGN)
        _stop_all(procs)
        if lan is not None:
            lan.close()
        if keep:
            print(f"caches kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, shared by `unity-crdt demo` and `demos/lan_merge.py`."""
    parser.add_argument(
        "--netns",
        action="store_true",
        help="run each node on its own host of a LAN of network namespaces (needs root)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the nodes' cache dirs (the path is printed)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: `--child ...` runs one node; anything else runs the whole demo."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--child" or a.startswith("--child=") for a in args):
        return _child_main(args)
    parser = argparse.ArgumentParser(prog="lan_merge", description=__doc__.splitlines()[0])
    add_arguments(parser)
    ns = parser.parse_args(args)
    try:
        return run(netns=ns.netns, keep=ns.keep)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
