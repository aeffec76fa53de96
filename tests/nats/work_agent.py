"""One Node in its own process for the collective-work tests, driven by JSON lines.

    python tests/nats/work_agent.py '<json config>'      (group secret in $UC_WORK_SECRET)

Config keys: name, cache, log (the handler's log file); optional host/ip, port, peers, relay
(NATS URL or list), coordination ("off" = LAN mode), concurrency (0 = no worker), heartbeat,
skew (seconds added to this node's wall clock), mdns (false), idle_timeout, ping_interval.

The worker of kind "echo" appends one JSON line when a task starts and one when it ends to the
log file (opened, written and closed each time, so a SIGKILL loses nothing written):
  {"ev": "start", "id", "token", "attempt", "device", "t"}   t: time.monotonic() (system-wide)
  {"ev": "end", "id", "token", "attempt", "device", "t", "lost"}
It waits `input["sleep"]` seconds (or until `task.lost` fires) and returns {"y": 2 * input["v"]}.

Stdout events: {"event": "started", "url", "device_id"}, {"event": "peers", "peers": [ids]},
{"event": "reply", "id", ...} / {"event": "error", "id", "error"}, {"event": "lease", ...}.
Stdin commands (an "id" is echoed): submit {inputs, lease, max_attempts, redundancy},
results {job, timeout}, progress {job}, contend {name, count, hold, ttl}, holder {name},
live {kind}, quit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

from unity_crdt import JobFailed, Node, NodeConfig

SECRET_ENV = "UC_WORK_SECRET"


def emit(**event: Any) -> None:
    """One event line on stdout."""
    print(json.dumps(event, sort_keys=True), flush=True)


def log_line(path: str, record: dict[str, Any]) -> None:
    """Append one line and close the file: durable across a SIGKILL of this process."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def make_config(cfg: dict[str, Any]) -> NodeConfig:
    """The node's config from the agent's."""
    host = cfg.get("ip", cfg.get("host", "127.0.0.1"))
    knobs = {k: float(cfg[k]) for k in ("idle_timeout", "ping_interval") if k in cfg}
    return NodeConfig(
        name=cfg["name"],
        cache_dir=cfg["cache"],
        group_secret=os.environ[SECRET_ENV],
        host=host,
        port=int(cfg.get("port", 0)),
        peers=tuple(cfg.get("peers", ())),
        mdns=bool(cfg.get("mdns", False)),
        mdns_interfaces=(host,),
        relay_url=tuple(r) if isinstance(r := cfg.get("relay"), list) else r,
        coordination_url=cfg.get("coordination"),
        work_heartbeat=float(cfg.get("heartbeat", 0.5)),
        anti_entropy_interval=2.0,
        reconnect_max=1.0,
        **knobs,
    )


async def main(cfg: dict[str, Any]) -> None:
    """Run until quit, EOF or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    node = Node(make_config(cfg))
    skew = float(cfg.get("skew", 0.0))
    node._work.clock = lambda: time.time() + skew  # the only wall clock collective work reads
    log_path = cfg["log"]
    me = cfg["name"]

    if int(cfg.get("concurrency", 1)) > 0:

        @node.worker("echo", concurrency=int(cfg.get("concurrency", 1)))
        async def echo(task: Any) -> dict[str, Any]:
            head = {"id": task.id, "token": task.token, "attempt": task.attempt, "device": me}
            log_line(log_path, {"ev": "start", **head, "t": time.monotonic()})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task.lost.wait(), float(task.input.get("sleep", 0.0)))
            log_line(
                log_path, {"ev": "end", **head, "t": time.monotonic(), "lost": task.lost.is_set()}
            )
            return {"y": 2 * task.input["v"]}

    async with node:
        emit(event="started", url=node.url, device_id=node.device_id, name=me)

        async def contend(rid: Any, cmd: dict[str, Any]) -> None:
            for _ in range(int(cmd["count"])):
                async with node.lease(cmd["name"], ttl=float(cmd.get("ttl", 5.0))) as lease:
                    got = time.monotonic()
                    emit(event="lease", id=rid, phase="acquired", token=lease.token, t=got)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lease.lost.wait(), float(cmd.get("hold", 0.01)))
                    lost = lease.lost.is_set()
                    emit(event="lease", id=rid, phase="releasing", token=lease.token,
                         t=time.monotonic(), lost=lost)  # fmt: skip
                await asyncio.sleep(float(cmd.get("pause", 0.0)))
            emit(event="reply", id=rid, op="contend")

        async def answer(cmd: dict[str, Any]) -> None:
            op, rid = cmd.get("op"), cmd.get("id")
            try:
                if op == "submit":
                    job = await node.submit(
                        "echo",
                        cmd["inputs"],
                        lease=float(cmd.get("lease", 5.0)),
                        max_attempts=int(cmd.get("max_attempts", 3)),
                        redundancy=int(cmd.get("redundancy", 1)),
                    )
                    emit(event="reply", id=rid, job=job.id)
                elif op == "results":
                    job = node.job(cmd["job"])
                    try:
                        res = await job.results(timeout=float(cmd.get("timeout", 60)))
                        emit(event="reply", id=rid, results=res, t=time.monotonic())
                    except JobFailed as exc:
                        emit(
                            event="reply",
                            id=rid,
                            failed={str(k): v for k, v in exc.failures.items()},
                        )
                elif op == "progress":
                    p = node.job(cmd["job"]).progress()
                    emit(event="reply", id=rid, total=p.total, done=p.done, failed=p.failed,
                         running=p.running)  # fmt: skip
                elif op == "contend":
                    await contend(rid, cmd)
                elif op == "holder":
                    info = node.lease_holder(cmd["name"])
                    emit(event="reply", id=rid, holder=None if info is None else info.__dict__)
                elif op == "live":
                    engine = node._work.engine
                    emit(event="reply", id=rid, live=sorted(engine._live_workers(cmd["kind"])),
                         mode=node.status().work.mode)  # type: ignore[union-attr]  # fmt: skip
                else:
                    raise ValueError(f"unknown op {op!r}")
            except Exception as exc:  # reported, never fatal
                emit(event="error", id=rid, op=op, error=f"{type(exc).__name__}: {exc}")

        async def commands() -> None:
            pending: set[asyncio.Task[None]] = set()
            while raw := (await reader.readline()).decode().strip():
                cmd = json.loads(raw)
                if cmd.get("op") == "quit":
                    break
                t = asyncio.ensure_future(answer(cmd))
                pending.add(t)
                t.add_done_callback(pending.discard)
            stop.set()

        task = asyncio.ensure_future(commands())
        last: list[str] = []
        while not stop.is_set():
            peers = sorted(p.device_id for p in node.peers)
            if peers != last:
                emit(event="peers", peers=peers)
                last = peers
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        task.cancel()
    emit(event="closed", name=me)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
