"""SIGKILL a writer at random moments: every append that returned survives, the cache reopens."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pycrdt
import pytest

from unity_crdt.store.sqlite import SqliteStore

WRITER = Path(__file__).parent / "store_writer.py"
ROOT = Path(__file__).parents[2]
DOC = "crash/ünïcode ✓"
KILLS = 24


def _run_and_kill(cache_dir: Path, run: int, rng: random.Random) -> list[str]:
    """Start a writer, SIGKILL it at a random moment, return the keys it acknowledged."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), "append", str(cache_dir), str(run)],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    if run % 4 == 0:
        time.sleep(rng.uniform(0.0, 0.3))  # sometimes kill during start-up or open
    else:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.01, 0.6))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == -signal.SIGKILL
    # A line cut by the kill has no newline: it was acknowledged, but skipping it only
    # weakens the check.
    return [line for line in out.decode().split("\n")[:-1] if line != "ready"]


@pytest.mark.slow
async def test_acknowledged_appends_survive_sigkill(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="unity_crdt.store")
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    acked: list[str] = []
    started = time.monotonic()
    for run in range(KILLS):
        acked += _run_and_kill(tmp_path, run, rng)
        async with SqliteStore(tmp_path) as store:  # a dead holder leaves no lock behind
            assert store.recovered_from is None
            doc: pycrdt.Doc[Any] = pycrdt.Doc()
            for blob in await store.load(DOC):
                doc.apply_update(blob)
            entries = doc.get("map", type=pycrdt.Map)
            missing = [key for key in acked if key not in entries]
            assert not missing, f"run {run}: {len(missing)} acknowledged updates lost"
            assert all(entries[key] == f"é{key.split(':')[1]}" for key in acked)
    assert len(acked) > 500, f"only {len(acked)} appends acknowledged in {KILLS} runs"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert time.monotonic() - started < 60
