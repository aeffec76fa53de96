"""Strict coordination on NATS JetStream key-value: compare-and-set with a server-side TTL.

The one module of `work` that imports nats-py; the connection itself comes from the node
(`net.nats.connect`, handed in), so `work` stays independent of `net`.

One bucket per group (`UCRDTW_<group tag>`, R3 on a cluster). Keys say nothing to the operator:
task claims are `t.<job id>.<task>`, leases `l.<keyed hash of the name>`; values are sealed
with the group's relay key (the subject is the associated data, so a value cannot be moved to
another key). A key's revision is the stream sequence of its last message: the fencing token.

- `create(key, ttl)` succeeds only if the key is absent (or deleted): a claim.
- `update(key, last, ttl)` succeeds only if the key's revision is still `last`: a renewal, or
  the end of a task. The TTL (`Nats-TTL`, server 2.11+) restarts with each write, and the
  *server* removes the key when it passes: expiry never depends on a worker's clock.
- `delete(key, last)` releases a lease only if we still hold it.

Reads are not read-your-writes (direct gets may come from a follower), so ownership is decided
from the compare-and-set answer alone. When an answer is lost (a timeout, a leader change),
the outcome is unknown: every value carries a nonce, and the key is read back from the stream
leader (not a direct get) to learn whether our write landed. A caller that writes one key
several times (claim, renewals, close) passes the set of its nonces for that key (`ours`): a
later write refused because an earlier one landed unseen finds that write there, and goes on
from its revision instead of mistaking its own write for someone else's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import itertools
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import api
from nats.js.kv import KeyValue

from ..crypto.keys import GroupKeys, open_blob, seal_blob
from ..errors import CoordinationError, SecurityError

__all__ = ["KvStore", "lease_key", "task_kv_key"]

log = logging.getLogger(__name__)

Connect = Callable[..., Awaitable[Client]]
LeaseEvent = Callable[[str, int, dict[str, Any] | None], None]

OP_TIMEOUT = 2.0
_CAS_CODES = (10071, 10164)  # wrong last sequence
_EXPECT = "Nats-Expected-Last-Subject-Sequence"
_TTL = "Nats-TTL"
_KV_OP = "KV-Operation"


def task_kv_key(job_id: str, task: str) -> str:
    """The key of a task's claim."""
    return f"t.{job_id}.{task.replace('.', '_')}"


def lease_key(names: bytes, name: str) -> str:
    """The key of a lease: a hash of its name keyed by `crypto.keys.work_names_key`."""
    digest = hmac.digest(names, b"lease\x00" + name.encode(), "sha256")[:16]
    return "l." + base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def _ttl(seconds: float) -> str:
    return f"{max(1000, round(seconds * 1000))}ms"  # the server refuses TTLs under a second


class KvStore:
    """The group's key-value bucket on NATS: CAS writes with TTL, sealed values, lease watch."""

    def __init__(
        self,
        urls: tuple[str, ...],
        credentials: str | None,
        keys: GroupKeys,
        names: bytes,
        *,
        connect: Connect,
        replicas: int,
        op_timeout: float = OP_TIMEOUT,
    ) -> None:
        self.urls = urls
        self._credentials = credentials
        self._key = keys.relay_key
        tag = hmac.digest(names, b"work-bucket", "sha256")[:10]
        self.bucket = "UCRDTW_" + base64.b32encode(tag).decode("ascii").rstrip("=")
        self._stream = f"KV_{self.bucket}"
        self._connect = connect
        self._replicas = replicas
        self._timeout = op_timeout
        self._nc: Client | None = None
        self._kv: KeyValue | None = None
        self._watcher: Any = None
        self._nonce_prefix = secrets.token_hex(6)
        self._nonces = itertools.count()
        self.last_error: str | None = None
        self.on_lease: LeaseEvent | None = None
        self.on_ready: Callable[[], None] | None = None
        # Set once the first connection attempt has an answer (ready, or the server refused or
        # is unreachable): until then a node cannot know which mode it is in.
        self.settled = asyncio.Event()

    @property
    def ready(self) -> bool:
        """Whether the bucket is usable right now."""
        return self._kv is not None and self._nc is not None and self._nc.is_connected

    def _record(self, reason: str) -> None:
        if reason != self.last_error:
            log.warning("coordination: %s", reason)
        self.last_error = reason
        if self._nc is None:  # no connection at all (a bucket still being elected is waited for)
            self.settled.set()

    async def run(self) -> None:
        """Connect (retrying for ever), make sure the bucket exists, then watch the leases."""
        self._nc = await self._connect(
            self.urls, self._credentials, on_error=self._record, connect_timeout=2.0
        )
        js = self._nc.jetstream(timeout=self._timeout)
        while self._kv is None:
            try:
                try:
                    kv = await js.key_value(self.bucket)
                except nats.js.errors.BucketNotFoundError:
                    kv = await js.create_key_value(
                        api.KeyValueConfig(
                            bucket=self.bucket,
                            history=1,
                            replicas=self._replicas,
                            storage=api.StorageType.FILE,
                        )
                    )
                self._watcher = await kv.watch("l.>")
                self._kv = kv
            except (nats.errors.Error, TimeoutError) as exc:
                # A fresh cluster elects its meta leader for a few seconds: retry.
                self._record(f"bucket not ready: {exc or type(exc).__name__}")
                await asyncio.sleep(0.5)
        self.last_error = None
        self.settled.set()
        log.info("coordination: strict mode on bucket %s", self.bucket)
        if self.on_ready is not None:
            self.on_ready()
        await self._watch_leases()

    async def _watch_leases(self) -> None:
        assert self._watcher is not None
        # `async for` awaits the watcher's queue itself: `updates(timeout)` wraps it in
        # wait_for, which on Python 3.11 loses a cancel that arrives with an entry (the
        # task would then watch for ever).
        async for entry in self._watcher:
            if entry is None or self.on_lease is None:
                continue
            payload = None
            if entry.operation is None and entry.value:
                payload = self._open(f"$KV.{self.bucket}.{entry.key}", entry.value)
            self.on_lease(entry.key, entry.revision or 0, payload)

    async def close(self) -> None:
        """Stop the watch and close the connection."""
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.close()

    # -- sealed values ------------------------------------------------------------------------

    def rekey(self, keys: GroupKeys) -> None:
        """Seal and open values with a new epoch's key from now on.

        Values sealed with the old key (a revoked device still has it) no longer open: they
        read as nobody's, and the compare-and-set still keeps a key that holds one. A holder's
        next renewal re-seals its lease with the new key.
        """
        self._key = keys.relay_key

    def _subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    def _seal(self, subject: str, payload: dict[str, Any]) -> bytes:
        return seal_blob(self._key, json.dumps(payload).encode(), subject.encode())

    def _open(self, subject: str, data: bytes) -> dict[str, Any] | None:
        try:
            value = json.loads(open_blob(self._key, data, subject.encode()))
        except (SecurityError, ValueError):
            log.warning("coordination: a value under %s is not ours; ignored", subject)
            return None
        return value if isinstance(value, dict) else None

    # -- compare-and-set ----------------------------------------------------------------------

    async def create(
        self,
        key: str,
        payload: dict[str, Any],
        ttl: float,
        ours: set[str] | None = None,
        replaceable: Callable[[dict[str, Any]], bool] | None = None,
    ) -> int | None:
        """Write `payload` only if `key` is absent (or holds one of `ours`, or an entry that
        is `replaceable`); its revision, or None if someone holds it."""
        return await self._cas(
            key, payload, 0, ttl, creating=True, ours=ours, replaceable=replaceable
        )

    async def update(
        self, key: str, payload: dict[str, Any], last: int, ttl: float, ours: set[str] | None = None
    ) -> int | None:
        """Write `payload` only if `key` is still at revision `last` (or holds one of `ours`);
        new revision, or None."""
        return await self._cas(key, payload, last, ttl, creating=False, ours=ours)

    async def delete(self, key: str, last: int) -> bool:
        """Delete `key` only if it is still at revision `last` (a release)."""
        headers = {_KV_OP: "DEL", _EXPECT: str(last)}
        try:
            await self._js().publish(self._subject(key), b"", headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _CAS_CODES:
                return False
            raise CoordinationError(str(exc)) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise CoordinationError(str(exc) or type(exc).__name__) from None
        return True

    def _js(self) -> Any:
        if not self.ready or self._nc is None:
            raise CoordinationError("not connected to the coordination server")
        return self._nc.jetstream(timeout=self._timeout)

    async def _cas(
        self,
        key: str,
        payload: dict[str, Any],
        last: int,
        ttl: float,
        *,
        creating: bool,
        ours: set[str] | None,
        replaceable: Callable[[dict[str, Any]], bool] | None = None,
    ) -> int | None:
        subject = self._subject(key)
        nonce = f"{self._nonce_prefix}{next(self._nonces)}"  # unique to this write
        data = self._seal(subject, {**payload, "nonce": nonce})
        ours = set() if ours is None else ours
        unknown = bool(ours)  # an earlier write of ours to this key may have landed unseen
        ours.add(nonce)
        for _ in range(3):
            headers = {_EXPECT: str(last), _TTL: _ttl(ttl)}
            try:
                ack = await self._js().publish(subject, data, headers=headers)
                return int(ack.seq)
            except nats.js.errors.APIError as exc:
                if exc.err_code not in _CAS_CODES:
                    raise CoordinationError(str(exc)) from None
                if not creating and not unknown:
                    return None  # refused, and no earlier try of ours can have landed
            except (nats.errors.Error, TimeoutError) as exc:
                self._record(f"no answer to a write ({exc or type(exc).__name__})")
                unknown = True
            # The write was refused, or its answer lost: ask the stream leader what is there.
            found = await self.read(key)
            if found is not None and found[1] is not None and found[1].get("nonce") in ours:
                if found[1]["nonce"] == nonce:
                    return found[0]  # our write landed after all
                last = found[0]  # an earlier write of ours landed: we hold the key, go on
                continue
            if found is not None and found[1] is not None and replaceable and replaceable(found[1]):
                last = found[0]  # compare-and-set on it: one claimer replaces it
                continue
            if creating and found is not None and found[1] is not None:
                return None  # held by someone
            if creating:
                last = 0 if found is None else found[0]  # absent, or a deletion marker
            elif found is None or found[0] != last:
                return None
        raise CoordinationError(f"no definite answer for {key} after 3 tries")

    async def read(self, key: str) -> tuple[int, dict[str, Any] | None] | None:
        """(revision, value or None if deleted) of `key` from the stream leader; None if absent."""
        subject = self._subject(key)
        try:
            msg = await self._js().get_msg(self._stream, subject=subject, direct=False)
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise CoordinationError(str(exc) or type(exc).__name__) from None
        if msg.headers and msg.headers.get(_KV_OP) in ("DEL", "PURGE"):
            return int(msg.seq or 0), None
        return int(msg.seq or 0), self._open(subject, msg.data or b"")
