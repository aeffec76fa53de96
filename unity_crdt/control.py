"""The local control API of a running node: aiohttp over a UNIX socket, and its client.

`unity-crdt run` starts a `ControlServer` in the node's event loop, listening on
`<cache_dir>/control.sock` (mode 0600: only the owner can talk to it, which is the whole
authentication; on Linux each connection's peer uid is checked too). The other commands are
`ControlClient` calls, because the running node holds the cache lock and is the only process
that may touch its docs. Edits run on the node's loop, so they are cached and gossiped like
any edit.

    GET  /status                      NodeStatus.to_dict()
    GET  /docs                        {"docs": [names]}
    GET  /docs/{name}?text=R&map=R..  {"doc", "roots": {root: value}, "untyped": [roots]}
    POST /docs/{name}                 one edit (see apply_edit); answers the new projection
    GET  /docs/{name}/watch?...       JSON lines: the projection now, then after each change
    POST /checkpoint, POST /restore   {"ok": true}, {"docs": [names]}
    GET  /search?q=&limit=            {"hits": [{"doc", "score", "snippet"}]}
    GET  /metrics                     Prometheus text (also on an optional loopback TCP port)

Doc roots received from peers are untyped until someone names their type, and a client
cannot guess it: the projection shows typed roots and lists the others under "untyped";
`text=R`, `map=R`, `array=R` type a root (Text -> str, Map -> dict, Array -> list).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import pycrdt
from aiohttp import web

from . import metrics
from .errors import UnityCrdtError
from .ids import check_doc_id

if TYPE_CHECKING:
    from .node import Node

__all__ = [
    "KINDS", "SOCKET_NAME", "ControlClient", "ControlError", "ControlServer", "NoNodeRunning",
    "NodeAlreadyRunning", "apply_edit", "project", "socket_path",
]  # fmt: skip

SOCKET_NAME = "control.sock"
KINDS: dict[str, type[Any]] = {"text": pycrdt.Text, "map": pycrdt.Map, "array": pycrdt.Array}
HEARTBEAT = 10.0  # an idle watch stream writes a blank line this often to notice a gone client
MAX_BODY = 16 * 2**20
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; keep a margin
Types = Sequence[tuple[str, str]]  # (kind, root) pairs


class ControlError(UnityCrdtError):
    """The control API refused a request or could not be reached."""


class NoNodeRunning(ControlError):
    """Nobody listens on the control socket of this cache dir."""


class NodeAlreadyRunning(ControlError):
    """A live node already serves this cache dir's control socket."""


class _Conflict(UnityCrdtError):
    """A request contradicts the doc (e.g. a Map root edited as Text): HTTP 409."""


def socket_path(cache_dir: str | Path) -> Path:
    """Where the control socket of the node using `cache_dir` lives."""
    return Path(cache_dir) / SOCKET_NAME


# -- doc projection and edits (run on the node's loop) ------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    return str(value)


_dumps = partial(json.dumps, default=_json_default, ensure_ascii=False)


def _plain(value: object) -> Any:
    if isinstance(value, pycrdt.Text):
        return str(value)
    if isinstance(value, pycrdt.Map | pycrdt.Array):
        return value.to_py()
    return str(value)  # XML types: their string form


def _typed_root(doc: pycrdt.Doc[Any], root: str, kind: str) -> Any:
    """Root `root` as `kind`, refusing to re-type a root this node already knows otherwise."""
    cls = KINDS.get(kind)
    if cls is None:
        raise ControlError(f"unknown root type {kind!r}: use one of {', '.join(KINDS)}")
    if not isinstance(root, str) or not root:
        raise ControlError("a root name must be a non-empty string")
    known = dict(doc.items()).get(root)
    if known is not None and not isinstance(known, cls):
        raise _Conflict(f"root {root!r} is a {type(known).__name__} on this node, not a {kind}")
    return doc.get(root, type=cls)


def project(doc: pycrdt.Doc[Any], types: Types = ()) -> dict[str, Any]:
    """Typed roots as plain values, after typing the (kind, root) pairs; untyped roots listed."""
    for kind, root in types:
        _typed_root(doc, root, kind)
    roots: dict[str, Any] = {}
    untyped: list[str] = []
    for key, value in sorted(doc.items()):
        if value is None:
            untyped.append(key)
        else:
            roots[key] = _plain(value)
    return {"roots": roots, "untyped": untyped}


def apply_edit(doc: pycrdt.Doc[Any], edit: Mapping[str, Any]) -> None:
    """Apply one edit in one transaction.

    {"kind": "text", "root": R, "value": str, "append": bool}   replace (or append to) a Text
    {"kind": "map", "root": R, "key": K, "value": JSON}         set one key of a Map
    {"kind": "map", "root": R, "key": K, "delete": true}        delete one key of a Map
    {"kind": "array", "root": R, "value": JSON}                 append one item to an Array
    """
    kind, root = edit.get("kind"), edit.get("root")
    if not isinstance(kind, str) or not isinstance(root, str):
        raise ControlError("an edit needs a 'kind' and a 'root'")
    target = _typed_root(doc, root, kind)
    with doc.transaction():
        if kind == "text":
            value = edit.get("value")
            if not isinstance(value, str):
                raise ControlError("a text edit needs a string 'value'")
            if not edit.get("append"):
                target.clear()
            target += value
        elif kind == "map":
            key = edit.get("key")
            if not isinstance(key, str) or not key:
                raise ControlError("a map edit needs a non-empty string 'key'")
            if edit.get("delete"):
                if key in target:
                    del target[key]
            else:
                target[key] = edit.get("value")
        else:
            target.append(edit.get("value"))


# -- the server ---------------------------------------------------------------------------


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """A socket address for `path`, even when it is too long for sockaddr_un (Linux /proc)."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    if not Path("/proc/self/fd").is_dir():
        raise ControlError(f"the cache dir path is too long for a control socket: {path.parent}")
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _peer_pid(sock: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))  # fmt: skip
    return int(pid)


def _clear_stale(path: Path) -> None:
    """Remove a control socket left by a crashed run; refuse if a node still answers on it."""
    if not os.path.lexists(path):
        return
    if not path.is_socket():
        raise ControlError(f"{path} exists and is not a socket: move it away")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            with _addressable(path) as addr:
                probe.connect(addr)
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
        pid = _peer_pid(probe)
    who = f"pid {pid}" if pid else "another process"
    raise NodeAlreadyRunning(f"a node is already running on this cache ({who}): stop it first "
                             "or use another --cache-dir")  # fmt: skip


def _bind_private(path: Path) -> socket.socket:
    """A listening-ready UNIX socket at `path`, never reachable by others even for an instant.

    It is bound inside a fresh 0700 directory, chmod-ed 0600, then renamed into place.
    """
    _clear_stale(path)
    private = Path(tempfile.mkdtemp(prefix=".control-", dir=path.parent))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _addressable(private / "s") as addr:
            sock.bind(addr)
        os.chmod(private / "s", 0o600)
        os.replace(private / "s", path)
    except BaseException:
        sock.close()
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return sock


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Same-user check on UNIX sockets; library errors become JSON answers, never tracebacks."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family == socket.AF_UNIX and hasattr(socket, "SO_PEERCRED"):
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))  # fmt: skip
        if uid != os.getuid():
            return web.json_response({"error": "this node belongs to another user"}, status=403)
    try:
        return await handler(request)
    except _Conflict as exc:
        return web.json_response({"error": str(exc)}, status=409)
    except UnityCrdtError as exc:
        return web.json_response({"error": str(exc)}, status=400)


def _types_of(request: web.Request) -> list[tuple[str, str]]:
    return [(kind, root) for kind in KINDS for root in request.query.getall(kind, [])]


class ControlServer:
    """Serves the control API of `node` on its cache dir's socket (and optional /metrics port)."""

    def __init__(
        self,
        node: Node,
        *,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = None,
        doc_labels: bool = True,
    ) -> None:
        self.node = node
        self.path = socket_path(node.config.cache_path)
        self._metrics_at = (metrics_host, metrics_port)
        self._doc_labels = doc_labels
        self._runners: list[web.AppRunner] = []
        self._watchers: set[asyncio.Event] = set()
        self._closing = False
        self._inode: int | None = None
        self.metrics_url: str | None = None

    async def start(self) -> None:
        """Bind the socket (clearing a stale one) and, if asked, the metrics port."""
        app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY)
        app.router.add_get("/status", self._status)
        app.router.add_get("/docs", self._docs)
        app.router.add_get("/docs/{name}", self._get_doc)
        app.router.add_post("/docs/{name}", self._edit_doc)
        app.router.add_get("/docs/{name}/watch", self._watch)
        app.router.add_post("/checkpoint", self._checkpoint)
        app.router.add_post("/restore", self._restore)
        app.router.add_get("/search", self._search)
        app.router.add_get("/metrics", self._metrics)
        sock = _bind_private(self.path)
        self._inode = os.stat(self.path).st_ino
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self._runners.append(runner)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        host, port = self._metrics_at
        if port is not None:
            mapp = web.Application()
            mapp.router.add_get("/metrics", self._metrics)
            mrunner = web.AppRunner(mapp, access_log=None, shutdown_timeout=1.0)
            self._runners.append(mrunner)
            await mrunner.setup()
            await web.TCPSite(mrunner, host, port).start()
            bound_host, bound_port = mrunner.addresses[0][:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            self.metrics_url = f"http://{shown}:{bound_port}/metrics"

    async def close(self) -> None:
        """Stop serving: end watch streams, close the sites, remove our socket file."""
        self._closing = True
        for event in self._watchers:
            event.set()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    # -- handlers -------------------------------------------------------------------------

    @staticmethod
    def _json(data: object, status: int = 200) -> web.Response:
        return web.json_response(data, status=status, dumps=_dumps)

    def _existing(self, request: web.Request) -> str:
        name = check_doc_id(request.match_info["name"])
        if name not in self.node.docs:
            raise web.HTTPNotFound(text=_dumps({"error": f"no doc named {name!r} on this node"}),
                                   content_type="application/json")  # fmt: skip
        return name

    async def _status(self, request: web.Request) -> web.Response:
        return self._json(self.node.status().to_dict())

    async def _docs(self, request: web.Request) -> web.Response:
        return self._json({"docs": self.node.docs})

    async def _get_doc(self, request: web.Request) -> web.Response:
        name = self._existing(request)
        return self._json({"doc": name, **project(self.node.doc(name), _types_of(request))})

    async def _edit_doc(self, request: web.Request) -> web.Response:
        name = check_doc_id(request.match_info["name"])
        try:
            edit = await request.json()
        except ValueError:
            raise ControlError("the edit must be a JSON object") from None
        if not isinstance(edit, dict):
            raise ControlError("the edit must be a JSON object")
        doc = self.node.doc(name)
        apply_edit(doc, edit)
        await self.node.flush()  # answer only once the edit is durable in the local cache
        return self._json({"doc": name, **project(doc, [(edit["kind"], edit["root"])])})

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        # Watching a doc that does not exist yet creates it empty and waits for its content.
        name = check_doc_id(request.match_info["name"])
        types = _types_of(request)
        doc = self.node.doc(name)
        view = project(doc, types)  # validate the types before the 200 goes out
        changed = asyncio.Event()
        # The observer only sets a flag: pycrdt forbids reading the doc inside it.
        subscription = doc.observe(lambda _event: changed.set())
        self._watchers.add(changed)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            await resp.prepare(request)
            last = None
            while not self._closing:
                if view != last:
                    await resp.write((_dumps({"doc": name, **view}) + "\n").encode())
                    last = view
                try:
                    await asyncio.wait_for(changed.wait(), HEARTBEAT)
                except TimeoutError:
                    await resp.write(b"\n")
                    continue
                changed.clear()
                view = project(doc, types)
        except ConnectionError:
            pass  # the client went away
        finally:
            self._watchers.discard(changed)
            doc.unobserve(subscription)
        return resp

    def _require_checkpoints(self) -> None:
        if self.node.config.weaviate_url is None:
            raise ControlError(
                "checkpoints are off on this node: restart it with "
                "--weaviate-url URL (or weaviate_url in its config file)"
            )

    async def _checkpoint(self, request: web.Request) -> web.Response:
        self._require_checkpoints()
        await self.node.checkpoint()
        return self._json({"ok": True})

    async def _restore(self, request: web.Request) -> web.Response:
        self._require_checkpoints()
        return self._json({"docs": await self.node.restore()})

    async def _search(self, request: web.Request) -> web.Response:
        self._require_checkpoints()
        query = request.query.get("q", "")
        if not query.strip():
            raise ControlError("search needs a query (q=...)")
        try:
            limit = int(request.query.get("limit", "10"))
        except ValueError:
            raise ControlError("limit must be an integer") from None
        hits = await self.node.search(query, max(1, min(limit, 100)))
        return self._json({"hits": [{"doc": h.doc, "score": h.score, "snippet": h.snippet}
                                    for h in hits]})  # fmt: skip

    async def _metrics(self, request: web.Request) -> web.Response:
        body = metrics.render(self.node.status(), doc_labels=self._doc_labels)
        return web.Response(body=body.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})


# -- the client ---------------------------------------------------------------------------


class ControlClient:
    """Talks to the node running on `cache_dir` (an async context manager)."""

    def __init__(self, cache_dir: str | Path, *, timeout: float | None = 30.0) -> None:
        self.cache_dir = Path(cache_dir)
        self.path = socket_path(cache_dir)
        self._timeout = timeout
        self._stack = contextlib.ExitStack()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControlClient:
        addr = self._stack.enter_context(_addressable(self.path))
        self._session = aiohttp.ClientSession(
            base_url="http://unity-crdt", connector=aiohttp.UnixConnector(path=addr),
            timeout=aiohttp.ClientTimeout(total=self._timeout, sock_connect=5.0),
        )  # fmt: skip
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        self._stack.close()

    def _no_node(self) -> NoNodeRunning:
        d = self.cache_dir
        return NoNodeRunning(f"no node is running on {d}; start one with "
                             f"`unity-crdt run --cache-dir {d} ...`")  # fmt: skip

    @contextlib.asynccontextmanager
    async def _request(
        self, method: str, path: str, *, patient: bool = False, **kw: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        if self._session is None:
            raise ControlError("use `async with ControlClient(...)`")
        if patient:  # long work (restore, checkpoint) or a stream: no overall deadline
            kw["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=5.0)
        try:
            async with self._session.request(method, path, **kw) as resp:
                if resp.status >= 400:
                    try:
                        message = (await resp.json(content_type=None))["error"]
                    except (ValueError, KeyError, TypeError):
                        message = f"HTTP {resp.status}"
                    raise ControlError(str(message))
                yield resp
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, PermissionError):
                raise ControlError(
                    f"cannot reach the node on {self.cache_dir}: permission "
                    "denied (its control socket belongs to another user)"
                ) from None
            raise self._no_node() from None
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ControlError(f"the node on {self.cache_dir} stopped answering "
                               f"({type(exc).__name__})") from None  # fmt: skip

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        async with self._request(method, path, **kw) as resp:
            return await resp.json()

    @staticmethod
    def _doc_path(name: str) -> str:
        return f"/docs/{quote(check_doc_id(name), safe='')}"

    @staticmethod
    def _query(types: Types) -> list[tuple[str, str]]:
        return [(kind, root) for kind, root in types]

    async def status(self) -> dict[str, Any]:
        """The node's NodeStatus as a dict."""
        result: dict[str, Any] = await self._json("GET", "/status")
        return result

    async def docs(self) -> list[str]:
        """Names of the node's docs."""
        return list((await self._json("GET", "/docs"))["docs"])

    async def get_doc(self, name: str, types: Types = ()) -> dict[str, Any]:
        """The projection of one doc: {"doc", "roots", "untyped"}."""
        result: dict[str, Any] = await self._json(
            "GET", self._doc_path(name), params=self._query(types)
        )
        return result

    async def edit(self, name: str, edit: Mapping[str, Any]) -> dict[str, Any]:
        """Apply one edit (see apply_edit) once it is durable; return the edited root's view."""
        result: dict[str, Any] = await self._json("POST", self._doc_path(name), json=dict(edit))
        return result

    async def watch(self, name: str, types: Types = ()) -> AsyncGenerator[dict[str, Any], None]:
        """The doc's projection now, then again after every change, until the node stops."""
        async with self._request("GET", self._doc_path(name) + "/watch", patient=True,
                                 params=self._query(types)) as resp:  # fmt: skip
            try:
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
            except aiohttp.ClientPayloadError:
                return  # the node shut down mid-stream

    async def checkpoint(self) -> None:
        """Checkpoint every changed doc now."""
        await self._json("POST", "/checkpoint", patient=True)

    async def restore(self) -> list[str]:
        """Merge the group's checkpoints; the names of the docs touched."""
        return list((await self._json("POST", "/restore", patient=True))["docs"])

    async def search(self, query: str, limit: int = 10) -> list[dict[str, Any]]:
        """Keyword search over checkpointed searchable docs."""
        found = await self._json("GET", "/search", params={"q": query, "limit": str(limit)})
        return list(found["hits"])

    async def metrics(self) -> str:
        """The Prometheus exposition."""
        async with self._request("GET", "/metrics") as resp:
            return await resp.text()
