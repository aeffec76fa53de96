"""The y-websocket endpoint at the byte level, with plain aiohttp clients (no Node.js needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

import aiohttp
import pycrdt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unity_crdt.errors import ConfigError, DecodeError, LimitExceeded
from unity_crdt.frontends.ywebsocket import ClientOrigin, YWebsocketLimits
from unity_crdt.sync.lib0 import read_varbytes, read_varuint, varbytes, varuint
from unity_crdt.sync.yprotocol import (
    MSG_AWARENESS,
    MSG_SYNC,
    SYNC_STEP1,
    SYNC_STEP2,
    SYNC_UPDATE,
    AwarenessTable,
    awareness_message,
    parse_message,
    pycrdt_index_to_yjs,
    sync_message,
    yjs_index_to_pycrdt,
)

if TYPE_CHECKING:  # conftest is not importable as a module; fixtures carry the objects
    from conftest import Hosted

Ws = aiohttp.ClientWebSocketResponse


def text_of(doc: pycrdt.Doc[Any]) -> str:
    return str(doc.get("text", type=pycrdt.Text))


async def next_message(ws: Ws, within: float = 2.0) -> bytes:
    msg = await asyncio.wait_for(ws.receive(), within)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    return bytes(msg.data)


def sync_payload(data: bytes) -> tuple[int, bytes]:
    message = parse_message(data)
    assert message.kind == MSG_SYNC and message.sync_type is not None
    return message.sync_type, message.payload


def awareness_entries(update: bytes) -> dict[int, tuple[int, Any]]:
    count, pos = read_varuint(update, 0)
    out = {}
    for _ in range(count):
        cid, pos = read_varuint(update, pos)
        clock, pos = read_varuint(update, pos)
        state, pos = read_varbytes(update, pos)
        out[cid] = (clock, json.loads(state))
    return out


def awareness_update(*entries: tuple[int, int, Any]) -> bytes:
    body = b"".join(
        varuint(c) + varuint(k) + varbytes(json.dumps(s, ensure_ascii=False).encode())
        for c, k, s in entries
    )
    return varuint(len(entries)) + body


async def synced(raw: Any, doc: str, **kw: Any) -> Ws:
    """Connect and finish the handshake (server step 1 answered, own step 1 answered)."""
    ws = await raw(doc, **kw)
    kind, _sv = sync_payload(await next_message(ws))
    assert kind == SYNC_STEP1
    await ws.send_bytes(sync_message(SYNC_STEP1, b"\x00"))
    kind, _update = sync_payload(await next_message(ws))
    assert kind == SYNC_STEP2
    return ws


# ---- HTTP admission ------------------------------------------------------------------------


async def test_wrong_or_missing_token_is_refused_with_401_before_upgrade(hosted: Hosted) -> None:
    url = hosted.endpoint.url_for("notes")
    token = hosted.endpoint.token
    async with aiohttp.ClientSession() as session:
        for params, headers in [
            ({}, {}),
            ({"token": "wrong-token-wrong-token"}, {}),
            ({"token": token[:-1]}, {}),
            ({}, {"Authorization": "Bearer nope-nope-nope-nope"}),
            ({}, {"Authorization": f"Basic {token}"}),
        ]:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await session.ws_connect(url, params=params, headers=headers)
            assert err.value.status == 401
        ws = await session.ws_connect(url, headers={"Authorization": f"Bearer {token}"})
        assert sync_payload(await next_message(ws))[0] == SYNC_STEP1
        await ws.close()
        # A plain GET with the right token is not an upgrade.
        async with session.get(url, params={"token": token}) as resp:
            assert resp.status == 426
    assert hosted.replica.names() == []


@pytest.mark.parametrize("path", ["%FF%FE", "bad%00name", "x" * 256, ""])
async def test_invalid_doc_names_are_refused_with_400(hosted: Hosted, path: str) -> None:
    async with aiohttp.ClientSession() as session:
        url = f"{hosted.endpoint.base_url}/{path}"
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await session.ws_connect(url, params={"token": hosted.endpoint.token})
        assert err.value.status == 400


async def test_non_ascii_doc_names_with_slashes_map_to_one_room(hosted: Hosted, raw: Any) -> None:
    name = "projets/été 😀"
    assert hosted.endpoint.url_for(name).endswith("/projets%2F%C3%A9t%C3%A9%20%F0%9F%98%80")
    ws = await synced(raw, name)
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.get("text", type=pycrdt.Text).insert(0, "x")
    await ws.send_bytes(sync_message(SYNC_UPDATE, doc.get_update()))
    await asyncio.sleep(0.05)
    assert hosted.replica.names() == [name]
    assert hosted.endpoint.clients(name) == 1
    await ws.close()


# ---- sync ----------------------------------------------------------------------------------


async def test_handshake_live_updates_and_no_echo_to_the_sender(hosted: Hosted, raw: Any) -> None:
    hosted.replica.doc("notes").get("text", type=pycrdt.Text).insert(0, "héllo")
    a = await raw("notes")
    kind, server_sv = sync_payload(await next_message(a))
    assert kind == SYNC_STEP1 and server_sv == hosted.replica.state_vector("notes")
    await a.send_bytes(sync_message(SYNC_STEP1, b"\x00"))
    kind, update = sync_payload(await next_message(a))
    assert kind == SYNC_STEP2
    mirror: pycrdt.Doc[Any] = pycrdt.Doc()
    mirror.apply_update(update)
    assert text_of(mirror) == "héllo"
    b = await synced(raw, "notes")

    # a's edit reaches the replica with a's origin, and b, but not a itself.
    before = mirror.get_state()
    mirror.get("text", type=pycrdt.Text).insert(len("héllo".encode()), " wörld")
    await a.send_bytes(sync_message(SYNC_UPDATE, mirror.get_update(before)))
    kind, _relayed = sync_payload(await next_message(b))
    assert kind == SYNC_UPDATE
    assert text_of(hosted.replica.doc("notes")) == "héllo wörld"
    origins = {origin for _doc, _u, origin in hosted.updates}
    assert origins == {None, ClientOrigin("ywebsocket/1")}

    hosted.replica.doc("notes").get("text", type=pycrdt.Text).insert(0, "» ")
    kind, next_update = sync_payload(await next_message(a))
    assert kind == SYNC_UPDATE
    mirror.apply_update(next_update)
    assert text_of(mirror) == "» héllo wörld"  # the first message after a's edit is Python's
    b_doc: pycrdt.Doc[Any] = pycrdt.Doc()
    b_doc.apply_update(hosted.replica.diff("notes", b"\x00"))
    assert text_of(b_doc) == "» héllo wörld"
    await a.close()
    await b.close()


BAD_MESSAGES = {
    "garbage": b"\xff\xff\xff",
    "unknown type": b"\x07\x00",
    "unknown sync type": b"\x00\x05\x00",
    "truncated": sync_message(SYNC_UPDATE, b"\x01\x02\x03\x04\x05")[:-2],
    "trailing bytes": sync_message(SYNC_STEP1, b"\x00") + b"\x00",
    "update bomb": sync_message(SYNC_UPDATE, b"\xff\xff\xff\xff\x0f\x00"),
    "state vector bomb": sync_message(SYNC_STEP1, b"\xff\xff\xff\x7f\x00"),
    "awareness not json": awareness_message(b"\x01\x01\x01\x03{x}"),
    "awareness trailing": awareness_message(awareness_update((1, 1, {})) + b"\x00"),
    "empty": b"",
}


@pytest.mark.parametrize("bad", list(BAD_MESSAGES))
async def test_bad_message_closes_only_that_client(hosted: Hosted, raw: Any, bad: str) -> None:
    good = await synced(raw, "notes")
    evil = await synced(raw, "notes")
    await evil.send_bytes(BAD_MESSAGES[bad])
    msg = await asyncio.wait_for(evil.receive(), 2)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4400, msg
    assert hosted.replica.names() == []  # nothing was applied
    hosted.replica.doc("notes").get("text", type=pycrdt.Text).insert(0, "still here")
    kind, _update = sync_payload(await next_message(good))
    assert kind == SYNC_UPDATE
    assert hosted.endpoint.clients("notes") == 1
    await good.close()


async def test_text_frames_and_oversize_messages_close_the_client(
    make_hosted: Any, raw: Any
) -> None:
    h = await make_hosted(YWebsocketLimits(max_message_bytes=1024))
    ws = await synced(raw, "notes", endpoint=h.endpoint)
    await ws.send_bytes(sync_message(SYNC_UPDATE, b"\x00" * 2000))
    msg = await asyncio.wait_for(ws.receive(), 2)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    ws = await synced(raw, "notes", endpoint=h.endpoint)
    await ws.send_str("hello")
    msg = await asyncio.wait_for(ws.receive(), 2)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4400
    assert h.replica.names() == []


async def test_a_client_that_falls_behind_is_dropped(make_hosted: Any, raw: Any) -> None:
    h = await make_hosted(YWebsocketLimits(max_pending_bytes=4096))
    ws = await synced(raw, "notes", endpoint=h.endpoint)
    h.replica.doc("notes").get("text", type=pycrdt.Text).insert(0, "y" * 10_000)
    msg = await asyncio.wait_for(ws.receive(), 2)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    await asyncio.sleep(0.05)
    assert h.endpoint.clients() == 0


async def test_idle_clients_get_keepalives(make_hosted: Any, raw: Any) -> None:
    h = await make_hosted(YWebsocketLimits(keepalive_s=0.2))
    ws = await synced(raw, "notes", endpoint=h.endpoint)
    data = await next_message(ws, within=1.0)
    assert data == awareness_message(b"\x00")  # zero entries: a no-op for y-protocols
    await ws.close()


async def test_close_ends_every_client_promptly(make_hosted: Any, raw: Any) -> None:
    h = await make_hosted()
    ws = await synced(raw, "notes", endpoint=h.endpoint)
    loop = asyncio.get_running_loop()
    started = loop.time()
    closing = asyncio.create_task(h.endpoint.close())
    msg = await asyncio.wait_for(ws.receive(), 2)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY
    await ws.close()
    await closing
    assert loop.time() - started < 1.5


# ---- awareness -----------------------------------------------------------------------------


async def test_awareness_relay_snapshot_and_removal_on_disconnect(hosted: Hosted, raw: Any) -> None:
    a = await synced(raw, "notes")
    b = await synced(raw, "notes")
    await a.send_bytes(awareness_message(awareness_update((11, 3, {"user": "Zoë"}))))
    got = parse_message(await next_message(b))
    assert got.kind == MSG_AWARENESS
    assert awareness_entries(got.payload) == {11: (3, {"user": "Zoë"})}
    assert hosted.presence == [("notes", got.payload)]
    peer = awareness_update((99, 1, {"user": "peer"}))
    assert hosted.endpoint.apply_peer_awareness("notes", peer) == peer  # new: relay it
    assert hosted.endpoint.apply_peer_awareness("notes", peer) is None  # seen: stop here
    for ws in (a, b):
        got = parse_message(await next_message(ws))
        assert awareness_entries(got.payload) == {99: (1, {"user": "peer"})}

    c = await raw("notes")  # a newcomer sees every live state at once
    assert sync_payload(await next_message(c))[0] == SYNC_STEP1
    got = parse_message(await next_message(c))
    assert awareness_entries(got.payload) == {11: (3, {"user": "Zoë"}), 99: (1, {"user": "peer"})}

    await a.close()
    got = parse_message(await next_message(b))
    assert awareness_entries(got.payload) == {11: (3, None)}
    assert hosted.presence[-1] == ("notes", got.payload)
    assert set(hosted.endpoint.awareness_states("notes")) == {99}
    await b.close()
    await c.close()


def test_awareness_table_follows_the_clock_rules() -> None:
    table = AwarenessTable(max_entries=3)  # a removed client keeps its slot until it expires
    owner: set[int] = set()
    assert table.apply(awareness_update((1, 5, {"a": 1})), 0.0, owner) is not None
    assert owner == {1}
    assert table.apply(awareness_update((1, 4, {"a": 0})), 1.0) is None  # older clock
    assert table.apply(awareness_update((1, 5, {"a": 2})), 1.0) is None  # same clock, state
    assert table.states() == {1: '{"a": 1}'}
    assert table.apply(awareness_update((1, 5, None)), 1.0, owner) is not None  # same-clock null
    assert table.states() == {} and owner == set()
    table.apply(awareness_update((2, 0, {}), (3, 0, {})), 1.0)
    with pytest.raises(LimitExceeded):
        table.apply(awareness_update((4, 0, {})), 1.0)
    assert table.snapshot(now=10.0, timeout=30.0) is not None
    table.expire(before=5.0)
    assert len(table) == 0 and table.snapshot(now=10.0) is None
    with pytest.raises(DecodeError):
        table.apply(b"\x05\x01", 0.0)


@given(st.binary(max_size=64))
def test_parsers_raise_only_decode_errors(data: bytes) -> None:
    for parse in (parse_message, lambda d: AwarenessTable().apply(d, 0.0)):
        with contextlib.suppress(DecodeError):
            parse(data)


@pytest.mark.parametrize("text", ["", "abc", "héllo", "a😀b€c", "😀😀"])
def test_index_conversions_between_utf16_and_utf8(text: str) -> None:
    utf16 = 0
    for i, char in enumerate(text + "\0"):
        byte = len(text[:i].encode())
        assert yjs_index_to_pycrdt(text, utf16) == byte
        assert pycrdt_index_to_yjs(text, byte) == utf16
        utf16 += 2 if ord(char) > 0xFFFF else 1


async def test_malformed_peer_awareness_raises_and_leaves_no_room(hosted: Hosted) -> None:
    with pytest.raises(DecodeError):
        hosted.endpoint.apply_peer_awareness("ghost", b"\x02\x01")
    assert hosted.endpoint.awareness_states("ghost") == {}
    assert "ghost" not in hosted.endpoint._rooms
    with pytest.raises(ConfigError):
        await hosted.endpoint.start()  # already started
