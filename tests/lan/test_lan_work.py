"""Collective work across a LAN partition (network namespaces, LAN mode: no coordination server).

Three hosts work on one job; host 3's cable moves to another switch for a while, then back.
While split, each side sees the other's claims expire and runs those tasks itself: the only
tasks that run twice are ones claimed during the split; every result counts once; the losers
of a duplicate see `task.lost`.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from netns import Lan

pytestmark = [pytest.mark.lan, pytest.mark.slow]

_KIT = Path(__file__).resolve().parents[1] / "nats" / "workkit.py"
_spec = importlib.util.spec_from_file_location("workkit", _KIT)
assert _spec is not None and _spec.loader is not None
workkit: Any = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("workkit", workkit)
_spec.loader.exec_module(workkit)

PORT = 9001


def test_partition_duplicates_only_what_was_claimed_while_split(
    make_lan: Callable[..., Lan], tmp_path: Path
) -> None:
    lan = make_lan(3)
    agents = []
    for i in (1, 2, 3):
        peers = [f"ws://{lan.hosts[j].ip}:{PORT}" for j in range(1, i)]

        def spawn(argv: list[str], i: int = i) -> Any:
            return lan.python(i, *argv[1:], env={"UC_WORK_SECRET": workkit.SECRET})

        agents.append(
            workkit.start_agent(
                tmp_path,
                f"h{i}",
                spawn=spawn,
                ip=lan.hosts[i].ip,
                port=PORT,
                peers=peers,
                coordination="off",
                concurrency=3,
                ping_interval=0.5,
                idle_timeout=2.0,
            )
        )
    workkit.wait_mesh(agents)
    workkit.wait_live(agents, 3)
    lease = 3.0
    inputs = [{"v": i, "sleep": 0.8} for i in range(90)]
    job = agents[0].request(op="submit", inputs=inputs, lease=lease)["job"]
    time.sleep(1.5)
    lan.split([3])
    split_at = time.monotonic()
    time.sleep(2.0 + lease + 3.0)  # the link drops, the lease runs out, each side takes over
    lan.heal()
    healed_at = time.monotonic()
    got = agents[0].results(job, 120)
    assert got["results"] == [{"y": 2 * i} for i in range(90)]  # each counted once
    # Every node agrees on the results once healed.
    assert agents[2].results(job, 60)["results"] == got["results"]
    runs = workkit.all_runs(tmp_path, agents)
    assert len(runs) == 90
    dupes = {t: r for t, r in runs.items() if len(r) > 1}
    assert dupes, "the partition caused no duplicate at all: the test proves nothing"
    window = (split_at - 0.5, healed_at + 3.0)  # claims in flight when the link went
    for task, task_runs in dupes.items():
        outside = [r for r in task_runs if not window[0] <= r["start"] <= window[1]]
        assert len(outside) <= 1, f"{task} ran twice outside the split: {task_runs}"
    lost = [r for rs in runs.values() for r in rs if r["lost"]]
    assert lost, "no loser saw task.lost"
    assert all(r["id"] in dupes for r in lost)
    print(f"{len(dupes)} duplicated while split, {len(lost)} losers saw task.lost")
