"""A tiny shared-notes desktop app: one Tk Text widget bound to a unity_crdt doc.

Run two of them (each with its own --name and cache) and type in either:

    python demos/tk_notes.py --name alice --secret S --port 47001
    python demos/tk_notes.py --name bob --secret S --peer ws://127.0.0.1:47001

Without --peer they also find each other by mDNS on 127.0.0.1. The node runs on its own thread
(`unity_crdt.threaded.ThreadedNode`); Tk only ever talks to it through that thread-safe API.
See docs/desktop.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from unity_crdt import NodeConfig
from unity_crdt.threaded import ThreadedNode, text_diff

POLL_MS = 50  # remote edits show up within this
STATUS_MS = 500  # title (peer count) and presence line refresh


class NotesModel:
    """Everything but the widgets: what the editor shows, and how edits flow both ways."""

    def __init__(self, node: ThreadedNode, name: str, doc: str = "notes", root: str = "body"):
        """Bind `doc`'s Text `root` on `node`; call start() once the node runs."""
        self.node, self.name, self.doc, self.root = node, name, doc, root
        self.shown = ""  # exactly what the widget displays, as last agreed with the doc
        self._cursor: int | None = None

    def start(self) -> str:
        """Watch the doc, announce ourselves, and return the text to show first."""
        self.node.watch(self.doc)
        self.shown = self.node.get_text(self.doc, self.root)
        self.set_cursor(0)
        return self.shown

    def local_edit(self, widget_text: str) -> str | None:
        """The user changed the widget: push it; return the merged text if it differs."""
        if widget_text == self.shown:
            return None
        # Rebased over whatever peers changed since the widget last agreed with the doc.
        self.shown = self.node.merge_text(self.doc, self.root, self.shown, widget_text)
        return self.shown if self.shown != widget_text else None

    def remote_edit(self) -> tuple[int, int, str] | None:
        """The edit (index, removed, inserted) to apply to the widget after peers' changes."""
        if self.doc not in self.node.poll_changes():
            return None
        current = self.node.get_text(self.doc, self.root)
        if current == self.shown:
            return None  # our own edit coming back
        edit = text_diff(self.shown, current)
        self.shown = current
        return edit

    def set_cursor(self, index: int) -> None:
        """Publish our cursor position (presence), only when it moved."""
        if index != self._cursor:
            self._cursor = index
            self.node.set_presence(self.doc, {"name": self.name, "cursor": index})

    def title(self) -> str:
        """Window title: doc, our name, and how many peers are linked."""
        n = len(self.node.peers())
        return f"{self.doc} - {self.name} - {n} peer{'s' if n != 1 else ''}"

    def others(self) -> list[str]:
        """Other users present in the doc, as 'name (line L, col C)'."""
        out = []
        for state in self.node.presence(self.doc).values():
            if not isinstance(state, dict):
                continue
            cursor = state.get("cursor")
            where = ""
            if isinstance(cursor, int | float) and 0 <= cursor <= len(self.shown):
                before = self.shown[: int(cursor)]
                line, col = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1)
                where = f" (line {line}, col {col})"
            out.append(f"{state.get('name', '?')}{where}")
        return sorted(out)


class NotesWindow:
    """The Tk view: a Text widget, a presence line, and timers that poll the model."""

    def __init__(self, model: NotesModel, geometry: str | None = None) -> None:
        """Build the widgets (needs a display)."""
        import tkinter as tk

        self.model = model
        self.root = tk.Tk()
        if geometry:
            self.root.geometry(geometry)
        self.text = tk.Text(self.root, wrap="word", undo=True, font=("DejaVu Sans", 14))
        self.status = tk.Label(self.root, anchor="w", fg="#555")
        self.status.pack(side="bottom", fill="x")
        self.text.pack(side="top", fill="both", expand=True)
        self.text.insert("1.0", model.start())
        self.text.edit_modified(False)
        self.text.bind("<<Modified>>", self._on_modified)
        self.text.bind("<KeyRelease>", self._on_cursor)
        self.text.bind("<ButtonRelease>", self._on_cursor)
        self.root.protocol("WM_DELETE_WINDOW", self.root.destroy)
        self.root.bind("<Control-q>", lambda _event: self.root.destroy())
        self.text.focus_set()  # the caret is in the notes as soon as the window shows
        self.root.after(POLL_MS, self._poll)
        self.root.after(0, self._refresh_status)

    def content(self) -> str:
        """What the widget shows."""
        return str(self.text.get("1.0", "end-1c"))

    def _apply(self, index: int, removed: int, inserted: str) -> None:
        # A minimal edit, not a full reload: Tk keeps the user's cursor and selection.
        start = f"1.0 + {index} chars"
        if removed:
            self.text.delete(start, f"1.0 + {index + removed} chars")
        if inserted:
            # Peers' text arriving at our cursor goes after it, so two users typing at one spot
            # each extend their own run instead of interleaving letter by letter.
            self.text.mark_gravity("insert", "left")
            self.text.insert(start, inserted)
            self.text.mark_gravity("insert", "right")

    def _on_modified(self, _event: Any) -> None:
        if not self.text.edit_modified():
            return  # the event also fires when we reset the flag
        self.text.edit_modified(False)
        shown = self.content()
        merged = self.model.local_edit(shown)
        if merged is not None:
            self._apply(*text_diff(shown, merged))

    def _on_cursor(self, _event: Any) -> None:
        count = self.text.count("1.0", "insert", "chars")
        self.model.set_cursor(int(count[0]) if count else 0)

    def _poll(self) -> None:
        edit = self.model.remote_edit()
        if edit is not None:
            self._apply(*edit)
        self.root.after(POLL_MS, self._poll)

    def _refresh_status(self) -> None:
        self.root.title(self.model.title())
        others = self.model.others()
        self.status.config(text="also here: " + (", ".join(others) if others else "nobody"))
        self.root.after(STATUS_MS, self._refresh_status)

    def state(self) -> dict[str, Any]:
        """What the window shows: the text, the title and the presence line."""
        return {
            "widget": self.content(),
            "title": self.root.title(),
            "status": str(self.status.cget("text")),
        }

    def report(self, meter: StallMeter) -> None:
        """Test hook: print the window's state as one JSON line whenever it changes.

        Each line carries `stall_ms`, the longest main-loop stall since the previous line.
        """
        last: dict[str, Any] = {}

        def check() -> None:
            nonlocal last
            now = self.state()
            if now != last:
                last = now
                print(json.dumps({**now, "stall_ms": meter.take()}, ensure_ascii=False), flush=True)
            self.root.after(POLL_MS, check)

        self.root.after(0, check)

    def type_slowly(self, text: str, delay_ms: int = 30) -> None:
        """Test hook: insert `text` at the cursor one character at a time, as typing would."""
        if not text:
            return
        self.text.insert("insert", text[0])
        self._on_cursor(None)
        self.root.after(delay_ms, self.type_slowly, text[1:], delay_ms)


class StallMeter:
    """The longest gap between two runs of a short Tk timer: how long the GUI could not react."""

    def __init__(self, root: Any, every_ms: int = 5) -> None:
        """Start ticking on `root`'s main loop."""
        self.root, self.every_ms = root, every_ms
        self.longest = 0.0
        self._last = time.perf_counter()
        root.after(every_ms, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.longest = max(self.longest, now - self._last)
        self._last = now
        self.root.after(self.every_ms, self._tick)

    def take(self) -> float:
        """The longest stall since the last take(), in milliseconds (then start over)."""
        longest, self.longest = self.longest, 0.0
        return round(longest * 1000, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description="Shared notes over unity_crdt (Tk).")
    p.add_argument("--name", default=os.environ.get("USER", "me"), help="your display name")
    p.add_argument(
        "--secret",
        default=os.environ.get("UNITY_CRDT_SECRET"),
        help="group secret (or UNITY_CRDT_SECRET); `unity-crdt keygen` makes one",
    )
    p.add_argument("--peer", action="append", default=[], help="ws://host:port of a peer")
    p.add_argument("--cache-dir", type=Path, help="default: ~/.unity-crdt-notes/<name>")
    p.add_argument("--doc", default="notes", help="shared doc name (default: notes)")
    p.add_argument("--port", type=int, default=0, help="listen port (default: any)")
    p.add_argument("--no-mdns", action="store_true", help="only dial --peer addresses")
    p.add_argument("--geometry", help="Tk window geometry, e.g. 600x300+0+0")
    p.add_argument("--type", default="", help="test hook: type this text at the end")
    p.add_argument("--type-after", type=float, default=0.3, help="test hook: delay, seconds")
    p.add_argument(
        "--report",
        action="store_true",
        help="test hook: print the window's state (and main-loop stalls) as JSON lines",
    )
    p.add_argument(
        "--exit-after",
        type=float,
        help="test hook: quit after N seconds and print the final state as JSON",
    )
    args = p.parse_args(argv)
    if not args.secret:
        p.error("a group secret is required: --secret or UNITY_CRDT_SECRET")
    return args


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The node's configuration for these arguments."""
    cache = args.cache_dir or Path.home() / ".unity-crdt-notes" / args.name
    return NodeConfig(
        name=args.name,
        cache_dir=cache,
        group_secret=args.secret,
        port=args.port,
        peers=tuple(args.peer),
        mdns=not args.no_mdns,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the app until its window closes."""
    args = parse_args(argv)
    with ThreadedNode(config_from_args(args)) as node:
        print(f"{args.name} listening on {node.url}", flush=True)
        window = NotesWindow(NotesModel(node, args.name, args.doc), args.geometry)
        if args.type:

            def type_at_end() -> None:
                window.text.mark_set("insert", "end-1c")
                window.type_slowly(args.type)

            window.root.after(int(args.type_after * 1000), type_at_end)
        if args.exit_after is not None:
            window.root.after(int(args.exit_after * 1000), window.root.destroy)
        if args.report:
            window.report(StallMeter(window.root))
        window.root.mainloop()
        if args.exit_after is not None or args.report:
            state = {
                "name": args.name,
                "text": node.get_text(args.doc, "body"),
                "shown": window.model.shown,
                "peers": [p.name for p in node.peers()],
                "others": window.model.others(),
            }
            print(json.dumps(state, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
