"""One Node on one host of a namespaced LAN, driven by JSON lines (the LAN tier's per-host program).

    ip netns exec H python tests/lan/node_agent.py '<json config>'   (secret in $UC_LAN_SECRET)

Config keys: name, cache, ip; optional port (9001), peers (static URLs), mdns (true), relay (a
NATS URL: the cloud channel), and any
NodeConfig interval (mdns_requery_interval, ping_interval, idle_timeout, anti_entropy_interval,
reconnect_max, handshake_timeout). The secret never goes on the command line (`ps` shows it).

Stdout, one JSON object a line:
  {"event": "started", "name", "url", "device_id", "t"}
  {"event": "peers", "peers": [names], "joined": [...], "left": [...], "t"}  (on every change)
  {"event": "log", "level", "logger", "msg", "t"}           (library log lines, INFO and up)
  {"event": "state", "id", "doc", "text", "map", "sv", "hash", "peers", "handshake_failures"}
  {"event": "ok", "id", "op"} / {"event": "error", "id", "op", "error"}
  {"event": "closed", "name"}
Stdin, one JSON command a line (an optional "id" is echoed in the reply):
  {"op": "insert", "doc", "text", "index"?}   append, or insert at a UTF-8 byte index
  {"op": "delete", "doc", "text"}              remove the first occurrence of a substring
  {"op": "set", "doc", "key", "value"}         one key of the doc's Map
  {"op": "state", "doc"}                       the reply above
  {"op": "quit"}                               close the node (EOF and SIGTERM do too)
Each doc has one Text root "text" and one Map root "map".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import pycrdt

from unity_crdt.config import NodeConfig
from unity_crdt.node import Node

SECRET_ENV = "UC_LAN_SECRET"
POLL = 0.05
_KNOBS = (
    "mdns_requery_interval",
    "ping_interval",
    "idle_timeout",
    "anti_entropy_interval",
    "reconnect_max",
    "handshake_timeout",
)
_print_lock = threading.Lock()


def print_event(**event: Any) -> None:
    """Print one event line (zeroconf may log from its own thread, hence the lock)."""
    line = json.dumps(event, sort_keys=True)
    with _print_lock:
        print(line, flush=True)


class LogTap(logging.Handler):
    """Forwards library log lines as events and counts failed handshakes (wrong group, noise)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.handshake_failures = 0

    def emit(self, record: logging.LogRecord) -> None:
        """Count and forward one record; never raises into the library."""
        try:
            msg = record.getMessage()
            if "handshake failed" in msg:
                self.handshake_failures += 1
            if record.levelno >= logging.INFO:
                print_event(
                    event="log",
                    level=record.levelname,
                    logger=record.name,
                    msg=msg,
                    t=time.monotonic(),
                )
        except Exception:  # a logging handler must not break the code that logs
            self.handleError(record)


def decode_state_vector(sv: bytes) -> dict[str, int]:
    """A Yjs state vector (varuint count, then client/clock pairs) as {client: clock}."""
    pos = 0

    def varuint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = sv[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    out: dict[str, int] = {}
    for _ in range(varuint()):
        client = varuint()
        out[str(client)] = varuint()
    return dict(sorted(out.items()))


def roots(doc: pycrdt.Doc[Any]) -> tuple[pycrdt.Text, pycrdt.Map[Any]]:
    """The Text and the Map every doc of this tier holds."""
    return doc.get("text", type=pycrdt.Text), doc.get("map", type=pycrdt.Map)


def state_of(node: Node, name: str) -> dict[str, Any]:
    """The plain view of a doc plus its state vector, and a hash of all of it."""
    doc = node.doc(name)
    text, mapping = roots(doc)
    view = {
        "text": str(text),
        "map": dict(sorted((mapping.to_py() or {}).items())),
        "sv": decode_state_vector(doc.get_state()),
    }
    digest = hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:16]
    return {**view, "doc": name, "hash": digest}


def apply(node: Node, cmd: dict[str, Any]) -> None:
    """Run one editing command on the node's doc (each edit is its own transaction)."""
    text, mapping = roots(node.doc(cmd["doc"]))
    op = cmd["op"]
    if op == "insert":
        if "index" in cmd:
            text.insert(int(cmd["index"]), cmd["text"])
        else:
            text += cmd["text"]
    elif op == "delete":
        # pycrdt Text indices count UTF-8 bytes.
        at = str(text).encode().find(cmd["text"].encode())
        if at < 0:
            raise ValueError("substring not found")
        del text[at : at + len(cmd["text"].encode())]
    elif op == "set":
        mapping[cmd["key"]] = cmd["value"]
    else:
        raise ValueError(f"unknown op {op!r}")


def make_config(cfg: dict[str, Any]) -> NodeConfig:
    """NodeConfig for this host: listen and multicast on its eth0 address only."""
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise SystemExit(f"node_agent needs the group secret in ${SECRET_ENV}")
    knobs: dict[str, Any] = {k: float(cfg[k]) for k in _KNOBS if k in cfg}
    return NodeConfig(
        name=cfg["name"],
        cache_dir=cfg["cache"],
        group_secret=secret,
        host=cfg["ip"],
        port=int(cfg.get("port", 9001)),
        peers=tuple(cfg.get("peers", ())),
        mdns=bool(cfg.get("mdns", True)),
        mdns_interfaces=(cfg["ip"],),
        relay_url=cfg.get("relay"),
        **knobs,
    )


async def main(cfg: dict[str, Any]) -> None:
    """Run the node until quit, EOF or SIGTERM; report peers and answer commands."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Installed before the node starts, so an early SIGTERM still closes it cleanly.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tap = LogTap()
    lib_log = logging.getLogger("unity_crdt")
    lib_log.addHandler(tap)
    lib_log.setLevel(logging.INFO)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async with Node(make_config(cfg)) as node:
        print_event(
            event="started",
            name=cfg["name"],
            url=node.url,
            device_id=node.device_id,
            t=time.monotonic(),
        )

        async def commands() -> None:
            # EOF (the test process is gone) stops the agent: no orphan outlives its parent.
            while raw := (await reader.readline()).decode().strip():
                cmd = json.loads(raw)
                op, rid = cmd.get("op"), cmd.get("id")
                if op == "quit":
                    break
                try:
                    if op == "state":
                        peers = sorted(p.name for p in node.peers)
                        print_event(
                            event="state",
                            id=rid,
                            peers=peers,
                            t=time.monotonic(),
                            handshake_failures=tap.handshake_failures,
                            **state_of(node, cmd["doc"]),
                        )
                    else:
                        apply(node, cmd)
                        await node.flush()
                        print_event(event="ok", id=rid, op=op, t=time.monotonic())
                except Exception as exc:  # a bad command is reported, never fatal
                    print_event(event="error", id=rid, op=op, error=f"{type(exc).__name__}: {exc}")
            stop.set()

        task = asyncio.create_task(commands())
        last: list[str] = []
        while not stop.is_set():
            peers = sorted(p.name for p in node.peers)
            if peers != last:
                print_event(
                    event="peers",
                    peers=peers,
                    joined=sorted(set(peers) - set(last)),
                    left=sorted(set(last) - set(peers)),
                    t=time.monotonic(),
                )
                last = peers
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    print_event(event="closed", name=cfg["name"])


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
