"""The demo in --netns mode: three hosts of a namespaced LAN merge over real multicast."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from netns import REPO

pytestmark = pytest.mark.lan


def namespaces() -> list[str]:
    """Every network namespace on the machine (first word of `ip netns list`)."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split(" ", 1)[0] for line in res.stdout.splitlines()]


def test_netns_demo_converges_over_multicast_and_removes_its_lan() -> None:
    proc = subprocess.Popen(
        [sys.executable, "demos/lan_merge.py", "--netns"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    # Each node listened on its own host's eth0 address, so they met across the bridge.
    urls = set(re.findall(r"came online at ws://(10\.77\.0\.\d+):\d+", out))
    assert urls == {"10.77.0.1", "10.77.0.2", "10.77.0.3"}, out
    _, _, after = out.partition("\nconverged:")
    for line in ("alice: bring the tent", "bob: bring the stove", "carol: bring the map"):
        assert after.count(line) == 3, out
    ours = [ns for ns in namespaces() if ns.startswith(f"uclan-{proc.pid}-")]
    assert ours == [], f"namespaces left behind: {ours}"
