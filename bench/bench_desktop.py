"""desktop: the Tk notes window's longest main-loop stall while 1,000 remote edits arrive.

Ours: `demos/tk_notes.py` (a `ThreadedNode` on its own thread, Tk polling it every 50 ms) in an
Xvfb window, linked to a Python node that makes 1,000 one-character edits, one transaction each,
about 1 ms apart. The app's `--report` hook times a 5 ms Tk timer: the longest gap between two
of its runs is the longest time the window could not react (scripts/desklab.py).
Anchor, same app and same run: the same window for as long with no remote edits but one (the
timer's jitter and this machine's scheduling, which no app can beat). Goal: < 50 ms.
"""

from __future__ import annotations

import asyncio
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import pycrdt

from unity_crdt import Node, NodeConfig

ROUNDS = 5
EDITS = 1000
SECRET = "bench desktop group secret: correct horse battery staple"

# Loaded by path: putting scripts/ on sys.path would shadow the weaviate client package.
_spec = importlib.util.spec_from_file_location(
    "desklab", Path(__file__).resolve().parents[1] / "scripts" / "desklab.py"
)
assert _spec is not None and _spec.loader is not None
desklab = importlib.util.module_from_spec(_spec)
sys.modules["desklab"] = desklab
_spec.loader.exec_module(desklab)


async def _round(bob: Node, app: Any, text: pycrdt.Text) -> tuple[float, float]:
    """One idle stretch then one storm, from an empty doc: (idle stall, storm stall) in ms."""
    del text[0 : len(text)]
    await app.until(lambda s: s["widget"] == "", "the window is empty")
    storm = await desklab.remote_storm(bob, app, edits=EDITS)
    idle_from = len(app.states)
    await asyncio.sleep(storm.caught_up_s)
    text.insert(len(text), "!")  # one edit, so the window reports the idle stretch
    await app.until(lambda s: s["widget"].endswith("!"), "the last edit")
    idle = max(s["stall_ms"] for s in app.states[idle_from:])
    print(
        f"  {EDITS} edits in {storm.sent_s:.2f} s, shown after {storm.caught_up_s:.2f} s in "
        f"{storm.repaints} repaints: longest stall {storm.stall_ms:.1f} ms (idle {idle:.1f} ms)",
        flush=True,
    )
    return idle, storm.stall_ms


async def main() -> list[dict[str, Any]]:
    """Measure ROUNDS storms and idle stretches against one window; return the rows."""
    with tempfile.TemporaryDirectory(prefix="bench-desktop-") as tmp, desklab.xvfb() as display:
        config = NodeConfig(name="bob", cache_dir=f"{tmp}/bob", group_secret=SECRET, mdns=False)
        async with Node(config) as bob:
            app = await desklab.TkNotes.start(
                display,
                *("--name", "alice", "--secret", SECRET, "--no-mdns"),
                *("--cache-dir", f"{tmp}/alice", "--peer", bob.url),
            )
            try:
                await bob.wait_for_peers(1)
                text = bob.doc("notes").get("body", type=pycrdt.Text)
                results = [await _round(bob, app, text) for _ in range(ROUNDS)]
                assert await app.quit() == 0
            finally:
                await app.kill()
    idle = [r[0] for r in results]
    storm = [r[1] for r in results]
    med, anchor = statistics.median(storm), statistics.median(idle)
    print(f"longest stall, median of {ROUNDS}: {med:.1f} ms under edits, {anchor:.1f} ms idle")
    return [
        {
            "metric": f"Tk window: longest main-loop stall while {EDITS:,} remote edits arrive",
            "stall_ms": med,
            "stall_ms_range": f"{min(storm):.1f}-{max(storm):.1f}",
            "idle_stall_ms": anchor,
            "ratio_vs_idle": round(med / anchor, 2) if anchor else 0.0,
            "goal": "< 50 ms",
            "rounds": ROUNDS,
        }
    ]
