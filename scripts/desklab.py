"""A desktop on one machine: an Xvfb display, demos/tk_notes.py in it, real key events.

    with xvfb() as display:
        app = await TkNotes.start(display, "--name", "alice", "--secret", S, "--peer", url)
        await app.type("hello")            # xdotool: key events through the X server
        await app.until(lambda s: s["widget"] == "hello", "the window shows it")
        storm = await remote_storm(bob, app)  # 1,000 remote edits; the longest GUI stall

The app runs with its `--report` hook: one JSON line of what the window shows (text, title,
presence line) whenever that changes, with the longest main-loop stall since the line before.
Needs Xvfb and xdotool (scripts/system-deps.sh). The desktop test tier (tests/desktop) and
`bench/bench_desktop.py` build on it; it is a development kit, not part of the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pycrdt

if TYPE_CHECKING:
    from unity_crdt.node import Node

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demos" / "tk_notes.py"
GEOMETRY = (640, 300)  # the window's size; it sits at the display's top-left corner


@contextlib.contextmanager
def xvfb() -> Iterator[str]:
    """A private X display (`:N`, picked free by Xvfb itself) for the block's duration."""
    read, write = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x600x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    try:
        with os.fdopen(read) as f:
            number = f.readline().strip()
        assert number, "Xvfb did not start"
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(10)


class TkNotes:
    """demos/tk_notes.py running with `--report`: its window's state, line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, display: str) -> None:
        self.proc = proc
        self.display = display
        self.states: list[dict[str, Any]] = []  # every state the window reported, in order
        self.final: dict[str, Any] | None = None  # what it printed on exit
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.window = ""

    @classmethod
    async def start(cls, display: str, *args: str) -> TkNotes:
        """Run the demo on `display` with `args`; return once its window is mapped."""
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, str(DEMO), "--report", "--geometry", "{}x{}+0+0".format(*GEOMETRY)),
            *args,
            env={**os.environ, "DISPLAY": display},
            stdout=asyncio.subprocess.PIPE,
        )
        app = cls(proc, display)
        await app.until(lambda s: True, "the window's first report")
        found = await app.xdotool("search", "--sync", "--onlyvisible", "--name", "^notes - ")
        app.window = found.split()[0]  # one app per display
        return app

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            if not line.startswith(b"{"):
                continue  # "<name> listening on ..."
            data = json.loads(line)
            if "widget" in data:
                self.states.append(data)
            else:
                self.final = data
            self._changed.set()
        self._changed.set()

    @property
    def shown(self) -> dict[str, Any]:
        """The window's latest reported state."""
        return self.states[-1]

    async def until(
        self, check: Callable[[dict[str, Any]], bool], what: str, within: float = 15.0
    ) -> dict[str, Any]:
        """Wait until a reported state passes `check`; return it."""
        try:
            async with asyncio.timeout(within):
                while True:
                    if self.states and check(self.states[-1]):
                        return self.states[-1]
                    if self._reader.done():
                        raise AssertionError(f"{what}: the app exited first")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            shows = self.states[-1] if self.states else None
            raise AssertionError(
                f"{what}: not within {within} s; the window shows {shows}"
            ) from None

    async def xdotool(self, *args: str, stdin: str | None = None) -> str:
        """Run xdotool on this display (`stdin` for `--file -`); its output."""
        proc = await asyncio.create_subprocess_exec(
            "xdotool",
            *args,
            env={**os.environ, "DISPLAY": self.display},
            stdin=None if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        data = None if stdin is None else stdin.encode()
        out, _ = await asyncio.wait_for(proc.communicate(data), 30)
        assert proc.returncode == 0, f"xdotool {args} failed"
        return out.decode().strip()

    async def keys(self, *keys: str) -> None:
        """Press key combinations (X keysym names: ctrl+End, Return...) in the window."""
        await self.xdotool("windowfocus", "--sync", self.window)
        await self.xdotool("key", "--delay", "20", *keys)

    async def type(self, text: str) -> None:
        """Type `text` into the window with real key events, as a person would."""
        await self.xdotool("windowfocus", "--sync", self.window)
        # From stdin: xdotool 3.2016 would take a text starting with "-" for an option.
        await self.xdotool("type", "--delay", "25", "--file", "-", stdin=text)

    async def screenshot(self, path: Path) -> None:
        """Save what the display shows of the window as a PNG (without the blinking caret)."""
        from PIL import ImageGrab

        # Focus the root window: an unfocused Text hides its caret, so the picture is stable.
        root = await self.xdotool("search", "--maxdepth", "0", "--name", "")
        await self.xdotool("windowfocus", root.split()[0])
        await asyncio.sleep(0.3)  # Tk redraws when idle
        ImageGrab.grab(bbox=(0, 0, *GEOMETRY), xdisplay=self.display).save(path)

    async def quit(self) -> int:
        """Ctrl+Q, as a person quits; the exit code."""
        await self.keys("ctrl+q")
        code = await asyncio.wait_for(self.proc.wait(), 30)
        await self._reader
        return code

    async def kill(self) -> None:
        """End the app if it still runs (cleanup after a failed test)."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@dataclass(frozen=True)
class Storm:
    """What `remote_storm` measured."""

    stall_ms: float  # the longest main-loop stall while the edits arrived
    sent_s: float  # how long the remote node took to make them
    caught_up_s: float  # until the window showed the last one
    repaints: int  # window states reported meanwhile


async def remote_storm(
    node: Node, app: TkNotes, *, edits: int = 1000, doc: str = "notes", root: str = "body"
) -> Storm:
    """`edits` one-character inserts by `node`, one transaction each, about 1 ms apart.

    Returns once the window shows the doc exactly as `node` holds it.
    """
    text = node.doc(doc).get(root, type=pycrdt.Text)
    reported = len(app.states)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(edits):
        text.insert(len(text), "\n" if i % 50 == 49 else chr(ord("a") + i % 26))
        await asyncio.sleep(0.001)  # each goes out as its own update
    sent = loop.time() - started
    expected = str(text)
    await app.until(lambda s: s["widget"] == expected, f"the window shows all {edits} edits")
    during = app.states[reported:]
    return Storm(
        stall_ms=max(s["stall_ms"] for s in during),
        sent_s=sent,
        caught_up_s=loop.time() - started,
        repaints=len(during),
    )
