"""demos/tk_notes.py in a real X window (Xvfb), typed into with real key events (xdotool),
editing one doc with a Python node on another peer; the GUI thread never waits on the network.

The typed text is CJK and accented, not emoji: Tk 8.6 counts characters outside the Basic
Multilingual Plane differently from Python (a known limit of the demo, see docs/desktop.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import pycrdt
import pytest
from desk import REPO, remote_storm

from unity_crdt.node import Node

if TYPE_CHECKING:  # conftest is not importable as a module; fixtures carry the objects
    from conftest import MakeNode, StartApp

pytestmark = pytest.mark.desktop

DOC = "notes"
REMOTE_EDITS = 1000


def body(node: Node) -> pycrdt.Text:
    return node.doc(DOC).get("body", type=pycrdt.Text)


async def eventually(check: Callable[[], object], what: str, within: float = 15.0) -> None:
    try:
        async with asyncio.timeout(within):
            while not check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {within} s") from None


async def test_tk_window_and_remote_node_converge(
    make_node: MakeNode, start_app: StartApp, capsys: pytest.CaptureFixture[str]
) -> None:
    bob = await make_node("bob")
    app = await start_app("alice", "--peer", bob.url)
    await bob.wait_for_peers(1)
    await app.until(lambda s: s["title"] == "notes - alice - 1 peer", "the title shows the peer")

    # Bob writes; the window shows it, and where bob is.
    first = "Shopping list (from bob):\n"
    body(bob).insert(0, first)
    bob.set_presence(DOC, {"name": "bob", "cursor": len(first)})
    await app.until(lambda s: s["widget"] == first, "bob's line in the window")
    await app.until(lambda s: s["status"] == "also here: bob (line 2, col 0)", "bob's presence")

    # The user types in the window: key events, through the X server.
    await app.keys("ctrl+End")
    await app.type("- 牛奶 milk ✓\n- café crème, naïvee")
    await app.keys("BackSpace", "Return")  # a typo, fixed
    typed = "- 牛奶 milk ✓\n- café crème, naïve\n"
    await eventually(lambda: str(body(bob)) == first + typed, "bob holds what was typed")
    await app.until(lambda s: s["widget"] == first + typed, "the window keeps what was typed")

    # Both at once: bob rewrites the top line while the user types at the end.
    typing = asyncio.create_task(app.type("- 面包 bread\n"))
    await asyncio.sleep(0.1)
    body(bob).insert(len("Shopping list"), " for Saturday")  # ASCII: byte index = char index
    del body(bob)[len("Shopping list for Saturday") : len("Shopping list for Saturday (from bob)")]
    await typing
    both = "Shopping list for Saturday:\n" + typed + "- 面包 bread\n"
    await eventually(lambda: str(body(bob)) == both, "bob holds both edits")
    await app.until(lambda s: s["widget"] == both, "the window shows both edits")
    # Bob's cursor is a character index: his line grew, so it now points into line 1.
    await app.until(lambda s: s["status"] == "also here: bob (line 1, col 26)", "bob moved")
    await app.screenshot(REPO / "docs" / "img" / "tk-notes.png")

    # 1,000 remote edits, one transaction each: the window keeps up and stays responsive.
    storm = await remote_storm(bob, app, edits=REMOTE_EDITS)
    with capsys.disabled():
        print(
            f"\n[desktop] longest Tk main-loop stall while {REMOTE_EDITS} remote edits arrived: "
            f"{storm.stall_ms:.1f} ms (goal < 50 ms); edits sent in {storm.sent_s:.2f} s, "
            f"window caught up after {storm.caught_up_s:.2f} s in {storm.repaints} repaints"
        )

    assert await app.quit() == 0
    assert app.final is not None and app.final["text"] == str(body(bob))
    assert app.final["others"] == ["bob (line 1, col 26)"]
