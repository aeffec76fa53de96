"""The client of a running node's control API (unity_crdt.control), and where its socket is.

`unity-crdt status`, `doc`, `checkpoint`, `restore` and `search` are `ControlClient` calls:
HTTP over `<cache_dir>/control.sock`, because the running node holds the cache lock and is
the only process that may touch its docs. Errors are `ControlError`; `NoNodeRunning` when
nobody listens on the socket.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp

from ..errors import ControlError, NoNodeRunning
from ..ids import check_doc_id

if TYPE_CHECKING:
    from ._docview import Types

__all__ = ["SOCKET_NAME", "ControlClient", "addressable", "socket_path"]

SOCKET_NAME = "control.sock"
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; keep a margin


def socket_path(cache_dir: str | Path) -> Path:
    """Where the control socket of the node using `cache_dir` lives."""
    return Path(cache_dir) / SOCKET_NAME


@contextlib.contextmanager
def addressable(path: Path) -> Iterator[str]:
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


class ControlClient:
    """Talks to the node running on `cache_dir` (an async context manager)."""

    def __init__(self, cache_dir: str | Path, *, timeout: float | None = 30.0) -> None:
        self.cache_dir = Path(cache_dir)
        self.path = socket_path(cache_dir)
        self._timeout = timeout
        self._stack = contextlib.ExitStack()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControlClient:
        addr = self._stack.enter_context(addressable(self.path))
        self._session = aiohttp.ClientSession(
            base_url="http://unity-crdt",
            connector=aiohttp.UnixConnector(path=addr),
            timeout=aiohttp.ClientTimeout(total=self._timeout, sock_connect=5.0),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        self._stack.close()

    def _no_node(self) -> NoNodeRunning:
        d = self.cache_dir
        return NoNodeRunning(
            f"no node is running on {d}; start one with `unity-crdt run --cache-dir {d} ...`"
        )

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
            raise ControlError(
                f"the node on {self.cache_dir} stopped answering ({type(exc).__name__})"
            ) from None

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
        async with self._request(
            "GET", self._doc_path(name) + "/watch", patient=True, params=self._query(types)
        ) as resp:
            try:
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
            except aiohttp.ClientPayloadError:
                return  # the node shut down mid-stream

    async def checkpoint(self) -> None:
        """Checkpoint every changed doc now."""
        await self._json("POST", "/checkpoint", patient=True)

    async def restore(self, progress: Callable[[dict[str, int]], None] | None = None) -> list[str]:
        """Merge the group's checkpoints; the names of the docs touched. `progress` gets
        {listed, total, done, nbytes} as objects are read."""
        if progress is None:
            return list((await self._json("POST", "/restore", patient=True))["docs"])
        async with self._request(
            "POST", "/restore", patient=True, params={"progress": "1"}
        ) as resp:
            async for raw in resp.content:
                if not raw.strip():
                    continue
                line = json.loads(raw)
                if "progress" in line:
                    progress(line["progress"])
                elif "error" in line:
                    raise ControlError(str(line["error"]))
                else:
                    return list(line["docs"])
        raise ControlError(f"the node on {self.cache_dir} stopped during the restore")

    async def search(
        self, query: str, limit: int = 10, mode: str | None = None, alpha: float = 0.5
    ) -> list[dict[str, Any]]:
        """Search checkpointed searchable docs: hits {doc, passage, score, snippet}."""
        params = {"q": query, "limit": str(limit), "alpha": str(alpha)}
        if mode is not None:
            params["mode"] = mode
        found = await self._json("GET", "/search", params=params)
        return list(found["hits"])

    async def members(self) -> dict[str, Any]:
        """The roster: {"members": [{device_id, name, state, added_by, added_at}],
        "membership": {epoch, state, members, revoked, invites, error}}."""
        result: dict[str, Any] = await self._json("GET", "/members")
        return result

    async def invite(self, ttl: float = 600.0) -> str:
        """A single-use invite code for one new device, valid `ttl` seconds."""
        return str((await self._json("POST", "/invite", params={"ttl": str(ttl)}))["code"])

    async def revoke(self, device_id: str) -> dict[str, Any]:
        """Revoke a member by its full device id; the group's membership status after."""
        path = f"/revoke/{quote(device_id, safe='')}"
        result: dict[str, Any] = await self._json("POST", path, patient=True)
        return result

    async def metrics(self) -> str:
        """The Prometheus exposition."""
        async with self._request("GET", "/metrics") as resp:
            return await resp.text()
