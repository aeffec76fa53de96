"""ThreadedNode: a Node on its own event loop in a background thread, for GUI apps.

Desktop toolkits (Tk, Qt, wx) own the main thread and run their own loop, while a `Node` is
asyncio. `ThreadedNode` runs the node's loop in a daemon thread and gives the GUI thread a small
blocking, thread-safe API. The rules it enforces come from pycrdt (ANCHORS.md):

* A pycrdt `Doc` must only be touched on the node's loop thread: every read and edit goes
  through `call()` (or the text helpers built on it), which runs a function there and hands back
  its result or its exception.
* Nothing may read a doc inside its observer, so change notifications carry only the doc name;
  the GUI reads the doc afterwards, through `call()`. Notifications are coalesced per doc: a
  burst of remote updates costs the GUI one refresh, not one per update.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import pycrdt

from ._textedit import apply_edit, rebase_edit, text_diff, utf8_offset
from .config import NodeConfig
from .errors import UnityCrdtError
from .node import Node
from .status import Member, NodeStatus, PeerInfo
from .sync.yjs import is_empty_update

if TYPE_CHECKING:
    from .checkpoint.format import CheckpointSink
    from .net.channel import Transport
    from .store.base import Store

log = logging.getLogger(__name__)

T = TypeVar("T")
Dispatch = Callable[[Callable[[], None]], None]
ChangeCallback = Callable[[str], None]

DEFAULT_TIMEOUT = 30.0


class ThreadedNode:
    """A Node running on a background thread, driven from another (GUI) thread."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        dispatch: Dispatch | None = None,
        store: Store | None = None,
        sink: CheckpointSink | None = None,
        transports: Mapping[str, Transport] | None = None,
    ) -> None:
        """Prepare (not start) a node; `dispatch(fn)` must run `fn` soon on the GUI thread.

        `store`, `sink` and `transports` are handed to `Node` unchanged.
        """
        self.config = config
        self._node = Node(config, store=store, sink=sink, transports=transports)
        self._dispatch = dispatch
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._up = threading.Event()
        self._error: BaseException | None = None
        self._close_error: BaseException | None = None
        self._closing = False
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        # Coalesced notifications: docs changed since the last poll / the last dispatch.
        self._changed: set[str] = set()
        self._scheduled: set[str] = set()
        self._callbacks: dict[str, list[ChangeCallback]] = {}
        self._watchers: dict[str, int] = {}  # watch() calls not yet stopped, per doc
        self._subscriptions: dict[str, Any] = {}
        self._url = ""
        self._device_id = ""

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> ThreadedNode:
        """Start the node's thread; block until it listens, or raise the error it hit."""
        with self._lock:
            if self._thread is not None or self._closing:
                raise UnityCrdtError("a ThreadedNode starts once; make a new one to restart")
            self._thread = threading.Thread(
                target=self._thread_main, name=f"unity-crdt {self.config.name}", daemon=True
            )
        self._thread.start()
        if not self._up.wait(timeout):
            self.close()
            raise TimeoutError(f"node {self.config.name!r} did not start within {timeout} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        # A daemon thread dies abruptly at exit: close (flush the cache) first if the app forgot.
        _at_exit(functools.partial(_close_at_exit, weakref.ref(self)))
        return self

    def close(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Close the node (links, cache flush) and join its thread; safe to call twice."""
        if self.in_node_thread():
            raise UnityCrdtError("close() called on the node's own thread would deadlock")
        with self._lock:
            already, self._closing = self._closing, True
            thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if not already and loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended (start failed)
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"node {self.config.name!r} did not close within {timeout} s")
        self._fail_inflight()
        error, self._close_error = self._close_error, None
        if error is not None:
            raise error

    def __enter__(self) -> ThreadedNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """Whether the node is up and not closing."""
        return self._up.is_set() and self._error is None and not self._closing

    @property
    def url(self) -> str:
        """The websocket URL the node listens on (set once started)."""
        return self._url

    @property
    def device_id(self) -> str:
        """The node's stable device id (set once started)."""
        return self._device_id

    @property
    def node(self) -> Node:
        """The wrapped Node: use it only inside functions passed to call() or submit()."""
        return self._node

    def in_node_thread(self) -> bool:
        """Whether the caller runs on the node's event-loop thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    # -- running work on the node's thread ---------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = DEFAULT_TIMEOUT) -> T:
        """Run `fn(*args)` on the node's thread and return its result (or raise its error)."""
        if self.in_node_thread():
            return fn(*args)  # already on the loop: queueing and waiting would deadlock
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def runner() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

        loop = self._admit(fut)
        loop.call_soon_threadsafe(runner)
        return self._wait(fut, timeout)

    def submit(
        self, coro_fn: Callable[..., Awaitable[T]], *args: Any
    ) -> concurrent.futures.Future[T]:
        """Start `await coro_fn(*args)` on the node's loop; the future holds its outcome."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        async def runner() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(await coro_fn(*args))
            except asyncio.CancelledError:
                fut.set_exception(UnityCrdtError(f"node {self.config.name!r} closed first"))
                raise
            except BaseException as exc:
                fut.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

        loop = self._admit(fut)
        # spawn: the node keeps a reference to the task and cancels it on close.
        loop.call_soon_threadsafe(lambda: self._node.spawn(runner(), "threaded submit"))
        return fut

    def run(
        self,
        coro_fn: Callable[..., Awaitable[T]],
        *args: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> T:
        """Await `coro_fn(*args)` on the node's loop and return its result (blocking)."""
        if self.in_node_thread():
            raise UnityCrdtError(
                "run() on the node's own thread would deadlock: await the coroutine instead"
            )
        return self._wait(self.submit(coro_fn, *args), timeout)

    # -- conveniences -----------------------------------------------------------------------

    def get_text(self, doc: str, root: str) -> str:
        """The current content of Text `root` in `doc`."""
        return self.call(lambda: str(self._text(doc, root)))

    def insert_text(self, doc: str, root: str, index: int, value: str) -> None:
        """Insert `value` at Python character `index` (0..len) of Text `root` in `doc`."""

        def edit() -> None:
            text = self._text(doc, root)
            current = str(text)
            if not 0 <= index <= len(current):
                raise IndexError(f"index {index} out of range 0..{len(current)}")
            text.insert(utf8_offset(current, index), value)

        self.call(edit)

    def delete_text(self, doc: str, root: str, index: int, length: int) -> None:
        """Delete `length` Python characters at `index` of Text `root` in `doc`."""

        def edit() -> None:
            text = self._text(doc, root)
            current = str(text)
            if length < 0 or not 0 <= index <= index + length <= len(current):
                raise IndexError(f"range {index}+{length} out of range 0..{len(current)}")
            apply_edit(text, current, index, length, "")

        self.call(edit)

    def set_text(self, doc: str, root: str, value: str) -> None:
        """Make Text `root` read `value`, by the smallest single edit (keeps peers' edits)."""

        def edit() -> None:
            text = self._text(doc, root)
            current = str(text)
            apply_edit(text, current, *text_diff(current, value))

        self.call(edit)

    def merge_text(self, doc: str, root: str, before: str, after: str) -> str:
        """Apply a widget's edit `before` -> `after`, rebased over changes made since `before`.

        For an editor that shows `before` and now holds `after`: the edit lands where the user
        made it even if peers changed the text meanwhile. Returns the merged content to show.
        """

        def edit() -> str:
            text = self._text(doc, root)
            current = str(text)
            with text.doc.transaction():
                for change in rebase_edit(before, after, current):  # highest index first
                    apply_edit(text, current, *change)
                    current = str(text)
            return current

        return self.call(edit)

    def peers(self) -> list[PeerInfo]:
        """Peers with a live, authenticated link."""
        return self.call(lambda: self._node.peers)

    def status(self) -> NodeStatus:
        """A status snapshot of the node (see unity_crdt.status)."""
        return self.call(self._node.status)

    def members(self) -> list[Member]:
        """The group's roster (see `Node.members`)."""
        return self.call(lambda: self._node.members)

    def invite(self, ttl: float = 600.0) -> str:
        """A single-use join code for one new device (see `Node.invite`)."""
        return self.run(self._node.invite, ttl)

    def revoke(self, device_id: str) -> None:
        """Cut a device out of the group (see `Node.revoke`)."""
        self.run(self._node.revoke, device_id)

    def set_presence(self, doc: str, state: Any) -> None:
        """Publish this node's presence in `doc` (any JSON value; None clears it)."""
        self.call(self._node.set_presence, doc, state)

    def presence(self, doc: str, *, include_self: bool = False) -> dict[int, Any]:
        """Live presence states in `doc` (client id -> state), others only by default."""

        def read() -> dict[int, Any]:
            states = self._node.presence(doc)
            if not include_self:
                states.pop(self._node.doc(doc).client_id, None)
            return states

        return self.call(read)

    def flush(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Block until every edit made so far is durable in the local cache."""
        self.run(self._node.flush, timeout=timeout)

    # -- change notifications ---------------------------------------------------------------

    def watch(self, doc: str, callback: ChangeCallback | None = None) -> Callable[[], None]:
        """Notify changes of `doc` (local and remote); return a function that stops it.

        Changed doc names always queue for poll_changes(). A `callback(doc)` runs on the GUI
        thread: through `dispatch` if one was given, else inside poll_changes().
        """

        def subscribe() -> None:
            with self._lock:  # _run_callbacks reads the lists on the GUI thread
                self._watchers[doc] = self._watchers.get(doc, 0) + 1
                if callback is not None:
                    self._callbacks.setdefault(doc, []).append(callback)
            if doc not in self._subscriptions:
                d = self._node.doc(doc)
                self._subscriptions[doc] = d.observe(lambda event: self._observed(doc, event))

        stopped: list[bool] = []

        def unsubscribe() -> None:
            def drop() -> None:
                with self._lock:
                    callbacks = self._callbacks.get(doc, [])
                    if callback is not None and callback in callbacks:
                        callbacks.remove(callback)
                    self._watchers[doc] -= 1
                    last = self._watchers[doc] == 0
                    if last:
                        self._callbacks.pop(doc, None)
                        del self._watchers[doc]
                if last and doc in self._subscriptions:
                    self._node.doc(doc).unobserve(self._subscriptions.pop(doc))

            if self.running and not stopped:
                stopped.append(True)  # stopping twice must not drop another watcher's count
                self.call(drop)

        self.call(subscribe)
        return unsubscribe

    def poll_changes(self) -> list[str]:
        """Names of watched docs changed since the last poll (runs undispatched callbacks)."""
        with self._lock:
            changed, self._changed = sorted(self._changed), set()
        if self._dispatch is None:
            for name in changed:
                self._run_callbacks(name)
        return changed

    def _observed(self, doc: str, event: pycrdt.TransactionEvent) -> None:
        # Inside the commit: the doc is borrowed, so only note the name. Never raise here.
        try:
            if is_empty_update(bytes(event.update)):
                return
            with self._lock:
                self._changed.add(doc)
                if self._dispatch is None or doc in self._scheduled:
                    return
                self._scheduled.add(doc)
            # After the commit: a dispatch that runs `fn` at once must not find the doc borrowed.
            asyncio.get_running_loop().call_soon(self._send_dispatch, doc)
        except Exception:
            log.exception("change notification of a doc failed")

    def _send_dispatch(self, doc: str) -> None:
        assert self._dispatch is not None
        try:
            self._dispatch(lambda: self._deliver(doc))
        except Exception:
            with self._lock:
                self._scheduled.discard(doc)  # let the next change try again
            log.exception("dispatching a change notification failed")

    def _deliver(self, doc: str) -> None:
        with self._lock:
            self._scheduled.discard(doc)  # first: a change during the callbacks re-notifies
        self._run_callbacks(doc)

    def _run_callbacks(self, doc: str) -> None:
        with self._lock:
            callbacks = list(self._callbacks.get(doc, ()))
        for callback in callbacks:
            try:
                callback(doc)
            except Exception:
                log.exception("a change callback raised")

    # -- internals --------------------------------------------------------------------------

    def _text(self, doc: str, root: str) -> pycrdt.Text:
        text: pycrdt.Text = self._node.doc(doc).get(root, type=pycrdt.Text)
        return text

    def _admit(self, fut: concurrent.futures.Future[Any]) -> asyncio.AbstractEventLoop:
        with self._lock:
            dead = self._closing or self._error is not None or not self._up.is_set()
            if dead or self._loop is None:
                raise UnityCrdtError(f"node {self.config.name!r} is not running")
            self._inflight.add(fut)
        fut.add_done_callback(self._discard)
        return self._loop

    def _discard(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._inflight.discard(fut)

    def _wait(self, fut: concurrent.futures.Future[T], timeout: float | None) -> T:
        # Not `except TimeoutError` around result(): the work itself may raise TimeoutError.
        done, _ = concurrent.futures.wait([fut], timeout)
        if not done:
            raise TimeoutError(
                f"the node's thread did not answer within {timeout} s (the work may still run)"
            )
        return fut.result()

    def _fail_inflight(self) -> None:
        with self._lock:
            pending, self._inflight = list(self._inflight), set()
        for fut in pending:
            if not fut.done():
                fut.set_exception(UnityCrdtError(f"node {self.config.name!r} closed"))

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                self._up.set()  # wake start() even on the most unexpected failure

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        stop = asyncio.Event()
        with self._lock:
            self._loop, self._stop = loop, stop
        try:
            await self._node.start()
            self._url, self._device_id = self._node.url, self._node.device_id
        except BaseException as exc:
            self._error = exc
            await self._close_node()
            self._close_error = None  # start()'s caller gets the root cause, not the cleanup
            self._up.set()
            return
        self._up.set()
        if self._closing:
            stop.set()  # close() ran before the loop existed
        await stop.wait()
        await self._close_node()

    async def _close_node(self) -> None:
        try:
            await self._node.close()
        except Exception as exc:
            log.error("closing node %r failed: %s", self.config.name, exc)
            self._close_error = exc


def _at_exit(hook: Callable[[], None]) -> None:
    """Run `hook` at interpreter exit while thread pools still work (asyncio.to_thread).

    atexit runs after concurrent.futures has shut its pools down, too late for the store's
    close; threading's own exit hooks run before that (private API, hence the fallback).
    """
    register = getattr(threading, "_register_atexit", None)
    with contextlib.suppress(RuntimeError):  # the interpreter is already shutting down
        (register or atexit.register)(hook)


def _close_at_exit(ref: weakref.ref[ThreadedNode]) -> None:
    tn = ref()
    if tn is not None and tn.running:
        try:
            tn.close()
        except Exception as exc:
            log.error("closing node %r at exit failed: %s", tn.config.name, exc)
