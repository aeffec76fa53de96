"""The issue's end-to-end case: JS front ends on two peered nodes share docs and presence.

Written against the Node API as expected before node.py wired the endpoint: a node started with
`NodeConfig(yjs_endpoint=True, yjs_token=...)` exposes its `YWebsocketEndpoint` as
`node.ywebsocket` (see `endpoint_of`), publishes every committed update to it, forwards
front-end awareness to peers, and feeds peer awareness to `apply_peer_awareness`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pycrdt
import pytest

from unity_crdt.config import NodeConfig
from unity_crdt.frontends.ywebsocket import YWebsocketEndpoint
from unity_crdt.node import Node

if TYPE_CHECKING:  # conftest is not importable as a module; fixtures carry the objects
    from conftest import JsDriver

pytestmark = pytest.mark.interop

SECRET = "interop group secret: correct horse battery staple"
TOKEN = "front-end-token-0123456789abcdef"
ROOM = "Besprechung/Ä 😀"

MakeNode = Callable[..., Awaitable[Node]]


def endpoint_of(node: Node) -> YWebsocketEndpoint:
    """The node's y-websocket endpoint (the one place to adapt if the accessor is renamed)."""
    endpoint = node.ywebsocket  # type: ignore[attr-defined]
    assert isinstance(endpoint, YWebsocketEndpoint)
    return endpoint


def text(node: Node, doc: str = ROOM) -> str:
    return str(node.doc(doc).get("text", type=pycrdt.Text))


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[MakeNode]:
    """`await make_node(name, **config)`: a started node (127.0.0.1) serving y-websocket too."""
    nodes: list[Node] = []

    async def make(name: str, **kw: Any) -> Node:
        config = NodeConfig(
            name=name,
            cache_dir=tmp_path / name,
            group_secret=SECRET,
            mdns=False,
            yjs_endpoint=True,
            yjs_token=TOKEN,
            **kw,
        )
        node = Node(config)
        await node.start()
        nodes.append(node)
        return node

    yield make
    for node in reversed(nodes):
        await node.close()


async def test_js_on_node_a_and_python_on_node_b_edit_one_doc(
    make_node: MakeNode, js: JsDriver, eventually: Any
) -> None:
    a = await make_node("alice")
    b = await make_node("bob", peers=(a.url,))
    await a.wait_for_peers(1)
    await b.wait_for_peers(1)
    endpoint = endpoint_of(a)
    assert endpoint.host == "127.0.0.1" and endpoint.token == TOKEN

    await js.open("ui", endpoint, ROOM)
    b.doc(ROOM).get("text", type=pycrdt.Text).insert(0, "from bob ✓")
    await js.call("wait_text", id="ui", value="from bob ✓")
    await js.call("insert", id="ui", index=0, text="JS on alice 😀 ")
    await eventually(lambda: text(b) == "JS on alice 😀 from bob ✓")
    # JS indices are UTF-16: delete "😀 " (3 units) from the front end.
    await js.call("delete", id="ui", index=12, length=3)
    await eventually(lambda: text(b) == "JS on alice from bob ✓")
    assert text(a) == text(b)
    await a.flush()
    assert js.closes("ui") == []


async def test_presence_crosses_nodes_between_front_ends(
    make_node: MakeNode, js: JsDriver, make_js: Any, eventually: Any
) -> None:
    a = await make_node("alice")
    b = await make_node("bob", peers=(a.url,))
    await a.wait_for_peers(1)
    await b.wait_for_peers(1)
    on_a = await make_js()
    await on_a.open("ui-a", endpoint_of(a), ROOM)
    await js.open("ui-b", endpoint_of(b), ROOM)
    a_id = await on_a.call("client_id", id="ui-a")
    await on_a.call("set_awareness", id="ui-a", state={"user": "Zoë on alice"})
    seen = await js.call("wait_awareness", id="ui-b", count=1)
    assert seen == {str(a_id): {"user": "Zoë on alice"}}
    on_a.proc.kill()  # the front end dies without saying goodbye
    assert await js.call("wait_awareness", id="ui-b", count=0) == {}


@pytest.mark.parametrize("when", ["before the front end connects", "while it is connected"])
async def test_python_presence_reaches_front_ends_at_once(
    make_node: MakeNode, js: JsDriver, when: str
) -> None:
    # y-protocols ignores a first state with clock 0 from a client it has not seen: the Python
    # state would then show up only at its renewal, 15 s later (found by the browser tier).
    a = await make_node("alice")
    b = await make_node("bob", peers=(a.url,))
    await a.wait_for_peers(1)
    await b.wait_for_peers(1)
    if when.startswith("before"):
        b.set_presence(ROOM, {"name": "bob in Python"})
        await js.open("ui", endpoint_of(a), ROOM)
    else:
        await js.open("ui", endpoint_of(a), ROOM)
        b.set_presence(ROOM, {"name": "bob in Python"})
    seen = await js.call("wait_awareness", id="ui", count=1, timeout=3000)
    assert list(seen.values()) == [{"name": "bob in Python"}]
