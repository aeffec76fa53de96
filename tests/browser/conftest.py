"""Fixtures for the browser tier: demos/web built, served on loopback, opened in real Chromium.

Chromium is Debian's (`scripts/system-deps.sh` installs it); Playwright for Python drives it
through `executable_path`, so no browser is ever downloaded. Everything listens on 127.0.0.0/8.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, async_playwright
from webpage import BUNDLE, CHROMIUM, CHROMIUM_ARGS, SECRET, WEB, CliNode, NotesPage

from unity_crdt.config import NodeConfig
from unity_crdt.node import Node


def _stale() -> bool:
    if not BUNDLE.exists():
        return True
    built = BUNDLE.stat().st_mtime
    sources = [*(WEB / "src").glob("*.js"), WEB / "package-lock.json"]
    return any(src.stat().st_mtime > built for src in sources)


@pytest.fixture(scope="session")
def web_bundle() -> Path:
    """demos/web with its bundle built (`npm ci` and `npm run build` when missing or stale)."""
    assert shutil.which("npm"), "npm is required for the browser tier (scripts/system-deps.sh)"
    if not (WEB / "node_modules" / "esbuild").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True, timeout=300)
    if _stale():
        subprocess.run(["npm", "run", "build"], cwd=WEB, check=True, timeout=120)
    return WEB


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium binary (never a downloaded one)."""
    assert Path(CHROMIUM).exists(), "chromium is required (scripts/system-deps.sh)"
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    """Chromium, headless, with a fresh throwaway profile (Playwright makes one)."""
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


Serve = Callable[[str], Awaitable[str]]


@pytest.fixture
async def serve(web_bundle: Path) -> AsyncIterator[Serve]:
    """`await serve(host)`: demos/web served over http on `host` (a free port); its base URL."""
    runners: list[web.AppRunner] = []

    async def start(host: str = "127.0.0.1") -> str:
        app = web.Application()
        app.router.add_static("/", web_bundle, show_index=False)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, 0).start()
        runners.append(runner)
        return f"http://{host}:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


OpenPage = Callable[[str], Awaitable[NotesPage]]


@pytest.fixture
async def open_page(browser: Browser, web_bundle: Path) -> OpenPage:
    """`await open_page(url)`: the notes page in a fresh browser context (no shared storage)."""

    async def opener(url: str) -> NotesPage:
        context = await browser.new_context(viewport={"width": 760, "height": 380})
        notes = NotesPage(await context.new_page())
        await notes.page.goto(url)
        return notes

    return opener


MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[MakeNode]:
    """`await make_node(name, **config)`: a started in-process node on 127.0.0.1."""
    nodes: list[Node] = []

    async def make(name: str, **kw: Any) -> Node:
        kw.setdefault("mdns", False)
        node = Node(NodeConfig(name=name, cache_dir=tmp_path / name, group_secret=SECRET, **kw))
        await node.start()
        nodes.append(node)
        return node

    yield make
    for node in reversed(nodes):
        await node.close()


StartCli = Callable[[str], Awaitable[CliNode]]


@pytest.fixture
async def start_cli(tmp_path: Path) -> AsyncIterator[StartCli]:
    """`await start_cli(name)`: `unity-crdt run --yjs` with a config file holding the token."""
    started: list[CliNode] = []

    async def start(name: str) -> CliNode:
        started.append(await CliNode.start(name, tmp_path))
        return started[-1]

    yield start
    for cli in started:
        assert await cli.stop() == 0
