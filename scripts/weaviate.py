"""Install and run a local Weaviate server on loopback (stdlib only).

    python scripts/weaviate.py install    # go install weaviate-server once (skipped when present)
    python scripts/weaviate.py start      # detached server; writes .weaviate/state.json
    python scripts/weaviate.py start --servers 3   # a 3-server cluster instead
    python scripts/weaviate.py stop       # stops the server(s) named in .weaviate/state.json
    python scripts/weaviate.py run        # foreground server (or --servers 3) until Ctrl-C

Tests and benchmarks import `WeaviateServer`, a context manager that picks free loopback ports,
starts the server in a fresh data dir and stops it again, and `WeaviateCluster`, the same for
several servers that form one Weaviate cluster (Raft for the schema, replicated data). The
environment is described in docs/operations.md: telemetry off, bound to 127.0.0.1, no 6060
debug port.
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
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

VERSION = "v1.39.0"
MODULE = f"github.com/weaviate/weaviate/cmd/weaviate-server@{VERSION}"
BINARY = "weaviate-server"
HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".weaviate"
STATE_FILE = STATE_DIR / "state.json"
READY_TIMEOUT = 90.0
HEARTBEAT = 10.0
LOG_NAME = "weaviate-server.log"


class WeaviateStartError(RuntimeError):
    """The server did not become ready (the message carries the log tail)."""


def binary_path() -> Path:
    """Where `go install` puts weaviate-server: $GOBIN, else $(go env GOPATH)/bin."""
    go = shutil.which("go")
    if go is not None:
        out = subprocess.run(
            [go, "env", "GOBIN", "GOPATH"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        gobin, gopath = [*out, "", ""][:2]
        if gobin.strip():
            return Path(gobin.strip()) / BINARY
        first = gopath.strip().split(os.pathsep)[0]
        if first:
            return Path(first) / "bin" / BINARY
    found = shutil.which(BINARY)
    return Path(found) if found else Path.home() / "go" / "bin" / BINARY


# How many "go: downloading" lines a first `go install` of v1.39.0 prints (232, measured here
# with an empty module cache), so the bar reaches the end when the downloads do.
MODULES = 232


def _bar(done: int, width: int = 24) -> str:
    filled = min(width, round(width * done / MODULES))
    return "#" * filled + "." * (width - filled)


def install(force: bool = False) -> Path:
    """Build weaviate-server with `go install` unless it is already there; print progress."""
    target = binary_path()
    if target.exists() and not force:
        print(f"weaviate: {target} already installed", flush=True)
        return target
    go = shutil.which("go")
    if go is None:
        raise SystemExit("weaviate: Go >= 1.26 is needed to build the server (or use Docker)")
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-trimpath")
    cmd = [go, "install", "-ldflags=-s -w", MODULE]
    print(f"weaviate: building {MODULE} (several minutes the first time)", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    downloaded = 0

    def pump() -> None:
        nonlocal downloaded
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("go: downloading"):
                downloaded += 1  # one line per module: a real progress count, not a guess
                if downloaded % 20 == 0:
                    print(
                        f"weaviate: [{_bar(downloaded)}] {downloaded}/~{MODULES} modules "
                        "downloaded",
                        flush=True,
                    )
            else:
                print(f"  {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(HEARTBEAT)
        if proc.returncode is None:
            phase = "compiling" if downloaded >= MODULES * 0.9 else "downloading and compiling"
            print(
                f"weaviate: {phase} ... {time.monotonic() - started:.0f} s "
                f"({downloaded} modules downloaded)",
                flush=True,
            )
    reader.join(5)
    if proc.returncode != 0:
        raise SystemExit(f"weaviate: go install failed with exit code {proc.returncode}")
    print(f"weaviate: installed {target} in {time.monotonic() - started:.0f} s", flush=True)
    return target


def _bindable(port: int, kind: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_run(length: int, udp_first: bool = False) -> int:
    """A port p such that p..p+length-1 are free on every interface (and p on UDP if asked)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            base = int(s.getsockname()[1])
        if base + length > 65535:
            continue
        ok = all(_bindable(base + i, socket.SOCK_STREAM, "") for i in range(length))
        if ok and (not udp_first or _bindable(base, socket.SOCK_DGRAM, "")):
            return base
    raise WeaviateStartError("could not find free loopback ports")


class WeaviateServer:
    """One weaviate-server process on loopback; a context manager (start on enter, stop on exit)."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        http_port: int = 0,
        grpc_port: int = 0,
        binary: str | Path | None = None,
        ready_timeout: float = READY_TIMEOUT,
        hostname: str = "node1",
        cluster_env: dict[str, str] | None = None,
    ) -> None:
        self.hostname = hostname
        self.cluster_env = dict(cluster_env or {})  # set by WeaviateCluster
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="weaviate-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir).resolve()
        self.binary = Path(binary) if binary else binary_path()
        self.ready_timeout = ready_timeout
        self._fixed = (http_port, grpc_port)
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.gossip_port = 0
        self.raft_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The HTTP base URL, e.g. http://127.0.0.1:8080."""
        return f"http://{HOST}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.proc.pid if self.proc is not None else None

    @property
    def log_path(self) -> Path:
        """The server's combined stdout/stderr log."""
        return self.data_dir / LOG_NAME

    def _pick_ports(self) -> None:
        if self.cluster_env:  # a cluster member: its ports are part of the others' settings
            return
        self.http_port = self._fixed[0] or _free_run(1)
        self.grpc_port = self._fixed[1] or _free_run(1)
        self.gossip_port = _free_run(2, udp_first=True)
        self.raft_port = _free_run(2)

    def env(self) -> dict[str, str]:
        """The exact environment the server runs with (nothing inherited but PATH)."""
        d = str(self.data_dir)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": d,
            "AUTHENTICATION_ANONYMOUS_ACCESS_ENABLED": "true",
            "PERSISTENCE_DATA_PATH": d,
            "CLUSTER_HOSTNAME": self.hostname,
            "CLUSTER_BIND_ADDR": HOST,
            "CLUSTER_GOSSIP_BIND_PORT": str(self.gossip_port),
            "CLUSTER_DATA_BIND_PORT": str(self.gossip_port + 1),
            "GRPC_PORT": str(self.grpc_port),
            "RAFT_PORT": str(self.raft_port),
            "RAFT_INTERNAL_RPC_PORT": str(self.raft_port + 1),
            "RAFT_BOOTSTRAP_EXPECT": "1",
            "DEFAULT_VECTORIZER_MODULE": "none",
            "API_BASED_MODULES_DISABLED": "true",
            "DISABLE_TELEMETRY": "true",
            "GO_PROFILING_DISABLE": "true",
            "RAFT_TIMEOUTS_MULTIPLIER": "1",
            "RAFT_BOOTSTRAP_TIMEOUT": "90",
            "DISK_USE_READONLY_PERCENTAGE": "0",
            "LOG_LEVEL": "warning",
            "LOG_FORMAT": "text",
            **self.cluster_env,
        }

    def _spawn(self, detach: bool) -> None:
        if not self.binary.exists():
            raise WeaviateStartError(
                f"{self.binary} is missing: run `python scripts/weaviate.py install`"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(self.binary),
            "--host",
            HOST,
            "--port",
            str(self.http_port),
            "--scheme",
            "http",
            "--read-timeout=600s",
            "--write-timeout=600s",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.data_dir,  # the server auto-loads ./weaviate.conf.json from its cwd
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=detach,
            )

    def is_ready(self) -> bool:
        """Whether /v1/.well-known/ready answers 200 right now."""
        try:
            with urllib.request.urlopen(f"{self.url}/v1/.well-known/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise WeaviateStartError(
                    f"weaviate-server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        self._terminate(5)
        raise WeaviateStartError(f"weaviate-server not ready after {self.ready_timeout:.0f} s")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, *, attempts: int = 3, detach: bool = False) -> WeaviateServer:
        """Pick ports, start the server and wait until ready; retry with new ports on failure."""
        error: WeaviateStartError | None = None
        for _ in range(attempts):
            self._pick_ports()
            self._spawn(detach)
            try:
                self._wait_ready()
                return self
            except WeaviateStartError as exc:
                error = exc
        assert error is not None
        raise error

    def restart(self) -> WeaviateServer:
        """Start again on the same data dir and ports (after stop() or kill())."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        self._spawn(detach=False)
        self._wait_ready()
        return self

    def kill(self) -> None:
        """SIGKILL the server (a crash, for tests); the data dir is kept."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _terminate(self, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait (SIGKILL after `timeout`); the data dir is kept."""
        self._terminate(timeout)

    def close(self) -> None:
        """Stop the server and remove its data dir if it was a temporary one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> WeaviateServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class WeaviateCluster:
    """`size` weaviate-servers on loopback forming one cluster (as Weaviate's own dev tooling
    runs three on one host); a context manager. Server i is `weaviate-i`; all share RAFT_JOIN
    and RAFT_BOOTSTRAP_EXPECT=size, and join server 0's gossip port."""

    def __init__(
        self,
        size: int = 3,
        root: str | Path | None = None,
        *,
        binary: str | Path | None = None,
        ready_timeout: float = READY_TIMEOUT,
        env: dict[str, str] | None = None,
        fixed_ports: bool = False,
    ) -> None:
        """`env` adds server settings, e.g. ASYNC_REPLICATION_FREQUENCY=5s for tests.
        `fixed_ports` uses Weaviate's dev layout (HTTP 8080+i, gRPC 50051+i, gossip 7100+2i,
        Raft 8300+2i), so a detached cluster restarts on the same addresses."""
        self.fixed_ports = fixed_ports
        if size < 1:
            raise ValueError("a cluster has at least one server")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="weaviate-cluster-")
            root = self._tmp.name
        self.root = Path(root).resolve()
        self.servers = [
            WeaviateServer(
                self.root / f"weaviate-{i}",
                binary=binary,
                ready_timeout=ready_timeout,
                hostname=f"weaviate-{i}",
                cluster_env={"CLUSTER_IN_LOCALHOST": "true", **(env or {})},
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """Every server's URL with its gRPC port: `http://127.0.0.1:HTTP?grpc=GRPC`."""
        return [f"{s.url}?grpc={s.grpc_port}" for s in self.servers]

    def _configure(self) -> None:
        taken: set[int] = set()

        def pick(length: int, udp: bool = False) -> int:
            while True:
                port = _free_run(length, udp_first=udp)
                if not taken & set(range(port, port + length)):
                    taken.update(range(port, port + length))
                    return port

        for i, s in enumerate(self.servers):
            if self.fixed_ports:
                s.http_port, s.grpc_port = 8080 + i, 50051 + i
                s.gossip_port, s.raft_port = 7100 + 2 * i, 8300 + 2 * i
            else:
                s.http_port, s.grpc_port = pick(1), pick(1)
                s.gossip_port, s.raft_port = pick(2, udp=True), pick(2)
        join = ",".join(f"{s.hostname}:{s.raft_port}" for s in self.servers)
        for i, s in enumerate(self.servers):
            s.cluster_env.update(RAFT_JOIN=join, RAFT_BOOTSTRAP_EXPECT=str(len(self.servers)))
            if i:
                s.cluster_env["CLUSTER_JOIN"] = f"localhost:{self.servers[0].gossip_port}"

    def start(self, *, attempts: int = 3, detach: bool = False) -> WeaviateCluster:
        """Pick ports, start every server, wait until all are ready (retry with new ports)."""
        error: WeaviateStartError | None = None
        for _ in range(attempts):
            self._configure()
            for s in self.servers:
                s._spawn(detach)
            try:
                for s in self.servers:  # they bootstrap together: wait for each in turn
                    s._wait_ready()
                self._wait_leader()
                return self
            except WeaviateStartError as exc:
                error = exc
                for s in self.servers:
                    s._terminate(5)
        assert error is not None
        raise error

    def _wait_leader(self) -> None:
        """Wait until every server counts all members and names the same Raft leader."""
        deadline = time.monotonic() + self.servers[0].ready_timeout
        url = f"{self.servers[0].url}/v1/cluster/statistics"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    stats = json.loads(r.read())["statistics"]
                leaders = {s.get("leaderId") for s in stats}
                if len(stats) == len(self.servers) and len(leaders) == 1 and None not in leaders:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise WeaviateStartError("the cluster elected no Raft leader in time")

    def close(self) -> None:
        """Stop every server and remove the data dirs if they were temporary."""
        for s in self.servers:
            s.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> WeaviateCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _cmd_start(args: argparse.Namespace) -> None:
    if STATE_FILE.exists():
        state = json.loads(STATE_FILE.read_text())
        if any(_alive(pid) for pid in _pids(state)):
            print(f"weaviate: already running (pids {_pids(state)})")
            return
    data = Path(args.data_dir or STATE_DIR / "data")
    servers: list[WeaviateServer]
    if args.servers > 1:
        cluster = WeaviateCluster(args.servers, data, fixed_ports=True)
        cluster.start(detach=True)
        servers, urls = cluster.servers, cluster.urls
    else:
        server = WeaviateServer(data, http_port=args.port, grpc_port=args.grpc_port)
        server.start(detach=True)
        servers, urls = [server], [f"{server.url}?grpc={server.grpc_port}"]
    state = {"pids": [s.pid for s in servers], "urls": urls, "data_dir": str(data)}
    STATE_DIR.mkdir(exist_ok=True)
    STATE_FILE.write_text(json.dumps(state, indent=2))
    for s in servers:
        print(f"weaviate: ready at {s.url} (gRPC {s.grpc_port}), pid {s.pid}")
    if len(servers) > 1:
        print(f"weaviate: cluster of {len(servers)}; give nodes all of: {','.join(urls)}")


def _pids(state: dict[str, object]) -> list[int]:
    """The server pids of a state file (older ones held a single "pid")."""
    found = state.get("pids", [state.get("pid")])
    return [int(p) for p in found if p is not None] if isinstance(found, list) else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _cmd_stop(_: argparse.Namespace) -> None:
    if not STATE_FILE.exists():
        print("weaviate: not running (no .weaviate/state.json)")
        return
    pids = _pids(json.loads(STATE_FILE.read_text()))
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    STATE_FILE.unlink()
    print(f"weaviate: stopped pid(s) {', '.join(map(str, pids))}")


def _cmd_run(args: argparse.Namespace) -> None:
    data = Path(args.data_dir or STATE_DIR / "data")
    if args.servers > 1:
        with WeaviateCluster(args.servers, data, fixed_ports=True) as cluster:
            print(f"weaviate: cluster ready at {','.join(cluster.urls)}; Ctrl-C stops it")
            with contextlib.suppress(KeyboardInterrupt):
                for s in cluster.servers:
                    assert s.proc is not None
                    s.proc.wait()
        return
    with WeaviateServer(data, http_port=args.port, grpc_port=args.grpc_port) as server:
        print(f"weaviate: ready at {server.url} (gRPC {server.grpc_port}); Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            assert server.proc is not None
            server.proc.wait()


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: install | start | stop | run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="go install weaviate-server if missing")
    for name in ("start", "run"):
        p = sub.add_parser(name, help=f"{name} a server on 127.0.0.1")
        p.add_argument("--port", type=int, default=8080, help="HTTP port (0 = any free)")
        p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0 = any free)")
        p.add_argument("--data-dir", help="data directory (default .weaviate/data)")
        p.add_argument(
            "--servers",
            type=int,
            default=1,
            help="servers: 1, or 3 for a cluster on ports 8080-8082, gRPC 50051-50053",
        )
    sub.add_parser("stop", help="stop the server started by `start`")
    args = parser.parse_args(argv)
    if args.cmd == "install":
        install()
    else:
        {"start": _cmd_start, "stop": _cmd_stop, "run": _cmd_run}[args.cmd](args)


if __name__ == "__main__":
    main(sys.argv[1:])
