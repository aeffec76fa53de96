"""Real Yjs 13 + y-websocket 3 clients (Node.js processes) against the endpoint over a Replica."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pycrdt
import pytest

from unity_crdt.frontends.ywebsocket import ClientOrigin, YWebsocketLimits
from unity_crdt.sync.lib0 import varbytes, varuint
from unity_crdt.sync.yprotocol import pycrdt_index_to_yjs, yjs_index_to_pycrdt

if TYPE_CHECKING:  # conftest is not importable as a module; fixtures carry the objects
    from conftest import Hosted, JsDriver

pytestmark = pytest.mark.interop

ROOM = "Notizen/ü 😀"  # non-ASCII, with a slash and a space


def ytext(hosted: Hosted, doc: str = ROOM) -> pycrdt.Text:
    return hosted.replica.doc(doc).get("text", type=pycrdt.Text)


async def test_python_and_js_edits_cross_with_non_ascii_text(
    hosted: Hosted, js: JsDriver, eventually: Any
) -> None:
    ytext(hosted).insert(0, "héllo 😀 wörld")
    await js.open("a", hosted.endpoint, ROOM)
    assert await js.call("text", id="a") == "héllo 😀 wörld"

    # JS indices count UTF-16 units: the emoji is 2 of them, 4 UTF-8 bytes in pycrdt.
    current = str(ytext(hosted))
    at = pycrdt_index_to_yjs(current, len("héllo 😀".encode()))
    assert at == 8
    await js.call("insert", id="a", index=at, text=" ✓")
    await eventually(lambda: str(ytext(hosted)) == "héllo 😀 ✓ wörld")
    await js.call("delete", id="a", index=6, length=4)  # removes "😀 ✓"
    await eventually(lambda: str(ytext(hosted)) == "héllo  wörld")
    js_origins = {o for _d, _u, o in hosted.updates if o is not None}
    assert js_origins == {ClientOrigin("ywebsocket/1")}  # JS edits carry the client's origin

    current = str(ytext(hosted))
    ytext(hosted).insert(yjs_index_to_pycrdt(current, 6), "€🎉")
    ytext(hosted).insert(len(str(ytext(hosted)).encode()), "!")
    await js.call("wait_text", id="a", value="héllo €🎉 wörld!")
    assert hosted.replica.names() == [ROOM]


async def test_offline_js_content_uploads_on_connect_and_header_token_works(
    hosted: Hosted, js: JsDriver, eventually: Any
) -> None:
    ytext(hosted).insert(0, "node side. ")
    # A second client with an Authorization header instead of ?token=.
    await js.open("a", hosted.endpoint, ROOM, auth="header")
    await js.call("insert", id="a", index=0, text="front end. ")
    await eventually(lambda: str(ytext(hosted)) == "front end. node side. ")
    await js.open("b", hosted.endpoint, ROOM)
    assert await js.call("text", id="b") == "front end. node side. "
    await js.call("insert", id="b", index=0, text="b: ")
    await js.call("wait_text", id="a", value="b: front end. node side. ")


async def test_wrong_token_never_connects(hosted: Hosted, js: JsDriver, eventually: Any) -> None:
    await js.call("open", id="bad", url=hosted.endpoint.base_url, room=ROOM, token="x" * 32)
    await js.call("open", id="none", url=hosted.endpoint.base_url, room=ROOM)
    await eventually(
        lambda: sum(e.get("ev") == "connection-error" for e in js.events) >= 2, within=5
    )
    await js.call("insert", id="bad", index=0, text="must not arrive")
    assert not any(e.get("ev") == "sync" for e in js.events)
    assert hosted.endpoint.clients() == 0
    assert hosted.replica.names() == []


async def test_awareness_crosses_both_ways_and_leaves_with_the_client(
    hosted: Hosted, js: JsDriver, make_js: Any, eventually: Any
) -> None:
    doomed = await make_js()  # a's process gets killed: no goodbye message from its provider
    await doomed.open("a", hosted.endpoint, ROOM)
    await js.open("b", hosted.endpoint, ROOM)
    await js.open("other", hosted.endpoint, "another room")
    a_id = await doomed.call("client_id", id="a")
    await doomed.call("set_awareness", id="a", state={"user": {"name": "Zoë ✓"}, "cursor": 3})
    seen = await js.call("wait_awareness", id="b", count=1)
    assert seen == {str(a_id): {"user": {"name": "Zoë ✓"}, "cursor": 3}}
    # The node's hook saw it too, ready to forward to peers.
    await eventually(lambda: a_id in hosted.endpoint.awareness_states(ROOM))
    assert json.loads(hosted.endpoint.awareness_states(ROOM)[a_id])["user"]["name"] == "Zoë ✓"
    assert any(doc == ROOM for doc, _u in hosted.presence)

    # Presence from a peer node reaches every front end of the room, and only that room.
    state = json.dumps({"user": {"name": "peer Ünïcode"}}, ensure_ascii=False).encode()
    peer_update = varuint(1) + varuint(777) + varuint(4) + varbytes(state)
    hosted.endpoint.apply_peer_awareness(ROOM, peer_update)
    got = await doomed.call("wait_awareness", id="a", count=1)
    assert got["777"] == {"user": {"name": "peer Ünïcode"}}
    got = await js.call("wait_awareness", id="b", count=2)
    assert got["777"] == {"user": {"name": "peer Ünïcode"}}
    assert await js.call("awareness", id="other") == {}

    # A newcomer sees every existing state at once.
    await js.open("c", hosted.endpoint, ROOM)
    got = await js.call("wait_awareness", id="c", count=2)
    assert set(got) == {str(a_id), "777"}

    # When a's process dies, the others drop its state, and the node forwards the removal.
    presence_before = len(hosted.presence)
    doomed.proc.kill()
    assert set(await js.call("wait_awareness", id="b", count=1)) == {"777"}
    assert set(await js.call("wait_awareness", id="c", count=1)) == {"777"}
    assert a_id not in hosted.endpoint.awareness_states(ROOM)
    # One removal, although every y-websocket client echoes the null state back.
    assert len(hosted.presence) == presence_before + 1


async def test_five_rooms_from_one_process(hosted: Hosted, js: JsDriver, eventually: Any) -> None:
    rooms = [f"doc-{i} ✓" for i in range(5)]
    for i, room in enumerate(rooms):
        ytext(hosted, room).insert(0, f"py{i}")
        await js.open(f"c{i}", hosted.endpoint, room)
    for i in range(5):
        assert await js.call("text", id=f"c{i}") == f"py{i}"
        await js.call("insert", id=f"c{i}", index=0, text=f"js{i}-")
    await eventually(
        lambda: [str(ytext(hosted, r)) for r in rooms] == [f"js{i}-py{i}" for i in range(5)]
    )
    for room in rooms:
        ytext(hosted, room).insert(0, "»")
    for i in range(5):
        await js.call("wait_text", id=f"c{i}", value=f"»js{i}-py{i}")
    assert hosted.endpoint.clients() == 5


async def test_malformed_message_closes_only_that_client(
    make_hosted: Any, js: JsDriver, eventually: Any
) -> None:
    h = await make_hosted(YWebsocketLimits(max_message_bytes=64 * 1024))
    await js.open("good", h.endpoint, ROOM)
    url = f"{h.endpoint.url_for(ROOM)}?token={h.endpoint.token}"
    for evil, payload, code in [
        ("garbage", "ffffffff", 4400),
        ("bomb", "0002" + "06ffffffff0f00", 4400),
        ("huge", "000280c00a" + "00" * 163_840, 1009),
    ]:
        assert await js.call("raw_open", id=evil, url=url) is True
        await js.call("raw_send", id=evil, hex=payload)
        assert await js.call("raw_wait_close", id=evil) == code
    # The honest client kept its link and still syncs both ways.
    await js.call("insert", id="good", index=0, text="still fine ✓")
    text = h.replica.doc(ROOM).get("text", type=pycrdt.Text)
    await eventually(lambda: str(text) == "still fine ✓")
    text.insert(0, "» ")
    await js.call("wait_text", id="good", value="» still fine ✓")
    assert js.closes("good") == []
    assert h.endpoint.clients() == 1


async def test_edits_made_during_an_outage_merge_after_reconnect(
    hosted: Hosted, js: JsDriver, eventually: Any
) -> None:
    ytext(hosted).insert(0, "base")
    await js.open("a", hosted.endpoint, ROOM)
    await js.call("set_awareness", id="a", state={"user": "ä"})
    a_id = await js.call("client_id", id="a")
    await eventually(lambda: a_id in hosted.endpoint.awareness_states(ROOM))
    port = hosted.endpoint.port
    await hosted.endpoint.close()
    assert a_id not in hosted.endpoint.awareness_states(ROOM)
    await js.call("insert", id="a", index=4, text=" js-offline 😀")
    ytext(hosted).insert(0, "py-offline ")
    await hosted.endpoint.start("127.0.0.1", port)
    want = "py-offline base js-offline 😀"
    await eventually(lambda: str(ytext(hosted)) == want)
    await js.call("wait_text", id="a", value=want)
    # Its presence comes back although it re-announces the clock it had when it was removed.
    await eventually(lambda: a_id in hosted.endpoint.awareness_states(ROOM))
    assert js.closes("a") == [1001]  # going away: the provider reconnects by itself


async def test_the_example_script_edits_and_logs_remote_changes(
    hosted: Hosted, js_ready: Path, eventually: Any
) -> None:
    ytext(hosted).insert(0, "from the node. ")
    env = {**os.environ, "UNITY_CRDT_YJS_TOKEN": hosted.endpoint.token}
    proc = await asyncio.create_subprocess_exec(
        "node",
        "example.mjs",
        hosted.endpoint.base_url,
        ROOM,
        "from JS ✓",
        cwd=js_ready,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        await eventually(lambda: str(ytext(hosted)) == "from the node. from JS ✓")
        ytext(hosted).insert(0, "» ")
        async with asyncio.timeout(5):
            lines = []
            while '-> "» from the node. from JS ✓"' not in (
                line := (await proc.stdout.readline()).decode()
            ):
                lines.append(line)
        assert "remote change" in line
        assert any("synced" in seen for seen in lines)
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
