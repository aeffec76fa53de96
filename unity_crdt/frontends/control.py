"""The local control API of a running node: an aiohttp server on a UNIX socket.

`unity-crdt run` starts a `ControlServer` in the node's event loop, listening on
`<cache_dir>/control.sock` (mode 0600: only the owner can talk to it, which is the whole
authentication; on Linux each connection's peer uid is checked too). The other commands are
`ControlClient` calls (`frontends.control_client`), because the running node holds the cache
lock and is the only process that may touch its docs. Edits run on the node's loop, so they
are cached and gossiped like any edit.

    GET  /status                      NodeStatus.to_dict()
    GET  /docs                        {"docs": [names]}
    GET  /docs/{name}?text=R&map=R..  {"doc", "roots": {root: value}, "untyped": [roots]}
    POST /docs/{name}                 one edit (docview.apply_edit); answers the new projection
    GET  /docs/{name}/watch?...       JSON lines: the projection now, then after each change
    POST /checkpoint, POST /restore   {"ok": true}, {"docs": [names]}
    POST /restore?progress=1          JSON lines: {"progress": {listed, total, done, nbytes}}
                                      while objects are read, then {"docs"} (or {"error"})
    GET  /search?q=&limit=&mode=&alpha=  {"hits": [{"doc", "passage", "score", "snippet"}]}
    GET  /members                     {"members": [Member...], "membership": MembershipStatus}
    POST /invite?ttl=SECONDS          {"code": invite code, "ttl": seconds}
    POST /revoke/{device_id}          {"revoked": device_id, "membership": MembershipStatus}
    GET  /metrics                     Prometheus text (also on an optional loopback TCP port,
                                      where only `localhost`, IP addresses and listed names
                                      are accepted as Host: no DNS rebinding)

The projection and the edits are `frontends._docview` (sans-IO): `text=R`, `map=R`, `array=R`
type a root, since roots received from peers are untyped until someone names their type.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import ControlError, NodeAlreadyRunning, UnityCrdtError
from ..ids import check_doc_id
from ..serving import GatedSite, ListenLimits, SiteGate
from . import _metrics as metrics
from ._docview import KINDS, Conflict, apply_edit, project
from ._origin import metrics_host
from .control_client import addressable, socket_path

if TYPE_CHECKING:
    from ..checkpoint.policy import RestoreProgress
    from ..node import Node

__all__ = ["ControlServer"]

HEARTBEAT = 10.0  # an idle watch stream writes a blank line this often to notice a gone client
MAX_BODY = 16 * 2**20
# Raw connections, capped at accept (unity_crdt.serving): the socket is the owner's only;
# the metrics port is scraped by one or two collectors.
CONTROL_LIMITS = ListenLimits(max_connections=128, max_per_ip=128, request_timeout=5.0)
METRICS_LIMITS = ListenLimits(max_connections=64, max_per_ip=16, request_timeout=5.0)


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    return str(value)


_dumps = partial(json.dumps, default=_json_default, ensure_ascii=False)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the socket file ----------------------------------------------------------------------


def _peer_pid(sock: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    pid, _uid, _gid = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    )
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
            with addressable(path) as addr:
                probe.connect(addr)
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
        pid = _peer_pid(probe)
    who = f"pid {pid}" if pid else "another process"
    raise NodeAlreadyRunning(
        f"a node is already running on this cache ({who}): stop it first or use another --cache-dir"
    )


def _bind_private(path: Path) -> socket.socket:
    """A listening-ready UNIX socket at `path`, never reachable by others even for an instant.

    It is bound inside a fresh 0700 directory, chmod-ed 0600, then renamed into place.
    """
    _clear_stale(path)
    private = Path(tempfile.mkdtemp(prefix=".control-", dir=path.parent))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with addressable(private / "s") as addr:
            sock.bind(addr)
        os.chmod(private / "s", 0o600)
        os.replace(private / "s", path)
    except BaseException:
        sock.close()
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return sock


# -- the server ---------------------------------------------------------------------------


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Same-user check on UNIX sockets; library errors become JSON answers, never tracebacks."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family == socket.AF_UNIX and hasattr(socket, "SO_PEERCRED"):
        _pid, uid, _gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
        if uid != os.getuid():
            return web.json_response({"error": "this node belongs to another user"}, status=403)
    try:
        return await handler(request)
    except Conflict as exc:
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
        doc_labels: bool = False,
        metrics_names: Sequence[str] = (),
    ) -> None:
        """`doc_labels` adds one series per doc name; `metrics_names` are host names (besides
        `localhost` and IP addresses) that a scraper may put in its Host header."""
        self.node = node
        self.path = socket_path(node.config.cache_path)
        self._metrics_at = (metrics_host, metrics_port)
        self._doc_labels = doc_labels
        self._metrics_names = tuple(metrics_names)
        self._runners: list[web.AppRunner] = []
        self._watchers: set[asyncio.Event] = set()
        self._closing = False
        self._inode: int | None = None
        self.metrics_url: str | None = None
        self.gate: SiteGate | None = None
        self.metrics_gate: SiteGate | None = None

    async def start(self) -> None:
        """Bind the socket (clearing a stale one) and, if asked, the metrics port."""
        self.gate = SiteGate(CONTROL_LIMITS, "control socket")
        app = web.Application(middlewares=[self.gate.middleware, _guard], client_max_size=MAX_BODY)
        app.router.add_get("/status", self._status)
        app.router.add_get("/docs", self._docs)
        app.router.add_get("/docs/{name}", self._get_doc)
        app.router.add_post("/docs/{name}", self._edit_doc)
        app.router.add_get("/docs/{name}/watch", self._watch)
        app.router.add_post("/checkpoint", self._checkpoint)
        app.router.add_post("/restore", self._restore)
        app.router.add_get("/search", self._search)
        app.router.add_get("/members", self._members)
        app.router.add_post("/invite", self._invite)
        app.router.add_post("/revoke/{device}", self._revoke)
        app.router.add_get("/metrics", self._metrics)
        sock = _bind_private(self.path)
        self._inode = os.stat(self.path).st_ino
        runner = self._runner(app, CONTROL_LIMITS)
        await runner.setup()
        await GatedSite(runner, self.gate, sock=sock).start()
        host, port = self._metrics_at
        if port is not None:
            self.metrics_gate = SiteGate(METRICS_LIMITS, "metrics port")
            mapp = web.Application(middlewares=[self.metrics_gate.middleware, self._host_check])
            mapp.router.add_get("/metrics", self._metrics)
            mrunner = self._runner(mapp, METRICS_LIMITS)
            await mrunner.setup()
            await GatedSite(mrunner, self.metrics_gate, host=host, port=port).start()
            bound_host, bound_port = mrunner.addresses[0][:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            self.metrics_url = f"http://{shown}:{bound_port}/metrics"

    @web.middleware
    async def _host_check(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse a Host that is a domain name nobody listed: DNS rebinding from a web page."""
        if not metrics_host(request.headers.get("Host"), self._metrics_names):
            return web.Response(status=421, text="unknown Host (see --metrics-allow-host)\n")
        return await handler(request)

    def _runner(self, app: web.Application, limits: ListenLimits) -> web.AppRunner:
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=1.0, keepalive_timeout=limits.request_timeout
        )
        self._runners.append(runner)
        return runner

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
            raise web.HTTPNotFound(
                text=_dumps({"error": f"no doc named {name!r} on this node"}),
                content_type="application/json",
            )
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
        if self.node.config.checkpoint_url is None:
            raise ControlError(
                "checkpoints are off on this node: restart it with "
                "--weaviate-url URL (or weaviate_url in its config file)"
            )

    async def _checkpoint(self, request: web.Request) -> web.Response:
        self._require_checkpoints()
        await self.node.checkpoint()
        return self._json({"ok": True})

    async def _restore(self, request: web.Request) -> web.StreamResponse:
        self._require_checkpoints()
        if request.query.get("progress") != "1":
            return self._json({"docs": await self.node.restore()})
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        lines: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        last = 0.0

        def progress(p: RestoreProgress) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= 0.1 or p.done == p.total:  # at most ten lines a second
                last = now
                lines.put_nowait({"progress": dataclasses.asdict(p)})

        async def run() -> None:
            try:
                lines.put_nowait({"docs": await self.node.restore(progress=progress)})
            except Exception as exc:  # the stream must end with a line either way
                lines.put_nowait({"error": str(exc) or type(exc).__name__})

        task = asyncio.get_running_loop().create_task(run())
        try:
            while True:
                line = await lines.get()
                await resp.write((_dumps(line) + "\n").encode())
                if "progress" not in line:
                    break
        finally:
            await task
        return resp

    async def _search(self, request: web.Request) -> web.Response:
        self._require_checkpoints()
        query = request.query.get("q", "")
        if not query.strip():
            raise ControlError("search needs a query (q=...)")
        try:
            limit = int(request.query.get("limit", "10"))
            alpha = float(request.query.get("alpha", "0.5"))
        except ValueError:
            raise ControlError("limit must be an integer and alpha a number") from None
        mode = request.query.get("mode") or None
        if mode not in (None, "keyword", "vector", "hybrid"):
            raise ControlError("mode must be keyword, vector or hybrid")
        if not 0.0 <= alpha <= 1.0:
            raise ControlError("alpha must be between 0 and 1")
        hits = await self.node.search(
            query,
            max(1, min(limit, 100)),
            mode,  # type: ignore[arg-type]
            alpha,
        )
        return self._json({"hits": [dataclasses.asdict(h) for h in hits]})

    def _membership(self) -> object:
        st = self.node.status().membership
        return dataclasses.asdict(st) if st is not None else None

    async def _members(self, request: web.Request) -> web.Response:
        members = [dataclasses.asdict(m) for m in self.node.members]
        return self._json({"members": members, "membership": self._membership()})

    async def _invite(self, request: web.Request) -> web.Response:
        try:
            ttl = float(request.query.get("ttl", "600"))
        except ValueError:
            raise ControlError("ttl must be a number of seconds") from None
        return self._json({"code": await self.node.invite(ttl), "ttl": ttl})

    async def _revoke(self, request: web.Request) -> web.Response:
        device = request.match_info["device"]
        await self.node.revoke(device)
        return self._json({"revoked": device, "membership": self._membership()})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = metrics.render(self.node.status(), doc_labels=self._doc_labels)
        return web.Response(body=body.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})
