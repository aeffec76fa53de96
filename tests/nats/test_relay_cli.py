"""`unity-crdt run --relay URL`: the banner and `status` show the relay, up or down."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.nats

SCRIPT = str(Path(sys.executable).with_name("unity-crdt"))
ENV = dict(os.environ, UNITY_CRDT_SECRET="cli relay test secret", PYTHONUNBUFFERED="1")


def status(cache: Path) -> dict[str, Any]:
    res = subprocess.run(
        [SCRIPT, "status", "--json", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
    )
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def poll(fn: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def test_run_with_a_relay_that_is_down_then_up(nats_server: Any, tmp_path: Path) -> None:
    nats_server.kill()  # down: the node must start anyway and say why
    cache = tmp_path / "n"
    argv = [SCRIPT, "run", "--no-mdns", "--cache-dir", str(cache), "--relay", nats_server.url]
    proc = subprocess.Popen(
        argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        banner = "".join(proc.stdout.readline() for _ in range(8))
        assert re.search(rf"relay\s+{re.escape(nats_server.url)}", banner), banner
        down = poll(lambda: (r := status(cache)["relay"]) and r["error"] and r)
        assert down["connected"] is False and "connect call failed" in down["error"].lower()
        table = subprocess.run(
            [SCRIPT, "status", "--cache-dir", str(cache)], capture_output=True, text=True, env=ENV
        ).stdout
        assert re.search(r"^relay\s+nats://127\.0\.0\.1:\d+\s+NOT connected", table, re.M), table
        nats_server.restart()
        up = poll(lambda: (r := status(cache)["relay"]) and r["connected"] and r)
        assert up["server"] == nats_server.url and up["error"] is None and up["outbox"] == 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
