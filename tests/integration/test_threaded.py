"""ThreadedNode driven from plain threads, as a GUI would: real nodes on 127.0.0.1, real caches."""

from __future__ import annotations

import asyncio
import importlib.util
import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pycrdt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from meshkit import node_config

from unity_crdt import CacheLockedError, UnityCrdtError
from unity_crdt.threaded import ThreadedNode, rebase_edit, text_diff

T = TypeVar("T")
SAMPLES = ["", "a", "héllo", "日本語テキスト", "emoji 😀 and 👩‍👩‍👧 family", "mixed é😀x"]


def wait_until(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll from the calling (non-event-loop) thread until check() holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.01)


def in_thread(fn: Callable[[], T], timeout: float = 20.0) -> T:
    """Run fn on a fresh thread (the 'GUI thread'); return its result or re-raise its error."""
    out: list[Any] = []

    def main() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as exc:
            out.append(("err", exc))

    t = threading.Thread(target=main, name="gui")
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the worker thread hung"
    kind, value = out[0]
    if kind == "err":
        raise value
    return value  # type: ignore[no-any-return]


class GuiThread:
    """A stand-in GUI main loop: a thread running functions queued by dispatch()."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="fake-gui")
        self.thread.start()

    def dispatch(self, fn: Callable[[], None]) -> None:
        self.jobs.put(fn)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            job()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(5)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[..., ThreadedNode]]:
    """Start ThreadedNodes on demand; all are closed at the end."""
    made: list[ThreadedNode] = []

    def make(name: str, dispatch: Any = None, **kw: Any) -> ThreadedNode:
        tn = ThreadedNode(node_config(tmp_path, name, **kw), dispatch=dispatch)
        made.append(tn)
        return tn.start()

    yield make
    for tn in reversed(made):
        tn.close()


def node_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("unity-crdt ")]


def test_two_nodes_sync_from_a_worker_thread(tmp_path: Path) -> None:
    def scenario() -> tuple[str, list[str], list[str]]:
        assert threading.current_thread() is not threading.main_thread()
        with ThreadedNode(node_config(tmp_path, "alice")) as alice:
            bob = ThreadedNode(node_config(tmp_path, "bob", peers=(alice.url,)))
            with bob:
                alice.watch("notes")
                bob.set_text("notes", "body", "hello world")
                bob.insert_text("notes", "body", 5, ",")
                wait_until(lambda: alice.get_text("notes", "body") == "hello, world", what="sync")
                changed = alice.poll_changes()
                return alice.get_text("notes", "body"), changed, [p.name for p in alice.peers()]

    text, changed, peers = in_thread(scenario)
    assert text == "hello, world"
    assert changed == ["notes"]
    assert peers == ["bob"]
    assert node_threads() == []  # both threads joined


def test_watch_callbacks_run_on_the_dispatching_thread(nodes: Any) -> None:
    gui = GuiThread()
    try:
        alice = nodes("alice", dispatch=gui.dispatch)
        bob = nodes("bob", peers=(alice.url,))
        seen: list[tuple[str, str, str]] = []

        def changed(doc: str) -> None:
            # The callback may read the doc through the API (a hop to the node thread).
            seen.append((doc, threading.current_thread().name, alice.get_text(doc, "body")))

        stop = alice.watch("notes", changed)
        edits = 200
        for i in range(edits):
            bob.insert_text("notes", "body", i, "x")
        wait_until(lambda: bool(seen) and seen[-1][2] == "x" * edits, what="final notification")
        assert {s[0] for s in seen} == {"notes"}
        assert {s[1] for s in seen} == {"fake-gui"}
        # Coalesced: a burst of remote updates does not cost one GUI refresh each.
        assert len(seen) < edits
        assert alice.poll_changes() == ["notes"]  # the poll queue is fed as well

        stop()
        count = len(seen)
        bob.insert_text("notes", "body", 0, "y")
        wait_until(lambda: alice.get_text("notes", "body").startswith("y"), what="sync")
        time.sleep(0.1)
        assert len(seen) == count  # unsubscribed
    finally:
        gui.stop()


def test_callbacks_run_in_poll_without_dispatch_and_inline_dispatch_is_safe(nodes: Any) -> None:
    polled = nodes("polled")
    seen: list[str] = []
    polled.watch("d", lambda doc: seen.append(polled.get_text(doc, "t")))
    polled.set_text("d", "t", "one")
    assert seen == []  # nothing runs until the GUI polls
    assert polled.poll_changes() == ["d"]
    assert seen == ["one"]
    assert polled.poll_changes() == []

    # Two watchers: stopping one (even twice) keeps the other's notifications.
    stop_first = polled.watch("w")
    polled.watch("w")
    stop_first()
    stop_first()
    polled.set_text("w", "t", "still watched")
    assert polled.poll_changes() == ["w"]

    # A dispatch that runs fn at once (on the node thread) must not find the doc borrowed.
    inline = nodes("inline", dispatch=lambda fn: fn())
    got: list[str] = []
    inline.watch("d", lambda doc: got.append(inline.get_text(doc, "t")))
    inline.set_text("d", "t", "two")
    wait_until(lambda: got == ["two"], what="inline callback")


def test_text_indices_are_python_characters(nodes: Any) -> None:
    a = nodes("a")
    b = nodes("b", peers=(a.url,))
    rng = random.Random(7)
    model = ""
    for _ in range(150):
        piece = rng.choice(SAMPLES[1:])
        if model and rng.random() < 0.3:
            i = rng.randrange(len(model))
            n = rng.randint(1, min(4, len(model) - i))
            a.delete_text("doc", "t", i, n)
            model = model[:i] + model[i + n :]
        else:
            i = rng.randint(0, len(model))
            a.insert_text("doc", "t", i, piece)
            model = model[:i] + piece + model[i:]
        assert a.get_text("doc", "t") == model
    wait_until(lambda: b.get_text("doc", "t") == model, what="peer sees the non-ASCII text")
    # Index just after a 4-byte emoji and inside a ZWJ family: never lands at the end.
    b.set_text("doc", "t", "😀é")
    b.insert_text("doc", "t", 1, "|")
    assert b.get_text("doc", "t") == "😀|é"
    with pytest.raises(IndexError):
        b.insert_text("doc", "t", 4, "x")
    with pytest.raises(IndexError):
        b.delete_text("doc", "t", 2, 2)


def test_text_diff_is_the_smallest_single_edit() -> None:
    for old in SAMPLES:
        for new in SAMPLES:
            i, removed, inserted = text_diff(old, new)
            assert old[:i] + inserted + old[i + removed :] == new
    assert text_diff("hello world", "hello, world") == (5, 0, ",")
    assert text_diff("aaa", "aa") == (2, 1, "")
    assert text_diff("日本語", "日本") == (2, 1, "")


def test_set_text_keeps_a_concurrent_edit_elsewhere(nodes: Any, tmp_path: Path) -> None:
    a = nodes("a")
    b = ThreadedNode(node_config(tmp_path, "b", peers=(a.url,))).start()
    b.set_text("d", "t", "one two three")
    wait_until(lambda: a.get_text("d", "t") == "one two three", what="seed")
    b.flush()
    b.close()
    # Offline from each other: a edits the start, b (restarted alone) edits the end.
    a.set_text("d", "t", "ONE two three")
    b = nodes("b")
    b.set_text("d", "t", "one two THREE")
    c = nodes("c", peers=(a.url, b.url))  # relays between a and b
    want = "ONE two THREE"  # a delete-all-and-reinsert would have duplicated the line
    wait_until(
        lambda: a.get_text("d", "t") == b.get_text("d", "t") == c.get_text("d", "t") == want,
        what="merge",
    )


def test_errors_propagate_to_the_caller(nodes: Any, tmp_path: Path) -> None:
    tn = nodes("n")

    def boom() -> None:
        raise ValueError("from the node thread")

    with pytest.raises(ValueError, match="from the node thread"):
        tn.call(boom)

    async def aboom(x: int) -> int:
        await asyncio.sleep(0)
        raise KeyError(x)

    with pytest.raises(KeyError):
        tn.submit(aboom, 3).result(5)
    with pytest.raises(KeyError):
        tn.run(aboom, 4)

    async def timeout_inside() -> None:
        raise TimeoutError("the work's own timeout")

    with pytest.raises(TimeoutError, match="work's own"):
        tn.run(timeout_inside)

    def slow() -> None:
        time.sleep(0.3)

    with pytest.raises(TimeoutError, match="did not answer"):
        tn.call(slow, timeout=0.05)

    # The node still works after all of that.
    tn.set_text("d", "t", "still alive")
    assert tn.get_text("d", "t") == "still alive"

    # The same cache twice: start() raises the node's own error, and the thread is gone.
    second = ThreadedNode(node_config(tmp_path, "n"))
    with pytest.raises(CacheLockedError):
        second.start()
    assert node_threads() == ["unity-crdt n"]
    with pytest.raises(UnityCrdtError, match="not running"):
        second.get_text("d", "t")


def test_calls_from_the_node_thread_do_not_deadlock(nodes: Any) -> None:
    tn = nodes("n")
    tn.set_text("d", "t", "abc")
    # Nested: a function on the node thread uses the blocking API again.
    assert tn.call(lambda: tn.get_text("d", "t") + "!") == "abc!"
    assert tn.call(tn.in_node_thread) is True
    assert tn.in_node_thread() is False

    with pytest.raises(UnityCrdtError, match="deadlock"):
        tn.call(lambda: tn.run(asyncio.sleep, 0))
    with pytest.raises(UnityCrdtError, match="deadlock"):
        tn.call(tn.close)
    # submit() from the node thread does not block, so it is allowed.
    fut = tn.call(lambda: tn.submit(asyncio.sleep, 0, "done"))
    assert fut.result(5) == "done"


def test_close_joins_the_thread_and_the_cache_reopens(tmp_path: Path) -> None:
    config = node_config(tmp_path, "n")
    tn = ThreadedNode(config).start()
    tn.set_text("d", "t", "persisted ✓")
    m = tn.call(lambda: tn.node.doc("d").get("m", type=pycrdt.Map))
    tn.call(m.__setitem__, "k", 1)
    assert node_threads() == ["unity-crdt n"]
    tn.close()
    assert node_threads() == []
    tn.close()  # twice is fine
    with pytest.raises(UnityCrdtError, match="not running"):
        tn.set_text("d", "t", "too late")
    with pytest.raises(UnityCrdtError, match="starts once"):
        tn.start()

    with ThreadedNode(config) as again:
        assert again.get_text("d", "t") == "persisted ✓"
        assert again.call(lambda: again.node.doc("d").get("m", type=pycrdt.Map)["k"]) == 1.0


def test_close_fails_work_still_running(nodes: Any, tmp_path: Path) -> None:
    tn = ThreadedNode(node_config(tmp_path, "n")).start()
    fut = tn.submit(asyncio.sleep, 60)
    tn.close()
    with pytest.raises(UnityCrdtError, match="closed"):
        fut.result(5)


def test_presence_status_and_async_work(nodes: Any) -> None:
    a = nodes("alice")
    b = nodes("bob", peers=(a.url,))
    a.run(a.node.wait_for_peers, 1, 5.0)
    a.set_presence("notes", {"name": "alice", "cursor": 3})
    wait_until(lambda: list(b.presence("notes").values()) == [{"name": "alice", "cursor": 3}])
    assert a.presence("notes") == {}  # others only
    assert list(a.presence("notes", include_self=True).values()) == [{"name": "alice", "cursor": 3}]
    status = b.status()
    assert status.name == "bob" and [p.name for p in status.peers] == ["alice"]
    assert b.url.startswith("ws://127.0.0.1:") and len(b.device_id) > 10


def splice(s: str, i: int, n: int, ins: str) -> str:
    return s[:i] + ins + s[i + n :]


@st.composite
def edit_of(draw: st.DrawFn, base: str, alphabet: str) -> tuple[int, int, str]:
    i = draw(st.integers(0, len(base)))
    return i, draw(st.integers(0, len(base) - i)), draw(st.text(alphabet, max_size=3))


@given(st.data(), st.text("abcdé日", max_size=12))
def test_rebase_keeps_both_sides_edits(data: st.DataObject, before: str) -> None:
    li, lr, ls = data.draw(edit_of(before, "xy😀"))  # the local user types these...
    ri, rr, rs = data.draw(edit_of(before, "PQ€"))  # ...and peers these
    after, current = splice(before, li, lr, ls), splice(before, ri, rr, rs)
    merged = current
    for edit in rebase_edit(before, after, current):
        merged = splice(merged, *edit)
    if current == before:
        assert merged == after
    # Only the texts are known, and in a run of repeated characters they cannot tell which one
    # an edit touched ('aaa' -> 'aa'): the edits are the ones a minimal diff sees.
    li, lr, ls = text_diff(before, after)
    ri, rr, rs = text_diff(before, current)
    # Disjoint regions (not touching): exactly both edits.
    if li + lr < ri:
        assert merged == splice(splice(before, ri, rr, rs), li, lr, ls)
    if ri + rr < li:
        assert merged == splice(splice(before, li, lr, ls), ri, rr, rs)
    # Overlapping or not, nothing either side inserted is lost.
    _, _, local_ins = text_diff(before, after)
    _, _, remote_ins = text_diff(before, current)
    assert local_ins in merged
    assert remote_ins in merged
    assert len(merged) <= len(current) + len(local_ins)  # no duplication


def test_merge_text_rebases_a_widget_edit_over_a_peer_edit(nodes: Any) -> None:
    a = nodes("a")
    b = nodes("b", peers=(a.url,))
    a.set_text("d", "t", "hello world")
    wait_until(lambda: b.get_text("d", "t") == "hello world", what="seed")
    shown = "hello world"  # what a's widget displays
    b.insert_text("d", "t", 0, "oh, ")  # a peer edits before a's cursor...
    wait_until(lambda: a.get_text("d", "t") == "oh, hello world", what="peer edit")
    # ...while a's user appends, still seeing the old text: the edit lands at the end.
    merged = a.merge_text("d", "t", shown, "hello world!")
    assert merged == "oh, hello world!"
    # A deletion around a peer's insertion spares the inserted text.
    a.set_text("d", "t", "0123456789")
    shown = "0123456789"
    a.insert_text("d", "t", 5, "PEER")
    assert a.merge_text("d", "t", shown, "09") == "0PEER9"
    wait_until(lambda: b.get_text("d", "t") == "0PEER9", what="peer sees the merge")


def load_demo() -> Any:
    """demos/tk_notes.py as a module (demos/ is not a package); importing it needs no display."""
    path = Path(__file__).resolve().parents[2] / "demos" / "tk_notes.py"
    spec = importlib.util.spec_from_file_location("tk_notes", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tk_demo_model_moves_edits_both_ways(nodes: Any, tmp_path: Path) -> None:
    demo = load_demo()
    args = demo.parse_args(["--name", "alice", "--secret", "s3cret", "--peer", "ws://h:1"])
    config = demo.config_from_args(args)
    assert config.peers == ("ws://h:1",) and config.name == "alice" and config.mdns
    assert str(config.cache_dir).endswith("alice")

    a = nodes("alice")
    b = nodes("bob", peers=(a.url,))
    alice, bob = demo.NotesModel(a, "alice"), demo.NotesModel(b, "bob")
    assert alice.start() == "" and bob.start() == ""
    # alice types; bob's widget gets exactly the edit to apply.
    assert alice.local_edit("Shopping: bread") is None  # nothing to fix up in her widget
    wait_until(lambda: b.get_text("notes", "body") == "Shopping: bread", what="sync")
    assert bob.remote_edit() == (0, 0, "Shopping: bread")
    assert bob.remote_edit() is None  # nothing new
    assert alice.remote_edit() is None  # her own edit coming back is not re-applied
    # bob edits while alice's widget is stale: alice types, the merge rebases her edit.
    bob.local_edit("Shopping: bread, milk")
    wait_until(lambda: a.get_text("notes", "body").endswith("milk"), what="bob's edit")
    merged = alice.local_edit("Shopping list: bread")
    assert merged == "Shopping list: bread, milk"  # her widget must show this now
    wait_until(lambda: bob.remote_edit() == (8, 0, " list"), what="alice's edit at bob")
    # Title and presence: peers and the others' cursors.
    wait_until(lambda: alice.title() == "notes - alice - 1 peer", what="link")
    bob.set_cursor(9)
    wait_until(lambda: alice.others() == ["bob (line 1, col 9)"], what="presence")


def test_an_app_that_forgets_close_exits_cleanly(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from unity_crdt import NodeConfig\n"
        "from unity_crdt.threaded import ThreadedNode\n"
        "cfg = NodeConfig(name='x', cache_dir=sys.argv[1], group_secret='s' * 16, mdns=False)\n"
        "tn = ThreadedNode(cfg).start()\n"
        "tn.set_text('d', 't', 'written before exit')\n"
    )  # no close(): the exit hook must close the node while thread pools still work
    cache = tmp_path / "x"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(cache)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    with ThreadedNode(node_config(tmp_path, "x")) as again:
        assert again.get_text("d", "t") == "written before exit"
