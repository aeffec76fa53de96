"""Fixtures for the Node.js interop tier: real Yjs/y-websocket clients driven over stdio."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from unity_crdt.frontends.ywebsocket import YWebsocketEndpoint, YWebsocketLimits
from unity_crdt.sync.replica import Replica

JS_DIR = Path(__file__).resolve().parents[2] / "demos" / "js"
DRIVER = JS_DIR / "interop-driver.mjs"
TOKEN = "interop-test-token-0123456789"


@pytest.fixture(scope="session")
def js_ready() -> Path:
    """demos/js with its locked dependencies installed (`npm ci` once if missing)."""
    node = shutil.which("node")
    assert node is not None, "Node.js >= 20 is required for the interop tier"
    if not (JS_DIR / "node_modules" / "y-websocket").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=300
        )
    return JS_DIR


class JsDriver:
    """One Node.js process running demos/js/interop-driver.mjs (many clients inside)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            msg = json.loads(line)
            if "re" in msg:
                fut = self._replies.pop(msg["re"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            else:
                self.events.append(msg)
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(RuntimeError("the Node.js driver exited"))

    async def call(self, op: str, **args: Any) -> Any:
        """Run one driver op and return its value; raise AssertionError if it failed."""
        assert self.proc.stdin is not None
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[self._next] = fut
        self.proc.stdin.write((json.dumps({"re": self._next, "op": op, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(fut, 15.0)
        if not reply["ok"]:
            raise AssertionError(f"JS {op} failed: {reply['error']}")
        return reply["value"]

    async def open(self, cid: str, endpoint: YWebsocketEndpoint, room: str, **kw: Any) -> None:
        """Open a WebsocketProvider for `room` and wait until it synced."""
        kw.setdefault("token", endpoint.token)
        await self.call("open", id=cid, url=endpoint.base_url, room=room, **kw)
        await self.call("wait_synced", id=cid)

    def closes(self, cid: str) -> list[int]:
        """Close codes seen so far by client `cid`."""
        return [e["code"] for e in self.events if e.get("ev") == "close" and e["id"] == cid]

    async def stop(self) -> None:
        """End the process (closing stdin ends the driver)."""
        if self.proc.stdin is not None and self.proc.returncode is None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


MakeJs = Callable[[], Any]


@pytest.fixture
async def make_js(js_ready: Path) -> AsyncIterator[MakeJs]:
    """`await make_js()`: another running driver process (stopped after the test)."""
    made: list[JsDriver] = []

    async def make() -> JsDriver:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(DRIVER),
            cwd=js_ready,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        made.append(JsDriver(proc))
        return made[-1]

    yield make
    for driver in made:
        await driver.stop()


@pytest.fixture
async def js(make_js: MakeJs) -> JsDriver:
    """A running driver process."""
    return await make_js()  # type: ignore[no-any-return]


class Hosted:
    """A Replica wired to a YWebsocketEndpoint, as the node wires them."""

    def __init__(self, limits: YWebsocketLimits | None = None) -> None:
        self.updates: list[tuple[str, bytes, object]] = []
        self.presence: list[tuple[str, bytes]] = []
        self.replica = Replica(on_update=self._on_update)
        self.endpoint = YWebsocketEndpoint(
            self.replica,
            TOKEN,
            limits=limits,
            on_awareness=lambda doc, update: self.presence.append((doc, update)),
        )

    def _on_update(self, doc: str, update: bytes, origin: object) -> None:
        self.updates.append((doc, update, origin))
        self.endpoint.publish(doc, update, origin)


MakeHosted = Callable[..., Any]


@pytest.fixture
async def make_hosted() -> AsyncIterator[MakeHosted]:
    """`await make_hosted(limits=None)`: a started endpoint on 127.0.0.1 over a fresh Replica."""
    made: list[Hosted] = []

    async def make(limits: YWebsocketLimits | None = None) -> Hosted:
        h = Hosted(limits)
        await h.endpoint.start("127.0.0.1", 0)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.endpoint.close()


@pytest.fixture
async def hosted(make_hosted: MakeHosted) -> Hosted:
    """A started endpoint with default limits."""
    return await make_hosted()  # type: ignore[no-any-return]


async def _eventually(check: Callable[[], object], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)


@pytest.fixture
def eventually() -> Callable[..., Any]:
    """`await eventually(check, within=5.0)`: poll until check() is truthy, or fail."""
    return _eventually


RawConnect = Callable[..., Any]


@pytest.fixture
async def raw(hosted: Hosted) -> AsyncIterator[RawConnect]:
    """`await raw(doc, token=TOKEN)`: a plain aiohttp websocket to the endpoint's room `doc`."""
    async with aiohttp.ClientSession() as session:

        async def connect(
            doc: str, token: str | None = TOKEN, endpoint: YWebsocketEndpoint | None = None
        ) -> aiohttp.ClientWebSocketResponse:
            params = {} if token is None else {"token": token}
            url = (endpoint or hosted.endpoint).url_for(doc)
            return await session.ws_connect(url, params=params, max_msg_size=0)

        yield connect
