"""demos/web in real Chromium, editing a doc live with a Python node on another peer.

The page talks y-websocket to `unity-crdt run --yjs` (node "alice", its own process); the Python
node "bob" is linked to alice over the encrypted mesh, so every edit crosses a real link.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pycrdt
import pytest
from webpage import SCREENSHOTS, eventually, page_url

from unity_crdt.node import Node

if TYPE_CHECKING:  # conftest is not importable as a module; fixtures carry the objects
    from conftest import MakeNode, OpenPage, Serve, StartCli

pytestmark = pytest.mark.browser

DOC = "notes"


def body(node: Node) -> pycrdt.Text:
    return node.doc(DOC).get("body", type=pycrdt.Text)


async def test_page_and_python_node_on_another_peer_converge(
    start_cli: StartCli, make_node: MakeNode, serve: Serve, open_page: OpenPage
) -> None:
    alice = await start_cli("alice")
    bob = await make_node("bob", peers=(alice.url,))
    await bob.wait_for_peers(1)
    bob.set_presence(DOC, {"name": "Bob (Python)", "cursor": 0})

    base = await serve("127.0.0.1")
    page = await open_page(page_url(base, alice.yjs_url, doc=DOC, name="Ada"))
    await page.wait_connected()
    await page.wait_presence(["Bob (Python) (line 1, col 0)"], within=3)

    # The page types; bob, on the other peer, holds it.
    typed = "Grüße aus dem Browser 😀 你好\n"
    await page.type_at("Control+End", typed)
    await eventually(lambda: str(body(bob)) == typed, "bob holds the typed text")

    # Bob edits in Python; the page shows it, and where his cursor is.
    mine = "Python: 東京 🎌 ✓\n"
    body(bob).insert(len(body(bob)), mine)  # pycrdt counts UTF-8 bytes: len() is the end
    both = typed + mine
    await page.wait_text(both)
    bob.set_presence(DOC, {"name": "Bob (Python)", "cursor": len(both) - 1})
    await page.wait_presence(["Bob (Python) (line 2, col 14)"])

    # Both at once: the page types at the top while bob appends at the end.
    typing = asyncio.create_task(page.type_at("Control+Home", "✍️ "))
    body(bob).insert(len(body(bob)), "— 👋 さようなら")
    await typing
    final = "✍️ " + both + "— 👋 さようなら"
    await page.wait_text(final)
    await eventually(lambda: str(body(bob)) == final, "bob holds both edits")

    assert page.errors == []
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.page.screenshot(path=SCREENSHOTS / "web-notes.png")
