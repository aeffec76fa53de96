"""The endpoint's Origin allowlist against what real Chromium presents (issue #11, F12).

The rules (`NodeConfig.yjs_origins`): an entry is `scheme://host[:port]`; without a port it
matches any port of that scheme and host; `file://` and `app://` entries match any Origin of that
scheme; the Origin `null` is allowed only if listed; the default is ("file://", "app://",
"http://localhost", "http://127.0.0.1", "http://[::1]"). A refused page must never connect, and
the same page must work once its origin is configured.

Chromium presents a page served from http://127.0.0.2:PORT as exactly that origin, and a page
opened from a file (a browser's file:// or an Electron `loadFile`) as `Origin: null`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pycrdt
import pytest
from webpage import TOKEN, WEB, NotesPage, eventually, page_url

from unity_crdt.node import Node

if TYPE_CHECKING:  # conftest is not importable as a module; fixtures carry the objects
    from conftest import MakeNode, OpenPage, Serve

pytestmark = pytest.mark.browser

DOC = "notes"

# (where the page comes from, the allowlist entry that lets it in)
Where = Callable[["Serve"], Awaitable[tuple[str, str]]]


async def other_loopback_host(serve: Serve) -> tuple[str, str]:
    base = await serve("127.0.0.2")  # loopback, but not in the default list
    return base, base  # the exact origin, port included


async def other_loopback_any_port(serve: Serve) -> tuple[str, str]:
    return await serve("127.0.0.2"), "http://127.0.0.2"  # no port: any port of that host


async def opened_from_a_file(serve: Serve) -> tuple[str, str]:
    return f"file://{WEB}", "null"  # Chromium sends `Origin: null` for file:// pages


def body(node: Node) -> str:
    return str(node.doc(DOC).get("body", type=pycrdt.Text))


@pytest.mark.parametrize(
    "where",
    [other_loopback_host, other_loopback_any_port, opened_from_a_file],
    ids=lambda f: f.__name__,
)
async def test_page_origin_is_allowed_only_when_configured(
    make_node: MakeNode, serve: Serve, open_page: OpenPage, where: Where
) -> None:
    base, entry = await where(serve)

    # The default allowlist: the page is refused before the websocket opens, again and again.
    strict = await make_node("strict", yjs_endpoint=True, yjs_token=TOKEN)
    refused = await open_page(page_url(base, strict.ywebsocket.base_url, doc=DOC, name="Eve"))
    await refused.type_at("End", "should never arrive")
    await refused.wait_failures(3)
    seen = await refused.dataset()
    assert seen["connects"] == "0" and seen["status"] != "connected", seen
    assert strict.ywebsocket.clients() == 0
    assert body(strict) == ""

    # The same page, its origin configured: it connects and edits the doc.
    allowing = await make_node("allowing", yjs_endpoint=True, yjs_token=TOKEN, yjs_origins=(entry,))
    allowed: NotesPage = await open_page(
        page_url(base, allowing.ywebsocket.base_url, doc=DOC, name="Ada")
    )
    await allowed.wait_connected()
    await allowed.type_at("End", "allowed 😀 允许")
    await eventually(lambda: body(allowing) == "allowed 😀 允许", "the node holds the typed text")
    assert allowing.ywebsocket.clients(DOC) == 1
    assert refused.errors == [] and allowed.errors == []
