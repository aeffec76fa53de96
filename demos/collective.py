"""Three nodes split one job and gather the results (collective work; docs/collective.md).

    python demos/collective.py            # LAN mode: claims are CRDT writes between the nodes
    python demos/collective.py --strict   # strict mode: a local nats-server decides the claims

Three nodes on 127.0.0.1 link to each other; each runs a worker of kind "wordcount". The first
node submits a job of 24 paragraphs; the workers claim them (each input once), and the results
come back to the submitter in input order. A second job asks for three opinions per input
(`redundancy=3`): every input runs on all three nodes. Then two nodes take turns holding one
lease, each write fenced by its token. Nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from unity_crdt import Node, NodeConfig
from unity_crdt.work.rules import Fence

SECRET = "collective demo secret: not for production use"
TEXT = (
    "Many instances of one app can act as one mind. They share documents that merge without "
    "conflicts, and they can share work: a job is split into tasks, each instance claims some, "
    "and the results come back in order to whoever asked."
)


def nats_server() -> Any:
    """scripts/nats.py of this checkout, loaded by path (its name shadows the nats package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "nats.py"
    spec = importlib.util.spec_from_file_location("unity_crdt_nats_script", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.NatsServer()


async def demo(tmp: Path, coordination: str) -> None:
    """Start three nodes, run two jobs and a lease, print what happened."""
    nodes: list[Node] = []
    ran: Counter[str] = Counter()
    async with contextlib.AsyncExitStack() as stack:
        for name in ("ada", "grace", "linus"):
            config = NodeConfig(
                name=name,
                cache_dir=tmp / name,
                group_secret=SECRET,
                mdns=False,
                peers=tuple(n.url for n in nodes),
                coordination_url=coordination,
            )
            node = await stack.enter_async_context(Node(config))
            nodes.append(node)

            @node.worker("wordcount", concurrency=2)
            async def wordcount(task: Any, name: str = name) -> dict[str, Any]:
                ran[name] += 1
                await asyncio.sleep(0.05)  # pretend to think
                return {"words": len(str(task.input).split()), "by": name}

        for node in nodes:
            await node.wait_for_peers(2)
        await asyncio.sleep(1.5)  # every node hears every worker's heartbeat
        mode = nodes[0].status().work.mode  # type: ignore[union-attr]
        print(f"three nodes linked, {mode} mode")

        paragraphs = [f"{i}: {TEXT}" for i in range(24)]
        job = await nodes[0].submit("wordcount", paragraphs, lease=10.0)
        print(f"ada submitted job {job.id} ({len(paragraphs)} inputs)")
        follower = nodes[2].job(job.id)  # any node can follow it
        results = await job.results(timeout=60)
        assert [r["words"] for r in results] == [len(p.split()) for p in paragraphs]
        print(f"results in input order; work split {dict(ran)}")
        print(f"linus follows the same job: {follower.progress()}")

        ensemble = await nodes[1].submit("wordcount", paragraphs[:3], lease=10.0, redundancy=3)
        votes = await ensemble.results(timeout=60)
        print("three opinions per input:", [sorted(v["by"] for v in vote) for vote in votes])

        fence = Fence()  # what a shared resource keeps: the newest token it accepted
        for node in (nodes[0], nodes[1], nodes[0]):
            async with node.lease("report/owner", ttl=5.0) as lease:
                assert fence.check("report/owner", lease.token)
                print(f"{node.config.name} holds the lease with token {lease.token}")
        print(f"a write with the first token now: accepted={fence.check('report/owner', 1)}")


def main() -> int:
    """Run the demo in a temporary directory."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="claims by a local nats-server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="collective-") as tmp:
        if args.strict:
            with nats_server() as server:
                asyncio.run(demo(Path(tmp), server.url))
        else:
            asyncio.run(demo(Path(tmp), "off"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
