"""Real Nodes on a namespaced LAN: mDNS over real multicast, cables pulled, split brain, loss.

Each host runs node_agent.py (one Node, driven by JSON lines). Intervals are short so a
dead link is noticed in ~5 s (idle_timeout 4 s) and the whole file takes about 30 s.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netns import Lan, Proc

pytestmark = pytest.mark.lan

AGENT = str(Path(__file__).with_name("node_agent.py"))
PORT = 9001
DOC = "notes"
FAST = {
    "mdns_requery_interval": 2.0,
    "ping_interval": 1.0,
    "idle_timeout": 4.0,
    "anti_entropy_interval": 2.0,
    "reconnect_max": 2.0,
    "handshake_timeout": 3.0,
}
# Worst case to notice a dead link: idle_timeout + one tick, plus slack for 2 busy cores.
DROP_TIMEOUT = 10.0


@dataclass
class Agent:
    """The test side of one node_agent process."""

    index: int
    name: str
    proc: Proc
    url: str = ""
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def request(self, timeout: float = 10.0, **cmd: Any) -> dict[str, Any]:
        """Send one command and wait for its reply; a reported error fails the test."""
        rid = f"{self.name}-{next(self._ids)}"
        self.proc.send(json.dumps({**cmd, "id": rid}))
        reply = self.proc.wait_for(lambda e: e.get("id") == rid, timeout)
        assert reply["event"] != "error", f"{self.name}: {cmd['op']} failed: {reply['error']}"
        return reply

    def insert(self, text: str, doc: str = DOC) -> None:
        """Append to the doc's Text."""
        self.request(op="insert", doc=doc, text=text)

    def delete(self, text: str, doc: str = DOC) -> None:
        """Remove a substring from the doc's Text."""
        self.request(op="delete", doc=doc, text=text)

    def set_key(self, key: str, value: Any, doc: str = DOC) -> None:
        """Set one key of the doc's Map."""
        self.request(op="set", doc=doc, key=key, value=value)

    def state(self, doc: str = DOC) -> dict[str, Any]:
        """Text, map, state vector, hash, linked peers and failed handshakes, as of now."""
        return self.request(op="state", doc=doc)

    def peers(self) -> set[str]:
        """The latest set of linked peer names the agent reported."""
        events = [e for e in self.proc.snapshot() if e.get("event") == "peers"]
        return set(events[-1]["peers"]) if events else set()

    def ever_linked(self) -> set[str]:
        """Every peer name this node was ever linked to."""
        return _ever(self.proc.snapshot())

    def wait_peers(self, want: set[str], timeout: float) -> float:
        """Block until the linked set is exactly `want`; returns when (monotonic) it happened."""
        events = self.proc.wait_until(
            lambda evs: _latest_peers(evs) == want,
            timeout,
            f"{self.name} linked to exactly {sorted(want)}",
        )
        return float([e for e in events if e.get("event") == "peers"][-1]["t"])


def failed_handshakes(agent: Agent) -> list[str]:
    """The library's "handshake failed" log lines of agent (they name the remote address)."""
    return [
        e["msg"]
        for e in agent.proc.snapshot()
        if e.get("event") == "log" and "handshake failed" in e["msg"]
    ]


def left_reasons(agent: Agent, peer: str) -> list[str]:
    """The library's "peer left" log lines of agent about peer (they carry the close reason)."""
    return [
        e["msg"]
        for e in agent.proc.snapshot()
        if e.get("event") == "log" and e["msg"].startswith(f"peer left: {peer!r}")
    ]


def _ever(events: list[dict[str, Any]]) -> set[str]:
    """Every peer name ever reported in these events."""
    return {p for e in events if e.get("event") == "peers" for p in e["peers"]}


def _latest_peers(events: list[dict[str, Any]]) -> set[str] | None:
    """The linked set of the last peers event, or None before the first."""
    peers = [e for e in events if e.get("event") == "peers"]
    return set(peers[-1]["peers"]) if peers else None


def start_agents(
    lan: Lan, tmp: Path, hosts: Iterable[int], secret: str, **extra: Any
) -> dict[int, Agent]:
    """Start a node on each host (all at once), then wait until each is listening."""
    agents: dict[int, Agent] = {}
    for i in hosts:
        name = f"n{i}"
        cfg = {
            "name": name,
            "cache": str(tmp / name),
            "ip": lan.hosts[i].ip,
            "port": PORT,
            **FAST,
            **extra.get(name, {}),
        }
        proc = lan.python(i, AGENT, json.dumps(cfg), env={"UC_LAN_SECRET": secret})
        agents[i] = Agent(i, name, proc)
    for agent in agents.values():
        started = agent.proc.wait_for(lambda e: e.get("event") == "started", timeout=20)
        agent.url = started["url"]
        assert agent.url == f"ws://{lan.hosts[agent.index].ip}:{PORT}", agent.url
    return agents


def wait_mesh(agents: dict[int, Agent], groups: Iterable[Iterable[int]], timeout: float) -> float:
    """Wait until within each group every node links exactly the others; seconds it took."""
    t0 = time.monotonic()
    for group in groups:
        members = {agents[i].name for i in group}
        for i in group:
            left = max(0.1, timeout - (time.monotonic() - t0))
            agents[i].wait_peers(members - {agents[i].name}, left)
    return time.monotonic() - t0


def wait_converged(
    agents: Iterable[Agent], timeout: float, must_hold: Callable[[dict[str, Any]], bool]
) -> tuple[list[dict[str, Any]], float]:
    """Poll states until all nodes hold one identical doc that satisfies must_hold."""
    agents = list(agents)
    t0 = time.monotonic()
    states: list[dict[str, Any]] = []
    while time.monotonic() - t0 < timeout:
        states = [a.state() for a in agents]
        if len({s["hash"] for s in states}) == 1 and must_hold(states[0]):
            return states, time.monotonic() - t0
        time.sleep(0.2)
    views = {a.name: (s["text"], s["map"], s["peers"]) for a, s in zip(agents, states, strict=True)}
    raise AssertionError(f"not converged in {timeout:.0f}s: {views}")


def holds(lines: Iterable[str], mapping: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """A predicate: every line present in the Text and every key/value in the Map."""
    lines, mapping = list(lines), dict(mapping)

    def check(state: dict[str, Any]) -> bool:
        return all(line in state["text"] for line in lines) and all(
            state["map"].get(k) == v for k, v in mapping.items()
        )

    return check


def new_secret() -> str:
    """A fresh group secret (each test its own group)."""
    return secrets.token_urlsafe(32)


def test_four_hosts_discover_link_and_converge(
    make_lan: Callable[..., Lan], tmp_path: Path
) -> None:
    lan = make_lan(4)
    t0 = time.monotonic()
    agents = start_agents(lan, tmp_path, range(1, 5), new_secret())
    took = wait_mesh(agents, [range(1, 5)], timeout=15.0)
    print(
        f"\n4 nodes fully linked by mDNS {time.monotonic() - t0:.2f}s after launch "
        f"({took:.2f}s after all were listening)"
    )
    for a in agents.values():
        # Every link is to another host's eth0 address, found by multicast alone (no peers=).
        assert a.peers() == {f"n{i}" for i in range(1, 5)} - {a.name}
    t_edit = time.monotonic()
    for i, a in agents.items():
        a.insert(f"line from n{i} (café ☕)\n")
        a.set_key(f"k{i}", i * 10)
    agents[2].set_key("shared", "from n2")
    agents[3].set_key("shared", "from n3")
    states, _ = wait_converged(
        agents.values(),
        10.0,
        holds([f"line from n{i}" for i in range(1, 5)], {f"k{i}": i * 10 for i in range(1, 5)}),
    )
    print(f"10 edits on 4 nodes converged {time.monotonic() - t_edit:.2f}s after the first")
    assert states[0]["map"]["shared"] in ("from n2", "from n3")
    assert len(states[0]["sv"]) >= 4, "every node's edits are in every replica"
    failures = {a.name: failed_handshakes(a) for a in agents.values()}
    assert all(s["handshake_failures"] == 0 for s in states), f"within a group: {failures}"


@pytest.mark.slow
def test_unplugged_host_is_dropped_then_rejoins_and_merges(
    make_lan: Callable[..., Lan], tmp_path: Path
) -> None:
    lan = make_lan(4)
    agents = start_agents(lan, tmp_path, range(1, 5), new_secret())
    wait_mesh(agents, [range(1, 5)], timeout=15.0)
    agents[1].insert("base\n")
    wait_converged(agents.values(), 10.0, holds(["base"], {}))

    t_cut = time.monotonic()
    lan.link_down(4)
    agents[4].insert("n4 while unplugged\n")
    agents[4].set_key("n4", "offline")
    agents[1].insert("n1 while n4 is away\n")
    agents[2].set_key("n2", "online")
    agents[3].delete("base\n")
    # mDNS never reports n4 gone; only the link keepalive (idle_timeout 4 s) can.
    wait_mesh(agents, [[1, 2, 3]], timeout=DROP_TIMEOUT)
    agents[4].wait_peers(set(), DROP_TIMEOUT)
    print(f"\nunplugged n4 dropped by all after {time.monotonic() - t_cut:.2f}s (idle_timeout 4s)")
    for i in (1, 2, 3):
        reasons = left_reasons(agents[i], "n4")
        assert reasons and "TIMEOUT" in reasons[-1], f"n{i} dropped n4 by keepalive: {reasons}"
    cut_off = agents[4].state()
    assert "n1 while n4 is away" not in cut_off["text"] and "n2" not in cut_off["map"]
    assert all("n4 while unplugged" not in agents[i].state()["text"] for i in (1, 2, 3))

    t_up = time.monotonic()
    lan.link_up(4)
    took = wait_mesh(agents, [range(1, 5)], timeout=15.0)
    print(f"n4 rediscovered and relinked {took:.2f}s after link up")
    states, _ = wait_converged(
        agents.values(),
        10.0,
        holds(["n4 while unplugged", "n1 while n4 is away"], {"n4": "offline", "n2": "online"}),
    )
    assert "base" not in states[0]["text"], "the deletion made during the cut survives the merge"
    print(f"all edits converged {time.monotonic() - t_up:.2f}s after link up")


@pytest.mark.slow
def test_split_brain_halves_edit_then_heal_and_converge(
    make_lan: Callable[..., Lan], tmp_path: Path
) -> None:
    lan = make_lan(4)
    agents = start_agents(lan, tmp_path, range(1, 5), new_secret())
    wait_mesh(agents, [range(1, 5)], timeout=15.0)

    t_split = time.monotonic()
    lan.split([3, 4])
    # Edit at once: the first of these go into links that are already dead.
    for i, a in agents.items():
        a.insert(f"half {'A' if i < 3 else 'B'} n{i}\n")
    agents[1].set_key("leader", "n1")
    agents[4].set_key("leader", "n4")
    wait_mesh(agents, [[1, 2], [3, 4]], timeout=DROP_TIMEOUT)
    print(f"\nhalves separated {time.monotonic() - t_split:.2f}s after the split")
    a_side, b_side = agents[1].state(), agents[3].state()
    assert "half B" not in a_side["text"] and "half A" not in b_side["text"]
    assert (a_side["map"]["leader"], b_side["map"]["leader"]) == ("n1", "n4")

    t_heal = time.monotonic()
    lan.heal()
    took = wait_mesh(agents, [range(1, 5)], timeout=15.0)
    print(f"halves relinked {took:.2f}s after heal")
    states, _ = wait_converged(
        agents.values(),
        10.0,
        holds([f"half {'A' if i < 3 else 'B'} n{i}" for i in range(1, 5)], {}),
    )
    assert states[0]["map"]["leader"] in ("n1", "n4"), "one winner, the same on every node"
    print(f"split brain converged {time.monotonic() - t_heal:.2f}s after heal")


@pytest.mark.slow
def test_ten_percent_loss_everywhere_still_converges(
    make_lan: Callable[..., Lan], tmp_path: Path
) -> None:
    lan = make_lan(4)
    for i in lan.hosts:
        lan.loss(i, 10.0)  # both directions: ~19% of packets lost between two hosts
    t0 = time.monotonic()
    agents = start_agents(lan, tmp_path, range(1, 5), new_secret())
    # Keepalives may drop a link now and then under loss; linking once is what matters.
    for a in agents.values():
        a.proc.wait_until(
            lambda evs: len(_ever(evs)) == 3,
            20.0,
            f"{a.name} linked every other node at least once",
        )
    print(f"\nunder loss, every node linked all others within {time.monotonic() - t0:.2f}s")
    t_edit = time.monotonic()
    for i, a in agents.items():
        for k in range(3):
            a.insert(f"n{i}.{k}\n")
        a.set_key(f"k{i}", f"v{i}")
    block = "".join(f"{n:05d} lorem ipsum dolor sit amet\n" for n in range(1000))  # ~33 KB
    agents[2].insert(block)
    lines = [f"n{i}.{k}" for i in range(1, 5) for k in range(3)]
    states, _ = wait_converged(
        agents.values(), 25.0, holds(lines, {f"k{i}": f"v{i}" for i in range(1, 5)})
    )
    assert block in states[0]["text"], "a multi-segment update crossed the lossy links intact"
    retrans = {i: tcp_retransmits(lan, i) for i in lan.hosts}
    print(
        f"12 inserts, 4 sets and a 33 KB insert converged under 10% loss per direction "
        f"{time.monotonic() - t_edit:.2f}s after the first edit; TCP retransmissions "
        f"per host: {retrans}"
    )
    assert sum(retrans.values()) > 0, "the loss filters really dropped link traffic"


def tcp_retransmits(lan: Lan, i: int) -> int:
    """TCP segments host i has retransmitted (its namespace's own counter)."""
    out = lan.exec(i, ["nstat", "-asz", "TcpRetransSegs"]).stdout.split()
    return int(out[out.index("TcpRetransSegs") + 1])


@pytest.mark.slow
def test_node_of_another_group_is_never_linked_and_learns_nothing(
    make_lan: Callable[..., Lan], tmp_path: Path
) -> None:
    lan = make_lan(5)
    group_urls = [f"ws://{lan.hosts[i].ip}:{PORT}" for i in range(1, 5)]
    stranger_url = f"ws://{lan.hosts[5].ip}:{PORT}"
    # Beyond sharing the multicast LAN, make them try hard: the stranger dials every member,
    # and n1 dials the stranger. Only the handshake can keep them apart.
    agents = start_agents(lan, tmp_path, range(1, 5), new_secret(), n1={"peers": [stranger_url]})
    stranger = start_agents(lan, tmp_path, [5], new_secret(), n5={"peers": group_urls})[5]
    wait_mesh(agents, [range(1, 5)], timeout=15.0)
    stranger.insert("stranger's private text\n")
    stranger.set_key("owner", "stranger")
    for i, a in agents.items():
        a.insert(f"group n{i}\n")
    agents[1].set_key("owner", "group")

    group_lines = [f"group n{i}" for i in range(1, 5)]
    wait_converged(agents.values(), 10.0, holds(group_lines, {"owner": "group"}))
    # Let every member see the stranger's dials fail, and the stranger see n1's.
    deadline = time.monotonic() + 10.0
    while True:
        counts = {a.name: a.state()["handshake_failures"] for a in (*agents.values(), stranger)}
        if all(counts.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    print(f"\nrejected handshakes seen per node: {counts}")
    assert all(counts.values()), f"every node logged a failed handshake: {counts}"

    # The responder names who failed: only the stranger at members, only n1 at the stranger.
    for a in agents.values():
        assert all("(from 10.77.0.5;" in m for m in failed_handshakes(a)), a.name
    assert all("(from 10.77.0.1;" in m for m in failed_handshakes(stranger))
    time.sleep(FAST["mdns_requery_interval"])  # one more re-query and redial round
    mine = stranger.state()
    assert mine["text"] == "stranger's private text\n" and mine["map"] == {"owner": "stranger"}
    assert mine["peers"] == [] and stranger.ever_linked() == set()
    for a in agents.values():
        s = a.state()
        assert "stranger" not in s["text"] and s["map"] == {"owner": "group"}
        assert "n5" not in a.ever_linked()
        assert a.peers() == {f"n{i}" for i in range(1, 5)} - {a.name}
