"""Subprocess helper for F1: hold half-sent HTTP requests open against a server.

python halfopen.py HOST PORT COUNT LOCAL_ADDR HOLD_SECONDS

Opens COUNT TCP connections from LOCAL_ADDR, sends each the start of a request without the
blank line that ends its headers, prints {"connected": n}, then watches every socket for up to
HOLD_SECONDS and prints {"closed_at": [seconds after connecting, or null if still open]}.
A separate process, so its own descriptors never count against the server's.
"""

from __future__ import annotations

import asyncio
import json
import sys

REQUEST_START = b"GET /unity-crdt/v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"


async def one(host: str, port: int, local: str, hold: float) -> float | None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(local, 0))
        writer.write(REQUEST_START)
        await writer.drain()
    except OSError:
        return loop.time() - start  # refused or reset while connecting
    try:
        async with asyncio.timeout(hold):
            while await reader.read(4096):
                pass
    except TimeoutError:
        writer.close()
        return None
    except OSError:
        pass  # reset by the server
    writer.close()
    return loop.time() - start


async def main(host: str, port: int, count: int, local: str, hold: float) -> None:
    tasks = [asyncio.create_task(one(host, port, local, hold)) for _ in range(count)]
    await asyncio.sleep(0.5)
    print(json.dumps({"connected": count}), flush=True)
    print(json.dumps({"closed_at": await asyncio.gather(*tasks)}), flush=True)


if __name__ == "__main__":
    h, p, n, addr, secs = sys.argv[1:6]
    asyncio.run(main(h, int(p), int(n), addr, float(secs)))
