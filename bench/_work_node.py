"""A worker node for bench_work: `python -m bench._work_node '<json>'` (the secret on stdin).

Runs one Node with a worker of kind "tiny" (returns 2 * input) until stdin closes; prints
{"url", "device_id"} once started. Config keys: name, cache, peers, coordination, concurrency.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from unity_crdt import Node, NodeConfig


async def main(cfg: dict[str, Any], secret: str) -> None:
    config = NodeConfig(
        name=cfg["name"],
        cache_dir=cfg["cache"],
        group_secret=secret,
        mdns=False,
        peers=tuple(cfg["peers"]),
        coordination_url=cfg["coordination"],
    )
    node = Node(config)

    @node.worker("tiny", concurrency=int(cfg["concurrency"]))
    async def tiny(task: Any) -> int:
        return 2 * int(task.input)

    loop = asyncio.get_running_loop()
    async with node:
        print(json.dumps({"url": node.url, "device_id": node.device_id}), flush=True)
        await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin


if __name__ == "__main__":
    secret = sys.stdin.readline().strip()
    asyncio.run(main(json.loads(sys.argv[1]), secret))
