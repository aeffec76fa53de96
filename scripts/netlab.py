"""A LAN of network namespaces on one machine, for tests that need real multicast and faults.

Layout: one "switch" namespace holding bridges
`br0` (and `br1` once split), and N host namespaces, each with `eth0` = 10.77.0.<i>/24 wired to
port `p<i>` of a bridge. Hosts have no default route and the switch is isolated, so nothing
leaves the machine. Every name carries a per-run prefix, so parallel runs never collide.

    with Lan(hosts=3) as lan:
        proc = lan.python(1, "-c", "print('{\\"hello\\": 1}')")
        proc.wait_for(lambda e: e.get("hello") == 1)
        lan.link_down(2); lan.split([3]); lan.loss(1, 10.0); lan.heal()

Needs root and iproute2 (`ip`, `tc`); scripts/system-deps.sh installs the latter. The demo
(`unity-crdt demo --netns`, from a source checkout) and the LAN test tier (tests/lan) both
build on this module; it is a development kit, not part of the installed package.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unity_crdt.cli._procs import JsonProc, program_env

__all__ = ["REPO", "Host", "Lan", "Proc", "sweep_stale", "unavailable_reason", "venv_python"]

REPO = Path(__file__).resolve().parents[1]  # the source checkout this kit lives in
_KIT = "uclan"  # marks namespaces made by this kit (see sweep_stale)
_SWITCH = "sw"


def unavailable_reason() -> str | None:
    """Why this machine cannot build a namespaced LAN, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns, veth, tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}: run scripts/system-deps.sh (installs iproute2)"
    return None


def venv_python() -> str:
    """The project's interpreter, which has zeroconf and the other dependencies."""
    candidate = REPO / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a setup command; a failure names the command and its stderr."""
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _ns_pids(ns: str) -> list[int]:
    """Processes living in a namespace (`ip netns pids`)."""
    res = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _delete_namespace(ns: str) -> None:
    """Kill what runs inside a namespace of ours, then delete it (veths go with it)."""
    for pid in _ns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _run(["ip", "netns", "del", ns], check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces left by earlier runs of this kit whose creating process is gone."""
    removed: list[str] = []
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        ns = line.split(" ", 1)[0]
        parts = ns.split("-")
        if len(parts) < 4 or parts[0] != _KIT or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # its owner is alive: maybe a parallel run
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _delete_namespace(ns)
        removed.append(ns)
    return removed


class Proc(JsonProc):
    """A command running inside a host of a Lan; each stdout JSON-object line is an event."""

    def __init__(self, host: Host, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.host = host
        super().__init__(["ip", "netns", "exec", host.ns, *argv], env, label=host.ns)
        self.argv = list(argv)


@dataclass
class Host:
    """One host of the LAN: its namespace, address and the bridge its cable plugs into."""

    index: int
    ns: str
    ip: str
    bridge: str = "br0"
    procs: list[Proc] = field(default_factory=list)


class Lan:
    """A switch namespace with bridges, plus host namespaces wired to it; torn down on close."""

    def __init__(self, hosts: int = 0, *, subnet: str = "10.77.0") -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.prefix = f"{_KIT}-{os.getpid()}-{secrets.token_hex(2)}-"
        self.subnet = subnet
        self.switch = self.prefix + _SWITCH
        self.hosts: dict[int, Host] = {}
        self._namespaces: list[str] = []
        self._bridges: set[str] = set()
        self._closed = False
        try:
            self._add_namespace(self.switch)
            self._ensure_bridge("br0")
            for _ in range(hosts):
                self.add_host()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- topology -----------------------------------------------------------------------------

    def _add_namespace(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _ensure_bridge(self, bridge: str) -> None:
        if bridge in self._bridges:
            return
        # No STP (ports forward at once) and no snooping (multicast floods every port).
        _run(
            [
                "ip",
                "-n",
                self.switch,
                "link",
                "add",
                bridge,
                "type",
                "bridge",
                "stp_state",
                "0",
                "mcast_snooping",
                "0",
            ]
        )
        _run(["ip", "-n", self.switch, "link", "set", bridge, "up"])
        self._bridges.add(bridge)

    def add_host(self, bridge: str = "br0") -> Host:
        """Create host namespace h<i> with eth0 = <subnet>.<i>/24 on the given bridge."""
        index = len(self.hosts) + 1
        if index > 250:
            raise ValueError("at most 250 hosts per LAN")
        host = Host(index, f"{self.prefix}h{index}", f"{self.subnet}.{index}", bridge)
        self._add_namespace(host.ns)
        port = f"p{index}"
        _run(
            [
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                host.ns,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.switch,
            ]
        )
        _run(["ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
        _run(["ip", "-n", host.ns, "link", "set", "eth0", "up"])
        self._add_multicast_route(host)
        self._ensure_bridge(bridge)
        _run(["ip", "-n", self.switch, "link", "set", port, "master", bridge])
        _run(["ip", "-n", self.switch, "link", "set", port, "up"])
        self.hosts[index] = host
        return host

    def _add_multicast_route(self, host: Host) -> None:
        _run(["ip", "-n", host.ns, "route", "replace", "224.0.0.0/4", "dev", "eth0"])

    def link_down(self, i: int, side: str = "switch") -> None:
        """Pull host i's cable: its switch port down ("switch") or its own eth0 ("host")."""
        if side == "switch":
            _run(["ip", "-n", self.switch, "link", "set", f"p{i}", "down"])
        elif side == "host":
            _run(["ip", "-n", self.hosts[i].ns, "link", "set", "eth0", "down"])
        else:
            raise ValueError("side is 'switch' or 'host'")

    def link_up(self, i: int, side: str = "switch") -> None:
        """Plug host i's cable back in (re-adding the multicast route eth0-down flushed)."""
        if side == "switch":
            _run(["ip", "-n", self.switch, "link", "set", f"p{i}", "up"])
        elif side == "host":
            _run(["ip", "-n", self.hosts[i].ns, "link", "set", "eth0", "up"])
            self._add_multicast_route(self.hosts[i])
        else:
            raise ValueError("side is 'switch' or 'host'")

    def split(self, hosts_on_br1: Iterable[int]) -> None:
        """Split brain: move the given hosts' ports to a second, unconnected bridge br1."""
        self._ensure_bridge("br1")
        for i in hosts_on_br1:
            self._move(i, "br1")

    def heal(self) -> None:
        """Undo split(): every port back on br0."""
        for i, host in self.hosts.items():
            if host.bridge != "br0":
                self._move(i, "br0")

    def _move(self, i: int, bridge: str) -> None:
        _run(["ip", "-n", self.switch, "link", "set", f"p{i}", "master", bridge])
        self.hosts[i].bridge = bridge

    def loss(self, i: int, pct: float, direction: str = "both") -> None:
        """Drop pct % of host i's packets at random (egress, ingress or both) via classic BPF.

        netem is not available here, so a 4-instruction cBPF program on a clsact qdisc does it:
        load a random u32 and drop (TC_ACT_SHOT) when it is below pct * 2^32.
        """
        if not 0 <= pct <= 100:
            raise ValueError("pct must be within 0..100")
        dirs = ["egress", "ingress"] if direction == "both" else [direction]
        ns = self.hosts[i].ns
        self.clear_loss(i)
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "clsact"])
        thr = min(int(pct / 100 * 2**32), 2**32 - 1)
        code = f"4,32 0 0 4294963256,53 0 1 {thr},6 0 0 0,6 0 0 2"
        for d in dirs:
            _run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "filter",
                    "add",
                    "dev",
                    "eth0",
                    d,
                    "bpf",
                    "da",
                    "bytecode",
                    code,
                ]
            )

    def clear_loss(self, i: int) -> None:
        """Remove host i's loss filters."""
        _run(
            [
                "ip",
                "netns",
                "exec",
                self.hosts[i].ns,
                "tc",
                "qdisc",
                "del",
                "dev",
                "eth0",
                "clsact",
            ],
            check=False,
        )

    # -- programs -----------------------------------------------------------------------------

    def spawn(self, i: int, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        """Start any command inside host i; collect its stdout JSON lines as events."""
        proc = Proc(self.hosts[i], argv, program_env(env))
        self.hosts[i].procs.append(proc)
        return proc

    def python(self, i: int, *args: str, env: Mapping[str, str] | None = None) -> Proc:
        """Run the project's Python (repo on PYTHONPATH) inside host i."""
        return self.spawn(i, [venv_python(), *args], env)

    def exec(self, i: int, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run a short command inside host i and wait for it (no check)."""
        return _run(["ip", "netns", "exec", self.hosts[i].ns, *argv], check=False)

    def close(self) -> None:
        """Stop every program, kill stragglers, delete every namespace; safe to repeat."""
        if self._closed:
            return
        self._closed = True
        procs = [proc for host in self.hosts.values() for proc in host.procs]
        for proc in procs:  # all at once: each sends goodbyes for ~0.3 s
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop(timeout=2.0)
        for ns in reversed(self._namespaces):
            _delete_namespace(ns)
        self._namespaces.clear()
