"""Helpers of the browser tier: where things are, the page as a person reads it, a CLI node."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from playwright.async_api import Page
from playwright.async_api import TimeoutError as PageTimeout

REPO = Path(__file__).resolve().parents[2]
WEB = REPO / "demos" / "web"
BUNDLE = WEB / "dist" / "app.js"
SCREENSHOTS = REPO / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
CLI = str(Path(sys.executable).with_name("unity-crdt"))
# Headless, and nothing that phones home: without these Chromium reaches for Google's servers.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]
SECRET = "browser tier group secret: correct horse battery staple"
TOKEN = "browser-tier-token-0123456789abcdef"


async def eventually(check: Callable[[], object], what: str, within: float = 10.0) -> None:
    """Poll `check()` until it is truthy, or fail saying `what` did not happen."""
    try:
        async with asyncio.timeout(within):
            while not check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {within} s") from None


def page_url(base: str, server: str, *, doc: str, name: str, token: str = TOKEN) -> str:
    """The page's address; the node's URL and token ride in the fragment (never sent)."""
    query = urlencode({"server": server, "token": token, "doc": doc, "name": name})
    return f"{base}/index.html#{query}"


class NotesPage:
    """demos/web open in its own browser context, read the way a person reads it."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.textarea = page.locator("#text")

    async def dataset(self) -> dict[str, str]:
        """The body's data-* attributes: status, connects, failures, synced."""
        found = await self.page.evaluate("() => ({...document.body.dataset})")
        return dict(found)

    async def _until(self, what: str, js: str, arg: Any = None, within: float = 10.0) -> None:
        try:
            await self.page.wait_for_function(js, arg=arg, timeout=within * 1000)
        except PageTimeout:
            shows = {
                **await self.dataset(),
                "text": await self.text(),
                "presence": await self.presence(),
            }
            raise AssertionError(f"{what}: not within {within} s; the page shows {shows}") from None

    async def wait_connected(self, within: float = 10.0) -> None:
        """Until the page says it is connected and synced."""
        await self._until(
            "connected and synced",
            "() => document.body.dataset.status === 'connected'"
            " && document.body.dataset.synced === 'true'",
            within=within,
        )

    async def wait_failures(self, count: int, within: float = 10.0) -> None:
        """Until `count` connection attempts were closed before they ever opened."""
        await self._until(
            f"{count} refused connection attempts",
            "n => Number(document.body.dataset.failures) >= n",
            count,
            within,
        )

    async def text(self) -> str:
        """What the textarea shows."""
        return await self.textarea.input_value()

    async def wait_text(self, value: str, within: float = 10.0) -> None:
        """Until the textarea shows exactly `value`."""
        await self._until(
            f"text {value!r}", "v => document.getElementById('text').value === v", value, within
        )

    async def presence(self) -> list[str]:
        """The entries of the presence list."""
        return await self.page.locator("#presence li").all_inner_texts()

    async def wait_presence(self, entries: list[str], within: float = 10.0) -> None:
        """Until the presence list shows exactly `entries`."""
        await self._until(
            f"presence {entries}",
            "want => JSON.stringify([...document.querySelectorAll('#presence li')]"
            ".map(li => li.textContent)) === JSON.stringify(want)",
            entries,
            within,
        )

    async def type_at(self, key: str, text: str) -> None:
        """Move the caret with `key` (Home, Control+End...), then type `text` key by key."""
        await self.textarea.click()
        await self.page.keyboard.press(key)
        await self.page.keyboard.type(text, delay=15)


class CliNode:
    """`unity-crdt run --yjs` in its own process, found the way an app's main process finds it."""

    def __init__(self, proc: asyncio.subprocess.Process, status: dict[str, Any]) -> None:
        self.proc = proc
        self.url: str = status["url"]
        self.yjs_url: str = status["yjs_url"]

    @classmethod
    async def start(cls, name: str, workdir: Path) -> CliNode:
        """Start a node named `name` (cache and config under `workdir`), return once it runs."""
        cache = workdir / name
        config = workdir / f"{name}.toml"
        config.write_text(
            f'[node]\nname = "{name}"\ncache_dir = "{cache}"\nmdns = false\n'
            f'yjs_token = "{TOKEN}"\n',
            encoding="utf-8",
        )
        log = workdir / f"{name}.out"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *(CLI, "run", "--yjs"),
                *("--config", str(config), "--status-interval", "0"),
                env={**os.environ, "UNITY_CRDT_SECRET": SECRET},
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        async with asyncio.timeout(30):
            while (status := await _status(cache)) is None:
                assert proc.returncode is None, log.read_text()
                await asyncio.sleep(0.2)
        return cls(proc, status)

    async def stop(self) -> int:
        """SIGTERM, as a desktop session ends it; returns the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 20)


async def _status(cache_dir: Path) -> dict[str, Any] | None:
    """`unity-crdt status --json` of the node on `cache_dir`, or None while it is not up."""
    proc = await asyncio.create_subprocess_exec(
        *(CLI, "status", "--json"),
        *("--cache-dir", str(cache_dir)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    return dict(json.loads(out)) if proc.returncode == 0 else None
