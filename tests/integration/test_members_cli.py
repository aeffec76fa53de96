"""`unity-crdt members`, `invite` and `revoke` against `unity-crdt run` processes."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import SECRET, RunningNode, cli, poll

pytestmark = pytest.mark.slow


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="uc-mem-"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def members(cache: Path) -> list[dict[str, str]]:
    res = cli("members", "--json", "--cache-dir", str(cache))
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout)["members"])


def test_members_invite_revoke_between_processes(short_tmp: Path) -> None:
    config = short_tmp / "node.toml"
    config.write_text("[node]\nmdns = false\nanti_entropy_interval = 0.5\nreconnect_max = 1.0\n")
    common = ("--config", str(config))
    nodes: list[RunningNode] = []
    try:
        alice = RunningNode("--name", "alice", "--cache-dir", str(short_tmp / "a"), *common)
        nodes.append(alice)
        url = alice.wait_for(r"listening\s+(ws://\S+)").group(1)
        for name in ("bob", "carol"):
            nodes.append(
                RunningNode(
                    "--name", name, "--cache-dir", str(short_tmp / name[0]), "--peer", url, *common
                )
            )
        carol = nodes[2]
        assert poll(lambda: len(members(short_tmp / "a")) == 3), alice.output

        shown = cli("members", "--cache-dir", str(short_tmp / "a"))
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"group\s+epoch 0, this device member, 3 active members", shown.stdout)
        assert re.search(r"carol\s+[a-z2-7]{26}\s+active\s+itself \(group secret\)", shown.stdout)

        invited = cli("invite", "--ttl", "120", "--cache-dir", str(short_tmp / "a"))
        assert invited.returncode == 0, invited.stderr
        code = invited.stdout.strip()
        assert code.startswith("uci1.") and "single use, valid 2m 00s" in invited.stderr
        code_file = short_tmp / "code"
        code_file.write_text(code)
        dave = RunningNode(
            "--name",
            "dave",
            "--cache-dir",
            str(short_tmp / "d"),
            "--secret-file",
            str(code_file),
            "--peer",
            url,
            *common,
        )
        nodes.append(dave)
        dave.wait_for(r"peer joined: alice")
        roster = {m["name"]: m for m in members(short_tmp / "a")}
        assert poll(lambda: "dave" in {m["name"] for m in members(short_tmp / "a")})
        roster = {m["name"]: m for m in members(short_tmp / "a")}
        assert roster["dave"]["added_by"] == roster["alice"]["device_id"]

        carol_id = roster["carol"]["device_id"]
        revoked = cli("revoke", carol_id[:6], "--cache-dir", str(short_tmp / "b"))
        assert revoked.returncode == 0, revoked.stderr
        assert f"revoked 'carol' ({carol_id})" in revoked.stdout
        assert "epoch 1, this device member, 3 active members, 1 revoked" in revoked.stdout
        for cache in ("a", "d"):
            assert poll(
                lambda c=cache: "epoch 1" in cli("status", "--cache-dir", str(short_tmp / c)).stdout
            ), cache
        status = cli("status", "--cache-dir", str(short_tmp / "c")).stdout
        assert "this device revoked" in status and "error: this device was revoked" in status
        carol.wait_for(r"peer left: alice")

        # The same code on another device: refused, with the reason on its status.
        (short_tmp / "e").mkdir()
        eve = RunningNode(
            "--name",
            "eve",
            "--cache-dir",
            str(short_tmp / "e"),
            "--secret-file",
            str(code_file),
            "--peer",
            url,
            *common,
        )
        nodes.append(eve)
        assert poll(
            lambda: "already used" in cli("status", "--cache-dir", str(short_tmp / "e")).stdout
        ), eve.output
        again = cli("revoke", "zzzz", "--cache-dir", str(short_tmp / "a"))
        assert again.returncode == 2 and "no member's device id starts with 'zzzz'" in again.stderr
        for node in nodes:
            assert SECRET not in node.output and code not in node.output
    finally:
        codes = [node.stop() for node in reversed(nodes)]
    assert codes == [0] * len(nodes), "\n".join(n.output for n in nodes)
