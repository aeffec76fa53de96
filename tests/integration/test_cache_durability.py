"""Every acknowledged edit was fsynced first: seen from outside the process, with strace.

A real node (tests/integration/store_writer.py, mode `node`) makes an edit, awaits
`Node.flush()` and only then prints the edit's key. Under `strace -f`, each key must show
up in a write to the WAL (`store.sqlite3-wal`) followed by an fdatasync/fsync of the WAL,
both before the key is printed. A `flush()` that returns early, or SQLite's synchronous=OFF
or NORMAL (which in WAL mode syncs only at checkpoints), makes this test fail: see
docs/operations.md, "Mutation checks".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WRITER = Path(__file__).parent / "store_writer.py"
ROOT = Path(__file__).parents[2]
ACKS = 60
# pid, time, call(fd<path>, rest   |   pid, time, <... call resumed>rest
_CALL = re.compile(r"^(\d+)\s+\S+\s+(\w+)\((\d+)<([^>]*)>(.*)$")
_RESUMED = re.compile(r"^(\d+)\s+\S+\s+<\.\.\. (\w+) resumed>(.*)$")
_KEY = re.compile(rb"ack-\d{6}")


def events(trace: str) -> list[tuple[str, str, str]]:
    """(call, path, text) per completed syscall, in order of completion."""
    out: list[tuple[str, str, str]] = []
    unfinished: dict[str, tuple[str, str, str]] = {}
    for line in trace.splitlines():
        if m := _CALL.match(line):
            pid, call, _, path, rest = m.groups()
            if rest.endswith("<unfinished ...>"):
                unfinished[pid] = (call, path, rest)
            else:
                out.append((call, path, rest))
        elif (m := _RESUMED.match(line)) and m.group(1) in unfinished:
            call, path, rest = unfinished.pop(m.group(1))
            out.append((call, path, rest + m.group(3)))
    return out


def check(trace: str) -> tuple[int, list[str]]:
    """How many acknowledgements were seen, and those not durable when printed."""
    written: dict[bytes, int] = {}  # key -> index of the last WAL write holding it
    synced = -1  # index of the last completed WAL sync
    acked, early = 0, []
    for i, (call, path, text) in enumerate(events(trace)):
        wal = path.endswith("store.sqlite3-wal")
        if call in ("pwrite64", "write") and wal:
            for key in _KEY.findall(text.encode()):
                written[key] = i
        elif call in ("fdatasync", "fsync") and wal and text.rstrip().endswith("= 0"):
            synced = i
        elif call == "write" and not wal and (keys := _KEY.findall(text.encode())):
            for key in keys:
                acked += 1
                at = written.get(key)
                if at is None:
                    early.append(f"{key.decode()}: acknowledged before it was written")
                elif synced < at:
                    early.append(f"{key.decode()}: acknowledged before the WAL was synced")
    return acked, early


def test_every_acknowledged_edit_was_fsynced_before(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing: scripts/system-deps.sh installs it (make test runs it)")
    trace = tmp_path / "trace.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [strace, "-f", "-tt", "-y", "-s", "65536", "-o", str(trace)]
    cmd += ["-e", "trace=fsync,fdatasync,write,pwrite64"]
    cmd += [sys.executable, str(WRITER), "node", str(tmp_path / "cache"), str(ACKS)]
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    if b"ptrace" in done.stderr and done.returncode != 0:
        pytest.fail(f"strace cannot trace here: {done.stderr.decode()[:300]}")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == [f"ack-{i:06d}" for i in range(ACKS)]
    acked, early = check(trace.read_text(errors="replace"))
    assert acked == ACKS, f"saw {acked} acknowledgements in the trace"
    assert not early, early[:5]
