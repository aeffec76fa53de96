"""`unity-crdt jobs`, `unity-crdt leases` and the work line of `status`, against a live node."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from unity_crdt import Node, NodeConfig
from unity_crdt.cli._work import job_bar
from unity_crdt.frontends.control import ControlServer

SCRIPT = str(Path(sys.executable).with_name("unity-crdt"))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, timeout=30, env=dict(os.environ)
    )


def test_job_bar_shows_done_failed_and_running() -> None:
    bar = job_bar({"total": 8, "done": 4, "failed": 1, "running": 2})
    assert bar == "[############!!!>>>>>>...]  62%"
    assert job_bar({"total": 0, "done": 0, "failed": 0, "running": 0}).endswith("  0%")


async def test_jobs_and_leases_commands(tmp_path: Path) -> None:
    cache = tmp_path / "n"
    cfg = NodeConfig(name="n", cache_dir=cache, group_secret="cli work secret " * 3, mdns=False)
    async with Node(cfg) as node:
        server = ControlServer(node)
        await server.start()
        try:

            @node.worker("sq", concurrency=2)
            async def sq(task: Any) -> int:
                return int(task.input) ** 2

            job = await node.submit("sq", [1, 2, 3], lease=5.0)
            assert await job.results(timeout=10) == [1, 4, 9]
            async with node.lease("session/user-42", ttl=5.0) as lease:
                jobs = await asyncio.to_thread(cli, "jobs", "--cache-dir", str(cache))
                leases = await asyncio.to_thread(cli, "leases", "--cache-dir", str(cache))
                status = await asyncio.to_thread(cli, "status", "--cache-dir", str(cache))
        finally:
            await server.close()
    assert jobs.returncode == 0, jobs.stderr
    assert job.id in jobs.stdout and "3/3" in jobs.stdout and "100%" in jobs.stdout
    assert leases.returncode == 0, leases.stderr
    assert "session/user-42" in leases.stdout and str(lease.token) in leases.stdout
    assert "mode lan" in leases.stdout
    assert status.returncode == 0, status.stderr
    assert "work    lan; works on sq; running 0; 1 job (0 open), 1 lease held" in status.stdout


def test_the_collective_demo_splits_a_job_across_three_nodes() -> None:
    demo = Path(__file__).resolve().parents[2] / "demos" / "collective.py"
    res = subprocess.run([sys.executable, str(demo)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "three nodes linked, lan mode" in res.stdout
    assert "results in input order" in res.stdout
    assert "three opinions per input: [['ada', 'grace', 'linus']" in res.stdout
    assert "accepted=False" in res.stdout
