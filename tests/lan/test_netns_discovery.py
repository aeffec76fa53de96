"""Discovery over real multicast between network namespaces: faults, partitions, strangers.

Each host runs AGENT (below): a Discovery on its eth0 address that prints one JSON line per
event and takes "refresh" / "quit" on stdin.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from netns import Lan, Proc

pytestmark = pytest.mark.lan

PORT = 9000

AGENT = r"""
import asyncio, json, signal, sys, time
from unity_crdt.net.mdns import Discovery

def emit(**kw):
    print(json.dumps(kw), flush=True)

async def main():
    cfg = json.loads(sys.argv[1])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Before registration, so an early stop still sends goodbyes.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    d = Discovery(beacon=cfg["beacon"], port=cfg["port"], interfaces=[cfg["ip"]],
                  requery_interval=cfg["requery"],
                  on_found=lambda f: emit(event="found", url=f.url, t=time.monotonic()))
    await d.start()
    emit(event="ready", instance=d.instance, t=time.monotonic())
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands():
        while line := (await reader.readline()).decode().strip():
            if line == "refresh":
                await d.refresh()
                emit(event="refreshed")
            elif line == "quit":
                break
        stop.set()

    task = asyncio.create_task(commands())
    await stop.wait()
    task.cancel()
    await d.close()
    emit(event="closed", stats=d.stats())

asyncio.run(main())
"""


def start_agent(lan: Lan, i: int, beacon: str, requery: float) -> Proc:
    """Run AGENT on host i and wait until its service is registered."""
    cfg = {"beacon": beacon, "port": PORT, "ip": lan.hosts[i].ip, "requery": requery}
    proc = lan.python(i, "-c", AGENT, json.dumps(cfg))
    proc.wait_for(lambda e: e.get("event") == "ready", timeout=15)
    return proc


def found_hosts(events: Iterable[dict[str, Any]]) -> set[int]:
    """Host numbers reported by on_found (urls are ws://10.77.0.<i>:PORT)."""
    out: set[int] = set()
    for e in events:
        if e.get("event") == "found":
            m = re.fullmatch(rf"ws://10\.77\.0\.(\d+):{PORT}", e["url"])
            assert m, f"unexpected candidate {e['url']}"
            out.add(int(m.group(1)))
    return out


def wait_found(proc: Proc, hosts: set[int], timeout: float) -> None:
    """Block until proc has reported at least the given hosts."""
    proc.wait_until(
        lambda evs: hosts <= found_hosts(evs), timeout, f"host {proc.host.index} finds {hosts}"
    )


def wait_all(procs: dict[int, Proc], expected: Callable[[int], set[int]], timeout: float) -> float:
    """Wait until every proc found expected(i); returns the seconds it took."""
    t0 = time.monotonic()
    for i, proc in procs.items():
        wait_found(proc, expected(i), max(0.1, timeout - (time.monotonic() - t0)))
    return time.monotonic() - t0


def beacon() -> str:
    return secrets.token_hex(8).upper()


def test_hosts_discover_each_other_and_never_another_group(make_lan: Callable[..., Lan]) -> None:
    lan = make_lan(5)
    group, stranger = beacon(), beacon()
    t0 = time.monotonic()
    procs = {i: start_agent(lan, i, group, requery=30.0) for i in range(1, 5)}
    other = start_agent(lan, 5, stranger, requery=30.0)
    members = set(procs)
    took = wait_all(procs, lambda i: members - {i}, timeout=10.0)
    print(
        f"4 hosts discovered each other {time.monotonic() - t0:.2f}s after the first start "
        f"({took:.2f}s after the last was registered)"
    )
    time.sleep(1.0)  # the stranger's announcements have long arrived by now
    for i, proc in procs.items():
        assert found_hosts(proc.snapshot()) == members - {i}, "only same-group peers, never self"
    assert found_hosts(other.snapshot()) == set()
    # Goodbyes on exit: a clean stop reports the stats line.
    procs[1].send("quit")
    closed = procs[1].wait_for(lambda e: e.get("event") == "closed", timeout=5)
    assert closed["stats"]["pending"] == 0


@pytest.mark.slow
def test_new_host_during_partition_is_found_after_link_up_by_requery(
    make_lan: Callable[..., Lan],
) -> None:
    lan = make_lan(5)
    group = beacon()
    t_start = time.monotonic()
    procs = {i: start_agent(lan, i, group, requery=3.0) for i in range(1, 5)}
    wait_all(procs, lambda i: {1, 2, 3, 4} - {i}, timeout=10.0)

    lan.link_down(1)
    procs[5] = start_agent(lan, 5, group, requery=3.0)
    wait_found(procs[5], {2, 3, 4}, timeout=8.0)
    wait_all({i: procs[i] for i in (2, 3, 4)}, lambda i: {5}, timeout=8.0)
    # Hold the partition until every browser's startup queries are over (~14 s), so only the
    # periodic re-query can bring host 5 and host 1 together.
    time.sleep(max(0.0, t_start + 16.0 - time.monotonic()))
    assert 5 not in found_hosts(procs[1].snapshot()), "host 1 was cut off"
    assert 1 not in found_hosts(procs[5].snapshot())

    t_up = time.monotonic()
    lan.link_up(1)
    wait_found(procs[1], {5}, timeout=8.0)
    wait_found(procs[5], {1}, timeout=8.0)
    print(f"rediscovered {time.monotonic() - t_up:.2f}s after link up (requery every 3 s)")


def test_split_brain_then_heal_with_refresh(make_lan: Callable[..., Lan]) -> None:
    lan = make_lan(4)
    group = beacon()
    # No periodic re-query here: healing relies on refresh(), which the node calls on link up.
    procs = {i: start_agent(lan, i, group, requery=600.0) for i in range(1, 5)}
    wait_all(procs, lambda i: {1, 2, 3, 4} - {i}, timeout=10.0)

    lan.split([3, 4])
    lan.add_host(bridge="br1")
    procs[5] = start_agent(lan, 5, group, requery=600.0)
    wait_found(procs[5], {3, 4}, timeout=8.0)
    wait_all({3: procs[3], 4: procs[4]}, lambda i: {5}, timeout=8.0)
    time.sleep(0.5)
    for i in (1, 2):
        assert 5 not in found_hosts(procs[i].snapshot()), "split brain: br0 cannot see host 5"
    assert found_hosts(procs[5].snapshot()) == {3, 4}

    lan.heal()
    # (Startup queries of the browsers, ~14 s long, may merge the halves too; the partition
    # test above holds the cut past them to show that only re-queries heal later splits.)
    t_heal = time.monotonic()
    for proc in procs.values():
        proc.send("refresh")
    wait_all(procs, lambda i: {1, 2, 3, 4, 5} - {i}, timeout=6.0)
    print(f"halves merged {time.monotonic() - t_heal:.2f}s after refresh()")


def test_discovery_survives_ten_percent_loss(make_lan: Callable[..., Lan]) -> None:
    lan = make_lan(4)
    for i in lan.hosts:
        lan.loss(i, 10.0)  # both directions: ~19% of packets lost between two hosts
    group = beacon()
    procs = {i: start_agent(lan, i, group, requery=3.0) for i in range(1, 5)}
    took = wait_all(procs, lambda i: {1, 2, 3, 4} - {i}, timeout=15.0)
    print(f"discovered under 10% loss per direction in {took:.2f}s")


ECHO = r"""
import json, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7000))
print(json.dumps({"ready": 1}), flush=True)
while True:
    data, addr = s.recvfrom(64)
    s.sendto(data, addr)
"""

PROBE = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.01)
ok = 0
for _ in range(int(sys.argv[2])):
    try:
        s.sendto(b"x", (sys.argv[1], 7000))
        s.recvfrom(64)
        ok += 1
    except OSError:
        pass
print(json.dumps({"ok": ok}), flush=True)
"""


def test_kit_faults_really_cut_traffic(make_lan: Callable[..., Lan]) -> None:
    lan = make_lan(3)
    for i in (2, 3):
        lan.python(i, "-c", ECHO).wait_for(lambda e: e.get("ready") == 1, timeout=10)

    def echoes(target: int, n: int = 10) -> int:
        proc = lan.python(1, "-c", PROBE, lan.hosts[target].ip, str(n))
        return int(proc.wait_for(lambda e: "ok" in e, timeout=30)["ok"])

    assert echoes(2) == 10 and echoes(3) == 10
    lan.link_down(2)
    assert echoes(2) == 0 and echoes(3) == 10
    lan.link_up(2)
    assert echoes(2) == 10
    lan.link_down(3, side="host")
    lan.link_up(3, side="host")
    assert "224.0.0.0/4" in lan.exec(3, ["ip", "route"]).stdout  # re-added after eth0 up
    assert echoes(3) == 10
    lan.split([3])
    assert echoes(2) == 10 and echoes(3) == 0
    lan.heal()
    assert echoes(3) == 10
    lan.loss(1, 30.0)  # request and reply each cross a filter of host 1: ~49% get through
    got = echoes(2, 300)
    assert 90 < got < 210, got
    lan.clear_loss(1)
    assert echoes(2) == 10
