"""Collective work between in-process nodes on loopback (LAN mode: claims in CRDT docs)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from unity_crdt import JobFailed, Node, NodeConfig, PeerAddress
from unity_crdt.errors import ConfigError

SECRET = "work integration secret: correct horse battery"
Make = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    nodes: list[Node] = []

    async def factory(name: str, *, link: bool = True, **kw: Any) -> Node:
        values: dict[str, Any] = dict(
            name=name,
            cache_dir=tmp_path / name,
            group_secret=SECRET,
            mdns=False,
            peers=tuple(n.url for n in nodes) if link else (),
            ping_interval=0.5,
            idle_timeout=2.0,
            anti_entropy_interval=1.0,
            work_heartbeat=0.25,
        )
        node = Node(NodeConfig(**(values | kw)))
        await node.start()
        nodes.append(node)
        return node

    yield factory
    for node in reversed(nodes):
        with contextlib.suppress(Exception):
            await node.close()


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def test_failing_task_is_retried_then_fails_with_the_handlers_error(make: Make) -> None:
    a = await make("a")
    attempts: Counter[int] = Counter()
    seen: list[int] = []

    @a.worker("flaky", concurrency=2)
    async def flaky(task: Any) -> int:
        attempts[task.index] += 1
        seen.append(task.attempt)
        if task.input == "never" or (task.input == "once" and task.attempt == 1):
            raise ValueError(f"bad input {task.input}")
        return len(task.input)

    job = await a.submit("flaky", ["ok", "once", "never"], lease=1.0, max_attempts=3)
    with pytest.raises(JobFailed) as info:
        await job.results(timeout=30)
    assert info.value.failures == {2: "ValueError: bad input never"}
    assert info.value.results == [2, 4, None]
    assert attempts == {0: 1, 1: 2, 2: 3}
    assert job.progress().failed == 1 and job.progress().done == 2
    assert 1 in seen and max(seen) == 3


async def test_redundancy_runs_each_input_on_distinct_nodes(make: Make) -> None:
    nodes = [await make(n) for n in "abc"]
    ran: dict[int, list[str]] = {}
    for node in nodes:

        @node.worker("vote")
        async def vote(task: Any, node: Node = node) -> str:
            ran.setdefault(task.index, []).append(node.config.name)
            return node.config.name

    for node in nodes:
        await node.wait_for_peers(2)
    # Until every node knows every worker (else the first claims may collide).
    await eventually(lambda: all(len(n._work.engine._live_workers("vote")) == 3 for n in nodes))
    job = await nodes[0].submit("vote", list(range(10)), lease=2.0, redundancy=3)
    results = await job.results(timeout=30)
    assert all(sorted(r) == ["a", "b", "c"] for r in results), results
    assert all(sorted(v) == ["a", "b", "c"] for v in ran.values())


async def test_a_job_submitted_with_no_worker_runs_when_one_appears(make: Make) -> None:
    a = await make("a")
    job = await a.submit("late", [1, 2, 3], lease=2.0)
    await asyncio.sleep(0.5)
    assert job.progress().done == 0 and job.progress().total == 3
    b = await make("b")

    @b.worker("late")
    async def late(task: Any) -> int:
        return int(task.input) * 10

    assert await job.results(timeout=30) == [10, 20, 30]
    follower = b.job(job.id)  # followed from the node that did the work
    assert await follower.results(timeout=10) == [10, 20, 30]
    st = a.status().work
    assert st is not None and st.mode == "lan"
    assert [(j.job_id, j.done, j.total) for j in st.jobs] == [(job.id, 3, 3)]


async def test_results_must_be_json_and_inputs_too(make: Make) -> None:
    a = await make("a")

    @a.worker("bad")
    async def bad(task: Any) -> object:
        return object()

    job = await a.submit("bad", [1], lease=1.0, max_attempts=1)
    with pytest.raises(JobFailed, match="not JSON serializable"):
        await job.results(timeout=10)
    with pytest.raises(ConfigError):
        await a.submit("bad", [object()])
    with pytest.raises(ConfigError):
        await a.submit("bad", [1], lease=0.1)


async def test_lan_lease_is_exclusive_and_hands_over(make: Make) -> None:
    a, b = await make("a"), await make("b")
    await a.wait_for_peers(1)
    async with a.lease("session/user-42", ttl=2.0) as la:
        await eventually(lambda: b.lease_holder("session/user-42") is not None)
        info = b.lease_holder("session/user-42")
        assert info is not None and info.device_id == a.device_id and info.token == la.token
        waiter = asyncio.ensure_future(b.lease("session/user-42", ttl=2.0, timeout=10).__aenter__())
        await asyncio.sleep(0.5)
        assert not waiter.done() and not la.lost.is_set()
    lb = await waiter
    assert lb.token > la.token and la.lost.is_set()  # released: nothing is fenced by it now
    with pytest.raises(TimeoutError):
        async with a.lease("session/user-42", ttl=2.0, timeout=0.5):
            pass


async def test_after_a_partition_heals_the_lower_token_loses(make: Make) -> None:
    a = await make("a", link=False)
    b = await make("b", link=False)
    # Split from the start: both take the lease with the same token.
    la = await a.lease("x", ttl=3.0).__aenter__()
    lb = await b.lease("x", ttl=3.0).__aenter__()
    assert la.token == lb.token == 1
    assert b._mesh is not None
    b._mesh.add_address(PeerAddress.parse(a.url))  # the cable comes back
    await eventually(lambda: la.lost.is_set() or lb.lost.is_set())
    loser, winner = (la, lb) if la.device_id > lb.device_id else (lb, la)
    assert loser.lost.is_set() and not winner.lost.is_set()
    await asyncio.sleep(0.5)
    assert not winner.lost.is_set()


async def test_an_unreachable_coordination_server_leaves_lan_mode_working(make: Make) -> None:
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"nats://127.0.0.1:{s.getsockname()[1]}"
    a = await make("a", coordination_url=dead)

    @a.worker("twice")
    async def twice(task: Any) -> int:
        return 2 * int(task.input)

    job = await a.submit("twice", [1, 2, 3], lease=2.0)
    assert await job.results(timeout=20) == [2, 4, 6]
    work = a.status().work
    assert work is not None and work.mode == "lan" and not work.connected
    assert work.coordination_url == dead and work.error
    async with a.lease("x", ttl=2.0) as lease:  # leases fall back to LAN entries too
        assert lease.token == 1
