"""The newcomer's CLI end to end: `unity-crdt run` nodes as real subprocesses, driven by the
other commands through their control sockets, plus the metrics exposition and doc projection."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pycrdt
import pytest

from unity_crdt import Node, NodeConfig
from unity_crdt.cli import build_parser
from unity_crdt.cli import main as cli_main
from unity_crdt.cli._run import node_config
from unity_crdt.errors import ConfigError, ControlError, NodeAlreadyRunning, NoNodeRunning
from unity_crdt.frontends._docview import Conflict, apply_edit, project
from unity_crdt.frontends._metrics import escape_label, render
from unity_crdt.frontends.control import ControlServer
from unity_crdt.frontends.control_client import ControlClient, socket_path
from unity_crdt.status import CacheStatus, DocStatus, NodeStatus, PeerStatus, RelayStatus

SCRIPT = str(Path(sys.executable).with_name("unity-crdt"))
SECRET = "test-group-secret-" + "x" * 25
DOC = "trip notes/é"  # a space, a slash and non-ASCII: quoting must hold end to end
TIMEOUT = 15.0


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """One CLI command as a user runs it; the group secret is in the environment."""
    env = dict(os.environ, UNITY_CRDT_SECRET=SECRET)
    return subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, timeout=30, env=env, input=stdin
    )


class RunningNode:
    """`unity-crdt run ...` in the background; its stdout is collected line by line."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, UNITY_CRDT_SECRET=SECRET, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [SCRIPT, "run", "--status-interval", "0.3", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        for stream, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    def _pump(self, stream: object, sink: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first stdout line matching `pattern`, waiting for it if needed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no line matching {pattern!r}:\n{self.output}")
                self._cond.wait(left)

    @property
    def output(self) -> str:
        """Everything printed so far (stdout, then stderr)."""
        return "\n".join(self.lines) + "\n--- stderr:\n" + "\n".join(self.err)

    def stop(self) -> int:
        """Ctrl-C, then wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def poll(fn: object, timeout: float = TIMEOUT) -> object:
    """Call fn until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()  # type: ignore[operator]
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.fixture(scope="module")
def short_tmp() -> Iterator[Path]:
    """A short directory under /tmp, so socket paths stay readable in failure output."""
    path = Path(tempfile.mkdtemp(prefix="uc-cli-"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
def pair(short_tmp: Path) -> Iterator[tuple[RunningNode, RunningNode]]:
    """alice from a TOML config, bob from a TOML config plus --peer alice (flags win)."""
    configs = {}
    for name in ("alice", "bob"):
        configs[name] = short_tmp / f"{name}.toml"
        # "Synced" is acknowledged state: after a live edit, the peer's next HELLO (every
        # anti_entropy_interval) acknowledges it, so a short interval keeps the test fast.
        text = (
            f'[node]\nname = "{name}"\ncache_dir = "{short_tmp / name}"\nmdns = false\n'
            "anti_entropy_interval = 0.5\n"
        )
        if name == "bob":  # a peer in the file that --peer must replace
            text += 'peers = ["ws://127.0.0.1:9"]\n'
        configs[name].write_text(text)
    alice = RunningNode(
        "--config", str(configs["alice"]), "--metrics-port", "0", "--metrics-doc-names"
    )
    url = alice.wait_for(r"listening\s+(ws://\S+)").group(1)
    bob = RunningNode("--config", str(configs["bob"]), "--peer", url)
    bob.wait_for(r"listening\s+ws://")  # a Ctrl-C before its handler is set would exit 130
    try:
        yield alice, bob
    finally:
        codes = [node.stop() for node in (bob, alice)]
    assert codes == [0, 0], alice.output + bob.output


def test_run_banners_and_live_peer_lines(pair: tuple[RunningNode, RunningNode]) -> None:
    alice, bob = pair
    bob_url = bob.wait_for(r"listening\s+(ws://\S+)").group(1)
    m = alice.wait_for(r"peer joined: bob \(([a-z2-7]{8})\) (\S+)")
    assert m.group(2).startswith("ws://127.0.0.1:")
    bob.wait_for(r"peer joined: alice \([a-z2-7]{8}\) ws://127\.0\.0\.1:")
    assert "ws://127.0.0.1:9" not in bob.output, "--peer must override the file's peers"
    alice.wait_for(r"sync: \d+ docs?, 1 peer, synced \d+/\d+, pending")
    assert bob_url != alice.wait_for(r"listening\s+(ws://\S+)").group(1)
    sock = Path(alice.wait_for(r"control\s+(\S+)").group(1))
    assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o600
    for node in pair:
        assert SECRET not in node.output


def test_doc_set_on_alice_reaches_bob_and_his_watch(
    pair: tuple[RunningNode, RunningNode], short_tmp: Path
) -> None:
    alice, _bob = pair
    alice.wait_for("peer joined: bob")
    a, b = str(short_tmp / "alice"), str(short_tmp / "bob")
    res = cli("doc", "set", DOC, "--text", "body", "tent, stove", "--cache-dir", a)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"body": "tent, stove"}

    def bob_body() -> str | None:
        got = cli("doc", "get", DOC, "--text", "body", "--cache-dir", b)
        return json.loads(got.stdout)["body"] if got.returncode == 0 else None

    assert poll(lambda: bob_body() == "tent, stove"), "alice's edit never reached bob"
    # Untyped roots received from a peer are named on stderr, not guessed.
    cli("doc", "set", DOC, "--map", "claims", "tent=alice", "--cache-dir", a)
    assert poll(lambda: "claims" in cli("doc", "get", DOC, "--cache-dir", b).stderr)
    untyped = cli("doc", "get", DOC, "--cache-dir", b)
    assert json.loads(untyped.stdout) == {"body": "tent, stove"}
    assert "untyped roots claims" in untyped.stderr and "--map" in untyped.stderr

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [SCRIPT, "doc", "watch", DOC, "--text", "body", "--count", "2", "--cache-dir", b]
    watch = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())
        assert first["body"] == "tent, stove"
        res = cli("doc", "set", DOC, "--text", "body", ", map", "--append", "--cache-dir", a)
        assert res.returncode == 0, res.stderr
        second = json.loads(watch.stdout.readline())
        assert second["body"] == "tent, stove, map"
        assert watch.wait(TIMEOUT) == 0
    finally:
        watch.kill()


def test_status_json_and_table_show_the_synced_peer(
    pair: tuple[RunningNode, RunningNode], short_tmp: Path
) -> None:
    a = str(short_tmp / "alice")
    cli("doc", "set", "status-doc", "--array", "log", '{"n": 1}', "--cache-dir", a)

    def synced() -> dict[str, object] | None:
        st = json.loads(cli("status", "--json", "--cache-dir", a).stdout)
        doc = next(d for d in st["docs"] if d["name"] == "status-doc")
        return st if doc["peers_synced"] == 1 else None

    st = poll(synced)
    assert isinstance(st, dict), "status-doc never showed as synced with bob"
    (peer,) = st["peers"]
    assert peer["name"] == "bob" and peer["bytes_in"] > 0 and peer["bytes_out"] > 0
    assert "status-doc" in peer["synced_docs"]
    table = cli("status", "--cache-dir", a)
    assert table.returncode == 0, table.stderr
    assert re.search(r"^node\s+alice \([a-z2-7]{8}\)", table.stdout, re.M)
    assert re.search(r"^cache\s+ok$", table.stdout, re.M)
    assert re.search(r"^\s+bob\s+[a-z2-7]{8}\s+\S+ s", table.stdout, re.M)
    assert re.search(r"^\s+status-doc\s+\d+ B\s+1/1\s+never", table.stdout, re.M)


async def test_metrics_endpoint_serves_the_expected_series(
    pair: tuple[RunningNode, RunningNode], short_tmp: Path
) -> None:
    alice, _bob = pair
    url = alice.wait_for(r"metrics\s+(http://127\.0\.0\.1:\d+/metrics)").group(1)
    alice.wait_for("peer joined: bob")
    await asyncio.to_thread(
        cli,
        "doc",
        "set",
        "metrics-doc",
        "--text",
        "t",
        "x",
        "--cache-dir",
        str(short_tmp / "alice"),
    )
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = await resp.text()
    assert re.search(r"^unity_crdt_peers 1$", body, re.M)
    m = re.search(
        r'^unity_crdt_peer_bytes_in_total\{peer="bob",device="[a-z2-7]{26}"\} (\d+)$', body, re.M
    )
    assert m and int(m.group(1)) > 0
    assert re.search(r'^unity_crdt_doc_state_bytes\{doc="metrics-doc"\} [1-9]\d*$', body, re.M)
    assert "# TYPE unity_crdt_peer_bytes_out_total counter" in body
    assert re.search(r"^unity_crdt_pending_writes 0$", body, re.M)


def test_status_without_a_node_exits_2_with_the_command_to_run(tmp_path: Path) -> None:
    res = cli("status", "--cache-dir", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"unity-crdt status: no node is running on {tmp_path}; start one with "
        f"`unity-crdt run --cache-dir {tmp_path} ...`"
    )
    assert res.stdout == ""


def test_sigint_exits_0_and_the_cache_reopens_with_the_data(short_tmp: Path) -> None:
    cache = short_tmp / "solo"
    cache.mkdir()
    stale = socket.socket(socket.AF_UNIX)  # a crashed run's socket: nobody listens on it
    stale.bind(str(cache / "control.sock"))
    stale.close()
    node = RunningNode("--name", "solo", "--cache-dir", str(cache), "--no-mdns")
    try:
        node.wait_for("Ctrl-C to stop")
        res = cli("doc", "set", "keep", "--text", "t", "kept", "--cache-dir", str(cache))
        assert res.returncode == 0, res.stderr
        second = cli("run", "--name", "again", "--cache-dir", str(cache), "--no-mdns")
        assert second.returncode == 2
        assert f"pid {node.proc.pid}" in second.stderr and "in use" in second.stderr
        argv = [SCRIPT, "doc", "watch", "keep", "--text", "t", "--cache-dir", str(cache)]
        watch = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert watch.stdout is not None
        assert json.loads(watch.stdout.readline()) == {"t": "kept"}
    finally:
        rc = node.stop()
    assert rc == 0, node.output
    # A watch ends with the node, saying so in one line.
    out, err = watch.communicate(timeout=TIMEOUT)
    assert watch.returncode == 2 and out == ""
    assert err == f"unity-crdt doc: the node on {cache} stopped; watch again once it runs\n"
    node.wait_for(r"stopped; every edit is in")
    assert not (cache / "control.sock").exists()

    async def reopen() -> str:
        cfg = NodeConfig(name="reader", cache_dir=cache, group_secret=SECRET, mdns=False)
        async with Node(cfg) as reader:
            return str(reader.doc("keep").get("t", type=pycrdt.Text))

    assert asyncio.run(reopen()) == "kept"


def test_run_flags_override_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("UNITY_CRDT_SECRET", raising=False)
    path = tmp_path / "node.toml"
    path.write_text(
        f'name = "file"\ncache_dir = "{tmp_path}"\nport = 7001\n'
        'group_secret = "from-the-file-secret"\n'
    )
    args = build_parser().parse_args(
        ["run", "--config", str(path), "--port", "7002", "--no-mdns", "--peer", "ws://h:1"]
    )
    cfg = node_config(args)
    assert (cfg.name, cfg.port, cfg.mdns, cfg.peers) == ("file", 7002, False, ("ws://h:1",))
    assert cfg.group_secret == "from-the-file-secret"
    monkeypatch.setenv("UNITY_CRDT_SECRET", "from-the-environment")
    assert node_config(args).group_secret == "from-the-environment"


def test_f12_the_yjs_token_comes_from_a_0600_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNITY_CRDT_SECRET", SECRET)
    monkeypatch.delenv("UNITY_CRDT_YJS_TOKEN", raising=False)
    base = ["run", "--yjs", "--no-mdns", "--cache-dir", str(tmp_path / "c")]
    args = build_parser().parse_args(base)
    made = node_config(args).yjs_token
    path = tmp_path / "c" / "yjs.token"
    assert made and path.read_text().strip() == made and path.stat().st_mode & 0o777 == 0o600
    assert node_config(build_parser().parse_args(base)).yjs_token == made  # stable across runs
    chosen = tmp_path / "front-end.token"
    args = build_parser().parse_args([*base, "--yjs-token-file", str(chosen)])
    assert node_config(args).yjs_token == chosen.read_text().strip() != made
    chosen.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        node_config(build_parser().parse_args([*base, "--yjs-token-file", str(chosen)]))
    monkeypatch.setenv("UNITY_CRDT_YJS_TOKEN", "from-the-environment-0123")
    assert node_config(build_parser().parse_args(base)).yjs_token == "from-the-environment-0123"


def test_f12_run_never_prints_the_yjs_token(short_tmp: Path) -> None:
    cache = short_tmp / "yjs-node"
    node = RunningNode("--name", "y", "--cache-dir", str(cache), "--no-mdns", "--yjs")
    try:
        line = node.wait_for(r"yjs\s+ws://.*").group(0)
        token = (cache / "yjs.token").read_text().strip()
        assert f"token in {cache / 'yjs.token'}" in line
        assert token not in node.output
    finally:
        assert node.stop() == 0


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--map", "claims", "novalue"], "--map wants KEY=JSON"),
        (["--array", "a", "1", "--append"], "--append only goes with --text"),
    ],
)
def test_doc_set_usage_errors_need_no_node(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The cache dir has no node: the edit is checked before any connection.
    assert cli_main(["doc", "set", "d", *argv, "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unity-crdt doc: ") and expected in err


def test_run_without_a_secret_says_where_to_put_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("UNITY_CRDT_SECRET", raising=False)
    assert cli_main(["run", "--cache-dir", str(tmp_path), "--no-mdns"]) == 2
    err = capsys.readouterr().err
    assert "UNITY_CRDT_SECRET" in err and "unity-crdt keygen" in err
    assert not (tmp_path / "control.sock").exists()


# -- metrics.render and the doc projection, in process ------------------------------------


def _status(peer_name: str, doc_name: str) -> NodeStatus:
    peer = PeerStatus(
        name=peer_name,
        device_id="d" * 26,
        url="ws://x",
        connected_for=2.5,
        last_seen_ago=0.25,
        bytes_in=10,
        bytes_out=20,
        messages_in=1,
        messages_out=2,
        rtt=None,
        synced_docs=(doc_name,),
        pending=3,
    )
    doc = DocStatus(
        name=doc_name,
        state_bytes=99,
        peers_synced=1,
        last_checkpoint=1700000000.5,
        checkpoint_error=None,
        dirty=True,
    )
    return NodeStatus(
        name="n",
        device_id="e" * 26,
        url="ws://y",
        uptime=7.0,
        peers=(peer,),
        docs=(doc,),
        checkpoints=True,
        checkpoint_error=None,
        pending_writes=0,
        yjs_url=None,
    )


def test_metrics_render_escapes_label_values() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    text = render(_status('bo"b\\', 'my "doc"\nline2'), doc_labels=True)
    assert text.endswith("\n")
    assert 'unity_crdt_peer_bytes_in_total{peer="bo\\"b\\\\",device="' + "d" * 26 + '"} 10' in text
    assert 'unity_crdt_doc_state_bytes{doc="my \\"doc\\"\\nline2"} 99' in text
    assert (
        'unity_crdt_doc_last_checkpoint_timestamp_seconds{doc="my \\"doc\\"\\nline2"} '
        "1700000000.5" in text
    )
    assert "unity_crdt_peer_rtt_seconds{" not in text  # unknown rtt: no sample, not 0
    sample = re.compile(r'^[a-z_]+(\{([a-z]+="([^"\\\n]|\\.)*",?)+\})? [-+0-9.eNaIf]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    families = re.findall(r"^# TYPE (\S+)", text, re.M)
    assert len(families) == len(set(families)), "each family must be declared once"


def test_metrics_tell_relay_cache_and_equivocation_health() -> None:
    healthy = render(_status("bob", "d"))
    assert re.search(r"^unity_crdt_cache_failing 0$", healthy, re.M)
    assert re.search(r"^unity_crdt_equivocating_docs 0$", healthy, re.M)
    assert "unity_crdt_relay_" not in healthy  # no relay configured: no relay series
    failing = dataclasses.replace(
        _status("bob", "d"),
        relay=RelayStatus("nats://x", False, None, "refused", lag=7, outbox=3),
        cache=CacheStatus(store_error="disk full", unsaved_docs=("d",), failed_writes=2),
        equivocations=("d",),
    )
    text = render(failing)
    for line in (
        "unity_crdt_relay_connected 0",
        "unity_crdt_relay_lag_messages 7",
        "unity_crdt_relay_outbox_messages 3",
        "unity_crdt_cache_failing 1",
        "unity_crdt_cache_unsaved_docs 1",
        "unity_crdt_cache_failed_writes_total 2",
        "unity_crdt_cache_recoveries_total 0",
        "unity_crdt_equivocating_docs 1",
    ):
        assert re.search(f"^{line}$", text, re.M), line
    assert "# TYPE unity_crdt_cache_failed_writes_total counter" in text


def test_f11_metrics_render_leaves_doc_names_out_by_default() -> None:
    text = render(_status("bob", "secret plans"))
    assert "secret plans" not in text
    assert re.search(r"^unity_crdt_docs_state_bytes 99$", text, re.M)


def test_projection_types_only_what_it_is_told_and_refuses_retyping() -> None:
    src = pycrdt.Doc()
    src["body"] = pycrdt.Text("héllo")
    src["claims"] = pycrdt.Map({"tent": "alice"})
    doc = pycrdt.Doc()
    doc.apply_update(src.get_update())
    assert project(doc) == {"roots": {}, "untyped": ["body", "claims"]}
    assert project(doc, [("map", "claims")]) == {
        "roots": {"claims": {"tent": "alice"}},
        "untyped": ["body"],
    }
    with pytest.raises(Conflict, match="root 'claims' is a Map on this node, not a text"):
        apply_edit(doc, {"kind": "text", "root": "claims", "value": "x"})
    apply_edit(doc, {"kind": "text", "root": "body", "value": "!", "append": True})
    apply_edit(doc, {"kind": "map", "root": "claims", "key": "tent", "delete": True})
    apply_edit(doc, {"kind": "array", "root": "log", "value": [1, "ü"]})
    assert project(doc)["roots"] == {"body": "héllo!", "claims": {}, "log": [[1.0, "ü"]]}
    apply_edit(doc, {"kind": "text", "root": "body", "value": "new"})
    assert str(doc.get("body", type=pycrdt.Text)) == "new"


# -- the control API in process -----------------------------------------------------------


async def test_control_api_answers_errors_as_one_line_and_survives_long_paths(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # the socket path is over sockaddr_un's 108
    assert len(str(socket_path(deep))) > 108
    cfg = NodeConfig(name="solo", cache_dir=deep, group_secret=SECRET, mdns=False)
    async with Node(cfg) as node:
        server = ControlServer(node)
        await server.start()
        try:
            assert socket_path(deep).stat().st_mode & 0o777 == 0o600
            async with ControlClient(deep) as client:
                view = await client.edit(
                    "d", {"kind": "map", "root": "m", "key": "k", "value": {"x": [1]}}
                )
                assert view["roots"] == {"m": {"k": {"x": [1.0]}}}
                assert await client.docs() == ["d"]
                with pytest.raises(ControlError, match="root 'm' is a Map on this node"):
                    await client.get_doc("d", [("text", "m")])
                with pytest.raises(ControlError, match="no doc named 'nope' on this node"):
                    await client.get_doc("nope")
                with pytest.raises(ControlError, match="checkpoints are off on this node"):
                    await client.restore()
                with pytest.raises(ControlError, match="unknown root type 'tree'"):
                    await client.edit("d", {"kind": "tree", "root": "m"})
            # A second server on the same cache finds the live one and names its pid.
            with pytest.raises(NodeAlreadyRunning, match=f"pid {os.getpid()}"):
                await ControlServer(node).start()
        finally:
            await server.close()
        assert not socket_path(deep).exists()
        async with ControlClient(deep) as client:
            with pytest.raises(NoNodeRunning, match="no node is running on"):
                await client.status()


def test_status_into_a_closed_pipe_exits_quietly(
    pair: tuple[RunningNode, RunningNode], short_tmp: Path
) -> None:
    # `unity-crdt status | head -1`: the reader goes away before the output is written.
    env = dict(os.environ, UNITY_CRDT_SECRET=SECRET)
    argv = [SCRIPT, "status", "--cache-dir", str(short_tmp / "alice")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 141, err  # as a shell reports a command killed by SIGPIPE
    assert "Traceback" not in err and err == "", err
