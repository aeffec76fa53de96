"""The coordination store's compare-and-set when answers are lost (a real nats-server behind a
loopback proxy that can hold back everything the server says while the writes still land)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from unity_crdt.crypto.keys import derive_group_keys, work_names_key
from unity_crdt.errors import CoordinationError
from unity_crdt.net.nats import connect
from unity_crdt.work._kv import KvStore

pytestmark = pytest.mark.nats

SECRET = "kv test group secret: correct horse battery staple"


class MuteProxy:
    """Relays TCP to the server; while `mute`, the server's bytes are held back (not lost), so
    the client's requests time out although the server carried them out."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.mute = False
        self._released = asyncio.Event()
        self._released.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.port)
        for src, dst, gated in ((reader, up_w, False), (up_r, writer, True)):
            task = asyncio.ensure_future(self._pump(src, dst, gated))
            self._tasks.add(task)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, gated: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await src.read(65536):
                if gated:
                    await self._released.wait()
                dst.write(data)
                await dst.drain()
        dst.close()


async def _store(urls: tuple[str, ...]) -> tuple[KvStore, asyncio.Task[None]]:
    keys = derive_group_keys(SECRET)
    kv = KvStore(
        urls,
        None,
        keys,
        work_names_key(b"kv test group"),
        connect=connect,
        replicas=1,
        op_timeout=0.5,
    )
    task = asyncio.create_task(kv.run())
    await asyncio.wait_for(kv.settled.wait(), 20)
    assert kv.ready
    return kv, task


@pytest.fixture
async def stores(nats_server: Any) -> AsyncIterator[tuple[KvStore, KvStore, MuteProxy]]:
    """Two members' stores: `mine` talks through the proxy, `theirs` directly."""
    proxy = MuteProxy(int(nats_server.url.rsplit(":", 1)[1]))
    mine, t1 = await _store((await proxy.start(),))
    theirs, t2 = await _store((nats_server.url,))
    yield mine, theirs, proxy
    proxy.release()
    for kv, task in ((mine, t1), (theirs, t2)):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kv.close()
    await proxy.close()


async def _lost_answer(proxy: MuteProxy, write: Any) -> None:
    """Run `write` while the server's answers are held: it lands, its answer comes too late."""
    proxy.hold()
    with pytest.raises(CoordinationError):
        await write
    proxy.release()
    await asyncio.sleep(0.2)  # the late answers drain (and are dropped by the client)


async def test_a_renewal_whose_answer_was_lost_does_not_cost_the_claim(
    stores: tuple[KvStore, KvStore, MuteProxy],
) -> None:
    mine, theirs, proxy = stores
    ours: set[str] = set()
    rev = await mine.create("t.job.1", {"d": "me", "a": 1}, 30.0, ours)
    assert rev is not None
    await _lost_answer(proxy, mine.update("t.job.1", {"d": "me", "a": 1}, rev, 30.0, ours))
    landed = await theirs.read("t.job.1")
    assert landed is not None and landed[0] > rev  # the renewal was carried out
    # The next write (the close) still names the old revision: the server refuses it, and
    # the store must recognise the write there as its own instead of giving the task up.
    closed = await mine.update("t.job.1", {"d": "me", "a": 1, "s": "ok"}, rev, 60.0, ours)
    assert closed is not None and closed > landed[0]
    final = await theirs.read("t.job.1")
    assert final is not None and final[0] == closed and final[1] is not None
    assert final[1]["s"] == "ok"
    # Someone else's stale write is still refused: only our own writes count as ours.
    assert await theirs.update("t.job.1", {"d": "them", "a": 2}, rev, 30.0, set()) is None


async def test_a_claim_whose_answer_was_lost_is_found_to_be_ours(
    stores: tuple[KvStore, KvStore, MuteProxy],
) -> None:
    mine, theirs, proxy = stores
    ours: set[str] = set()
    await _lost_answer(proxy, mine.create("l.lease", {"d": "me"}, 30.0, ours))
    assert await theirs.create("l.lease", {"d": "them"}, 30.0, set()) is None  # it landed
    again = await mine.create("l.lease", {"d": "me"}, 30.0, ours)
    assert again is not None  # ours, not "held by someone" for the next 30 s
    found = await theirs.read("l.lease")
    assert found is not None and found[0] == again


async def test_without_our_nonces_a_held_key_stays_held(
    stores: tuple[KvStore, KvStore, MuteProxy],
) -> None:
    mine, theirs, _ = stores
    rev = await theirs.create("t.job.2", {"d": "them", "a": 1}, 30.0, set())
    assert rev is not None
    assert await mine.create("t.job.2", {"d": "me", "a": 1}, 30.0, set()) is None
    assert await mine.update("t.job.2", {"d": "me", "a": 1}, rev - 1, 30.0, set()) is None


async def test_a_closed_entry_is_replaced_only_when_the_claimer_may(
    stores: tuple[KvStore, KvStore, MuteProxy],
) -> None:
    mine, theirs, _ = stores
    rev = await theirs.create("t.job.3", {"d": "them", "a": 1}, 30.0, set())
    assert rev is not None
    closed = await theirs.update("t.job.3", {"d": "them", "a": 1, "s": "ok"}, rev, 60.0, set())
    assert closed is not None
    seen: list[dict[str, Any]] = []

    def no(entry: dict[str, Any]) -> bool:
        seen.append(entry)
        return False

    assert await mine.create("t.job.3", {"d": "me", "a": 2}, 30.0, set(), no) is None
    assert seen and seen[0]["d"] == "them" and seen[0]["s"] == "ok"
    got = await mine.create("t.job.3", {"d": "me", "a": 2}, 30.0, set(), lambda e: "s" in e)
    assert got is not None and got > closed
    # Now a live claim is there: the same test refuses it, the key stays held.
    assert (
        await theirs.create("t.job.3", {"d": "them", "a": 3}, 30.0, set(), lambda e: "s" in e)
        is None
    )
