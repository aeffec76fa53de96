"""The demo and the CLI as a user runs them: real subprocesses, real nodes, real caches."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pycrdt
import pytest

from unity_crdt import Node, NodeConfig
from unity_crdt.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
LINES = ("alice: bring the tent", "bob: bring the stove", "carol: bring the map")


def run_demo(*args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run demos/lan_merge.py like `make demo` does; return the result and its cache root."""
    res = subprocess.run(
        [sys.executable, "demos/lan_merge.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"caches  : (\S+)/<node>", res.stdout)
    assert m, f"no cache dir in the output:\n{res.stdout}\n{res.stderr}"
    return res, Path(m.group(1))


def leftover_processes(marker: str) -> list[str]:
    """Command lines of live processes mentioning marker (the demo's cache root)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd:
            found.append(cmd)
    return found


@pytest.mark.slow
def test_demo_converges_and_leaves_nothing_behind() -> None:
    res, work = run_demo()
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    before, _, after = out.partition("\nconverged:")
    assert after, f"no convergence reported:\n{out}"
    # Offline, each node only has its own line; after merging every column has all three.
    for line in LINES:
        assert before.count(line) == 1, before
        assert after.count(line) == 3, after
    assert "and snacks" not in after, "carol's offline deletion must survive the merge"
    assert re.search(r"\d+\.\d\d s after the last node came online", after)
    assert not work.exists(), "the temp cache root must be removed without --keep"
    assert leftover_processes(str(work)) == []


@pytest.mark.slow
def test_demo_keep_leaves_caches_that_hold_the_merged_doc(tmp_path: Path) -> None:
    res, work = run_demo("--keep")
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"caches kept in {work}" in res.stdout
        assert leftover_processes(str(work)) == []
        assert sorted(p.name for p in work.iterdir()) == ["alice", "bob", "carol"]

        async def text_in(cache: Path) -> str:
            # Offline reopen: what the cache holds on disk, nothing from the network.
            # Any secret opens a cache: the group secret guards links, not the local files.
            cfg = NodeConfig(name="reader", cache_dir=cache, group_secret="reader only", mdns=False)
            async with Node(cfg) as node:
                return str(node.doc("trip").get("list", type=pycrdt.Text))

        texts = {asyncio.run(text_in(work / name)) for name in ("alice", "bob", "carol")}
        assert len(texts) == 1
        (text,) = texts
        assert sorted(text.splitlines()) == sorted(LINES)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def unity_crdt_command() -> list[str]:
    """The installed console script (pyproject's [project.scripts])."""
    script = Path(sys.executable).with_name("unity-crdt")
    assert script.exists(), "the venv has no unity-crdt script: pip install -e ."
    return [str(script)]


def test_keygen_prints_fresh_salted_v1_secrets() -> None:
    argv = [*unity_crdt_command(), "keygen"]
    runs = [subprocess.run(argv, capture_output=True, text=True, timeout=30) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0]
    secrets = [r.stdout.strip() for r in runs]
    for s in secrets:
        m = re.fullmatch(r"ucg1\.([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})", s)
        assert m, s
        assert len(base64.urlsafe_b64decode(m[1] + "==")) == 16
        assert len(base64.urlsafe_b64decode(m[2] + "=")) == 32
    assert secrets[0].split(".")[1] != secrets[1].split(".")[1]
    salted = subprocess.run(
        [*argv, "--passphrase"], input="correct horse battery\n", capture_output=True, text=True
    )
    assert re.fullmatch(r"ucg1\.[A-Za-z0-9_-]{22}\.correct horse battery\n", salted.stdout)


def test_python_dash_m_runs_the_same_cli() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "unity_crdt", "keygen"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert re.fullmatch(r"ucg1\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}\n", res.stdout)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["bogus"], "invalid choice: 'bogus'"), (["demo", "--nope"], "unrecognized arguments")],
)
def test_usage_errors_are_one_line_with_a_hint_and_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "unity-crdt --help" in err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([]) == 2
    err = capsys.readouterr().err
    assert "demo" in err and "keygen" in err
