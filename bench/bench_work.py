"""work: 10,000 tiny tasks across 3 worker nodes, against Celery + Redis with 3 worker processes.

Ours: three worker processes (`bench/_work_node.py`, one Node each, concurrency 16) linked in a
loopback mesh with the submitting Node in this process; one job of 10,000 inputs. LAN mode:
claims are CRDT writes in the job's doc; strict mode: each claim and each completion is a
compare-and-set on a real nats-server's JetStream key-value bucket (file storage). Task state
is durable either way (every claim and result is in each node's SQLite cache before it is
acknowledged as durable). Throughput = tasks / (last result seen by the submitter - submit);
latency per task = when the submitter saw its result - when it was submitted.

Anchor, same machine, same run: Celery 5 with a Redis broker and result backend (Debian's
redis-server, append-only file fsynced every second, so its task state is durable too), one
`celery worker -c 3` (prefork: 3 worker processes), the client submitting 10,000 `delay()`
calls and collecting every result with `join_native` (latency from each task's own submit).
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unity_crdt import Node, NodeConfig

from ._scripts import load

N = 10_000
CONCURRENCY = 16
SECRET = "bench work group secret: not for production"
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600.0


def _nats() -> Any:
    return load("nats")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of values, in milliseconds."""
    ordered = sorted(values)
    return 1000.0 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _workers(tmp: Path, coordination: str) -> tuple[list[subprocess.Popen[str]], list[str]]:
    """Three worker processes, each dialling the ones before it; their URLs."""
    procs: list[subprocess.Popen[str]] = []
    urls: list[str] = []
    for i in range(3):
        cfg = {
            "name": f"w{i}",
            "cache": str(tmp / f"w{i}"),
            "peers": list(urls),
            "coordination": coordination,
            "concurrency": CONCURRENCY,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench._work_node", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        procs.append(proc)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(SECRET + "\n")
        proc.stdin.flush()
        urls.append(json.loads(proc.stdout.readline())["url"])
    return procs, urls


async def ours(tmp: Path, coordination: str) -> dict[str, float]:
    """One job of N tiny tasks over three worker processes; throughput and latencies."""
    procs, urls = await asyncio.to_thread(_workers, tmp, coordination)
    try:
        config = NodeConfig(
            name="submitter",
            cache_dir=tmp / "submitter",
            group_secret=SECRET,
            mdns=False,
            peers=tuple(urls),
            coordination_url=coordination,
        )
        async with Node(config) as node:
            await node.wait_for_peers(3, 30)
            engine = node._work.engine
            warm = await node.submit("tiny", list(range(30)), lease=30.0)  # the mode settled
            await warm.results(timeout=60)
            async with asyncio.timeout(30):
                while len(engine._live_workers("tiny")) < 3:  # noqa: ASYNC110 - beats arrive
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            loop = asyncio.get_running_loop()
            started = loop.time()
            job = await node.submit("tiny", list(range(N)), lease=30.0)
            results = await job.results(timeout=TIMEOUT)
            assert results == [2 * i for i in range(N)]
            seen = engine.jobs[job.id].finished_at
            last = max(seen.values())
            latencies = [t - started for t in seen.values()]
            mode = node.status().work.mode  # type: ignore[union-attr]
        return {
            "tasks_per_s": N / (last - started),
            "p50_ms": pct(latencies, 0.5),
            "p99_ms": pct(latencies, 0.99),
            "mode": mode,  # type: ignore[dict-item]
        }
    finally:
        for proc in procs:
            if proc.stdin:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """Debian's redis-server on a free loopback port, append-only (fsync every second)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is missing: scripts/system-deps.sh installs it")
    port = _free_port()
    data = tmp / "redis"
    data.mkdir()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def celery(tmp: Path) -> dict[str, float]:
    """N tiny Celery tasks on one `celery worker -c 3`; throughput and latencies."""
    with redis_server(tmp) as url:
        env = _env() | {"BENCH_REDIS_URL": url}
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench._celery_tasks", "worker", "-c", "3",
             "-P", "prefork", "--loglevel", "warning", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            os.environ["BENCH_REDIS_URL"] = url
            sys.modules.pop("bench._celery_tasks", None)
            from celery.result import ResultSet

            from bench._celery_tasks import tiny

            assert tiny.delay(1).get(timeout=60) == 2  # the worker is up
            submitted: dict[str, float] = {}
            arrived: dict[str, float] = {}
            started = time.perf_counter()
            handles = []
            for i in range(N):
                r = tiny.delay(i)
                submitted[r.id] = time.perf_counter()
                handles.append(r)

            def got(task_id: str, value: Any) -> None:
                arrived[task_id] = time.perf_counter()

            ResultSet(handles).join_native(timeout=TIMEOUT, callback=got)
            assert [r.get() for r in handles[:5]] == [0, 2, 4, 6, 8]
            last = max(arrived.values())
            latencies = [arrived[k] - submitted[k] for k in arrived]
            return {
                "tasks_per_s": N / (last - started),
                "p50_ms": pct(latencies, 0.5),
                "p99_ms": pct(latencies, 0.99),
            }
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()


async def main() -> list[dict[str, Any]]:
    """Celery, then ours in LAN and strict mode; rows with ratios against Celery."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-work-"))
    rows: list[dict[str, Any]] = []
    try:
        (tmp / "celery").mkdir()
        anchor = await asyncio.to_thread(celery, tmp / "celery")
        print(f"{N:,} tiny tasks, 3 worker processes each, submitter apart:")
        print(
            f"  Celery + Redis (AOF)   {anchor['tasks_per_s']:7,.0f} tasks/s   "
            f"p50 {anchor['p50_ms']:8.1f} ms  p99 {anchor['p99_ms']:8.1f} ms"
        )
        with _nats().NatsServer(tmp / "nats") as server:
            for label, coordination in (("lan", "off"), ("strict", server.url)):
                (tmp / label).mkdir()
                got = await ours(tmp / label, coordination)
                ratio = got["tasks_per_s"] / anchor["tasks_per_s"]
                print(
                    f"  unity-crdt {label:7s} ({got['mode']})  {got['tasks_per_s']:7,.0f} tasks/s"
                    f"   p50 {got['p50_ms']:8.1f} ms  p99 {got['p99_ms']:8.1f} ms  "
                    f"{ratio:.2f}x Celery (goal >= 1x)"
                )
                rows.append(
                    {
                        "metric": f"work_{label}_10k_tasks_per_s",
                        "value": round(got["tasks_per_s"]),
                        "p50_ms": round(got["p50_ms"], 1),
                        "p99_ms": round(got["p99_ms"], 1),
                        "celery": round(anchor["tasks_per_s"]),
                        "celery_p50_ms": round(anchor["p50_ms"], 1),
                        "celery_p99_ms": round(anchor["p99_ms"], 1),
                        "ratio_vs_celery": round(ratio, 2),
                        "goal": ">= 1x",
                    }
                )
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    for row in asyncio.run(main()):
        print(json.dumps(row))
