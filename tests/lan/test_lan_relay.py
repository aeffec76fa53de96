"""Two hosts on two networks with no route between them converge through NATS.

Network A (10.77.0.0/24) and network B (10.78.0.0/24) are two namespaced LANs, each its own
switch. The nats-server runs in A's switch namespace, which also has a cable into B's switch:
it answers on 10.77.0.254 (A) and 10.78.0.254 (B) and forwards nothing (no ip_forward), so
the hosts reach NATS but never each other. mDNS is on: it finds nobody across networks.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from netns import Lan, venv_python
from serverkit import load_script
from test_lan_nodes import AGENT, FAST, PORT, Agent

pytestmark = [pytest.mark.lan, pytest.mark.nats]

NATS_PORT = 4222


def _nats_script() -> Any:
    return load_script("nats")


def run(*argv: str) -> None:
    import subprocess

    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}"


def start_agent(lan: Lan, i: int, tmp: Path, name: str, secret: str, relay: str) -> Agent:
    cfg = {"name": name, "cache": str(tmp / name), "ip": lan.hosts[i].ip, "port": PORT}
    cfg |= {**FAST, "relay": relay}
    proc = lan.python(i, AGENT, json.dumps(cfg), env={"UC_LAN_SECRET": secret})
    agent = Agent(i, name, proc)
    agent.url = proc.wait_for(lambda e: e.get("event") == "started", timeout=20)["url"]
    return agent


def wait_text(agents: list[Agent], want: Callable[[str], bool], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    texts: list[str] = []
    while time.monotonic() < deadline:
        texts = [a.state()["text"] for a in agents]
        if len(set(texts)) == 1 and want(texts[0]):
            return texts[0]
        time.sleep(0.2)
    raise AssertionError(f"not converged: {[t[-60:] for t in texts]}")


def test_two_networks_with_no_route_converge_through_nats(
    make_lan: Callable[..., Lan], tmp_path: Path
) -> None:
    net_a, net_b = make_lan(1, subnet="10.77.0"), make_lan(1, subnet="10.78.0")
    run("ip", "-n", net_a.switch, "addr", "add", "10.77.0.254/24", "dev", "br0")
    run("ip", "link", "add", "natsb", "netns", net_a.switch, "type", "veth", "peer", "name",
        "natsbp", "netns", net_b.switch)  # fmt: skip
    run("ip", "-n", net_b.switch, "link", "set", "natsbp", "master", "br0")
    run("ip", "-n", net_b.switch, "link", "set", "natsbp", "up")
    run("ip", "-n", net_a.switch, "addr", "add", "10.78.0.254/24", "dev", "natsb")
    run("ip", "-n", net_a.switch, "link", "set", "natsb", "up")
    prefix = ["ip", "netns", "exec", net_a.switch]
    server = _nats_script().NatsServer(
        tmp_path / "nats", host="0.0.0.0", port=NATS_PORT, prefix=prefix
    )
    server.http_port = 8222
    server.start()
    try:
        # No route between the networks: b's host cannot even open a TCP connection to a's.
        probe = (
            "import socket,sys\n"
            "try:\n socket.create_connection(('10.77.0.1', 9001), timeout=2); sys.exit(0)\n"
            "except OSError: sys.exit(3)\n"
        )
        assert net_b.exec(1, [venv_python(), "-c", probe]).returncode == 3
        secret = secrets.token_urlsafe(32)
        a = start_agent(net_a, 1, tmp_path, "a", secret, f"nats://10.77.0.254:{NATS_PORT}")
        b = start_agent(net_b, 1, tmp_path, "b", secret, f"nats://10.78.0.254:{NATS_PORT}")
        a.insert("from network A. ")
        wait_text([a, b], lambda t: t == "from network A. ", 30.0)
        b.insert("from network B. ")
        wait_text([a, b], lambda t: "from network B." in t, 15.0)
        for i in range(1000):
            (a if i % 2 else b).insert(f"{i},")
        final = wait_text([a, b], lambda t: t.count(",") == 1000, 60.0)
        assert a.peers() == set() and b.peers() == set()  # never a mesh link: only NATS

        net_b.add_host()  # a latecomer on network B catches up from the stream
        c = start_agent(net_b, 2, tmp_path, "c", secret, f"nats://10.78.0.254:{NATS_PORT}")
        wait_text([c], lambda t: t == final, 60.0)
        assert sorted(int(x) for x in final.split(". ")[-1].split(",") if x) == list(range(1000))
    finally:
        server.stop()
