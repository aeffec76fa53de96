"""The test side of collective work across processes: agents (work_agent.py) and their logs."""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unity_crdt.cli._procs import JsonProc, spawn_local

AGENT = str(Path(__file__).with_name("work_agent.py"))
SECRET = "work test group secret: correct horse battery staple"


@dataclass
class Agent:
    """One work_agent process."""

    name: str
    proc: JsonProc
    url: str = ""
    device_id: str = ""
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def send(self, **cmd: Any) -> str:
        """Send a command; its request id."""
        rid = f"{self.name}-{next(self._ids)}"
        self.proc.send(json.dumps({**cmd, "id": rid}))
        return rid

    def reply(self, rid: str, timeout: float = 30.0) -> dict[str, Any]:
        """The reply to request `rid`; an error reply fails the test."""
        got = self.proc.wait_for(
            lambda e: e.get("id") == rid and e["event"] in ("reply", "error"), timeout
        )
        assert got["event"] == "reply", f"{self.name}: {got}"
        return got

    def request(self, timeout: float = 30.0, **cmd: Any) -> dict[str, Any]:
        """Send a command and wait for its reply."""
        return self.reply(self.send(**cmd), timeout)

    def results(self, job: str, timeout: float) -> dict[str, Any]:
        """The job's results: the agent waits up to `timeout` s (it answers TimeoutError after)."""
        return self.reply(self.send(op="results", job=job, timeout=timeout), timeout + 15)

    def peers(self) -> set[str]:
        """The device ids this agent last reported as linked."""
        evs = [e for e in self.proc.snapshot() if e.get("event") == "peers"]
        return set(evs[-1]["peers"]) if evs else set()

    def events(self, kind: str, rid: str | None = None) -> list[dict[str, Any]]:
        """Events of one kind (and one request)."""
        return [
            e
            for e in self.proc.snapshot()
            if e.get("event") == kind and (rid is None or e.get("id") == rid)
        ]


def start_agent(
    tmp: Path, name: str, *, spawn: Callable[[list[str]], JsonProc] | None = None, **cfg: Any
) -> Agent:
    """Start an agent (in this namespace unless `spawn` runs it elsewhere) and wait for it."""
    conf = {"name": name, "cache": str(tmp / name), "log": str(tmp / f"{name}.log"), **cfg}
    argv = [sys.executable, AGENT, json.dumps(conf)]
    if spawn is not None:
        proc = spawn(argv)
    else:
        proc = spawn_local(argv, {"UC_WORK_SECRET": SECRET}, label=name)
    started = proc.wait_for(lambda e: e.get("event") == "started", 30)
    return Agent(name, proc, started["url"], started["device_id"])


def start_group(tmp: Path, names: Sequence[str], **cfg: Any) -> list[Agent]:
    """Agents linked in a full mesh over loopback (each dials the ones started before it)."""
    agents: list[Agent] = []
    for name in names:
        agents.append(start_agent(tmp, name, peers=[a.url for a in agents], **cfg))
    wait_mesh(agents)
    return agents


def wait_mesh(agents: Sequence[Agent], timeout: float = 30.0) -> None:
    """Until every agent is linked to every other."""
    deadline = time.monotonic() + timeout
    want = {a.name: {b.device_id for b in agents if b is not a} for a in agents}
    while time.monotonic() < deadline:
        if all(want[a.name] <= a.peers() for a in agents):
            return
        time.sleep(0.05)
    raise AssertionError(f"no full mesh: {[(a.name, len(a.peers())) for a in agents]}")


def wait_live(
    agents: Sequence[Agent], count: int, mode: str = "lan", timeout: float = 30.0
) -> None:
    """Until every worker agent counts `count` live workers of "echo" and works in `mode`
    ("strict" once its coordination bucket is up: a cluster elects its leaders first)."""
    deadline = time.monotonic() + timeout
    views: list[Any] = []
    while time.monotonic() < deadline:
        views = [a.request(op="live", kind="echo") for a in agents]
        if all(len(v["live"]) == count and v["mode"] == mode for v in views):
            return
        time.sleep(0.1)
    raise AssertionError(f"workers not all live: {views}")


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every record a handler logged (a torn last line of a killed process is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def runs_by_task(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per task id, each run: {device, token, attempt, start, end (None if never ended), lost}."""
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in records:
        key = (r["id"], r["device"], r["token"])
        run = runs.setdefault(
            key,
            {"id": r["id"], "device": r["device"], "token": r["token"], "attempt": r["attempt"],
             "start": None, "end": None, "lost": False},
        )  # fmt: skip
        if r["ev"] == "start":
            run["start"] = r["t"]
        else:
            run["end"], run["lost"] = r["t"], r["lost"]
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs.values():
        out[run["id"]].append(run)
    for task_runs in out.values():
        task_runs.sort(key=lambda r: r["token"])
    return dict(out)


def all_runs(tmp: Path, agents: Sequence[Agent]) -> dict[str, list[dict[str, Any]]]:
    """The runs logged by every agent."""
    records: list[dict[str, Any]] = []
    for a in agents:
        records += read_log(tmp / f"{a.name}.log")
    return runs_by_task(records)


def overlaps(
    task_runs: list[dict[str, Any]], died: dict[str, float] | None = None
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of runs of one task, in token order, where the later started before the earlier
    ended (two holders at once). A run that never ended ended when its device `died`."""
    bad = []
    for a, b in itertools.pairwise(task_runs):
        end = a["end"] if a["end"] is not None else (died or {}).get(a["device"], float("inf"))
        if b["start"] < end:
            bad.append((a, b))
    return bad
