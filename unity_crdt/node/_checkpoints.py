"""The node's checkpoint service: the Checkpointer and everything the node does around it.

It builds the `Checkpointer` over the node's sink, merges what restores and pulls bring like
any remote update, answers commit notices (pull a doc at once when a member checkpointed a
state ahead of ours), and sends our own notices after each write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pycrdt

from ..checkpoint.format import CheckpointSink, DocHit, Header, SearchMode
from ..checkpoint.policy import Checkpointer, RestoreProgress
from ..config import NodeConfig
from ..crypto.keys import GroupKeys
from ..errors import CheckpointError, ProtocolError
from ..sync.codec import Notice
from ..sync.replica import RemoteOrigin, Replica
from ..sync.yjs import read_state_vector

__all__ = ["CHECKPOINT_ORIGIN", "Checkpoints"]

log = logging.getLogger(__name__)

# Merged checkpoint states travel like a peer's updates: relayed to every link, never undone.
CHECKPOINT_ORIGIN = RemoteOrigin("checkpoint")
FINAL_CHECKPOINT_TIMEOUT = 30.0


class Checkpoints:
    """Checkpoints of one node: write, restore, pull, search, and commit notices."""

    def __init__(
        self,
        config: NodeConfig,
        keys: GroupKeys,
        device_id: str,
        sink: CheckpointSink,
        replica: Replica,
        *,
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
        notify: Callable[[Notice], None],
        ledger: str = "checkpoints.json",
        readers: list[tuple[GroupKeys, str, Callable[[Header], bool]]] = (),  # type: ignore[assignment]
    ) -> None:
        self._config = config
        self._replica = replica
        self._spawn = spawn
        self._notify = notify
        self._device_id = device_id
        self._pulling: set[str] = set()  # docs a commit notice is pulling from the sink
        self._sink = sink
        self._loops: list[asyncio.Task[None]] = []
        self._halted = False
        self.cp = self._make(keys, ledger)
        # Older epochs' objects, read by restore only.
        self._readers = [self._make(k, name, admit) for k, name, admit in readers]

    def _make(
        self, keys: GroupKeys, ledger: str, admit: Callable[[Header], bool] | None = None
    ) -> Checkpointer:
        cache: Path = self._config.cache_path
        return Checkpointer(
            keys,
            self._device_id,
            self._sink,
            get_state=lambda name: self._replica.doc(name).get_update(),
            text_of=self._text_of,
            ledger_path=cache / ledger,
            on_written=None if admit else self._send_notice,
            embedder=self._config.embedder,
            vector_file=cache / "passage-vectors.bin",
            admit=admit,
        )

    def _start_loops(self) -> None:
        cfg = self._config
        self._loops = [self._spawn(self.cp.run(cfg.checkpoint_interval), "checkpoint loop")]
        if cfg.pull_interval is not None:
            self._loops.append(
                self._spawn(self.cp.run_pull(cfg.pull_interval, self.apply), "pull loop")
            )

    def stop(self) -> None:
        """Stop the write and pull loops (a new epoch takes over: `rekey` starts new ones)."""
        for task in self._loops:
            task.cancel()
        self._loops = []

    def halt(self) -> None:
        """Write and pull nothing more, not even on close (this device was revoked)."""
        self.stop()
        self._halted = True

    def rekey(
        self,
        keys: GroupKeys,
        ledger: str,
        readers: list[tuple[GroupKeys, str, Callable[[Header], bool]]],
    ) -> None:
        """Write under a new epoch's keys from now on, every doc again at once; read the
        objects of older epochs through `readers` (keys, ledger file, which objects)."""
        self.stop()
        self.cp = self._make(keys, ledger)
        self._readers = [self._make(k, name, admit) for k, name, admit in readers]
        for name in self._replica.names():
            self.cp.mark_dirty(name)
        self._start_loops()

        async def now() -> None:
            try:
                await self.cp.checkpoint()
            except CheckpointError as exc:
                log.warning("checkpoint under the new epoch failed (retried): %s", exc)

        self._spawn(now(), "checkpoint of a new epoch")

    async def start(self) -> None:
        """Mark every loaded doc dirty, restore if asked, and start the loops."""
        cfg = self._config
        # Docs loaded from the cache may be newer than any checkpoint (offline edits).
        for name in self._replica.names():
            self.cp.mark_dirty(name)
        if cfg.restore_on_start:
            try:
                await self.restore()
            except Exception as exc:  # the node starts from its cache whatever the store holds
                log.warning("restore on start failed, continuing from the local cache: %s", exc)
        self._start_loops()

    async def checkpoint(self) -> None:
        """Write every doc changed since its last checkpoint now."""
        if self._halted:
            raise CheckpointError("this device was revoked from its group: it writes no more")
        report = await self.cp.checkpoint()
        if report.failed:
            raise CheckpointError(f"checkpoint failed for {len(report.failed)} doc(s)")

    async def restore(
        self, *, progress: Callable[[RestoreProgress], None] | None = None
    ) -> list[str]:
        """Merge the group's checkpoint of every doc (this epoch's, and what older epochs'
        members wrote before those ended); return the docs touched."""
        states = await self.cp.restore(progress=progress)
        for reader in self._readers:
            for doc, blobs in (await reader.restore()).items():
                states.setdefault(doc, []).extend(blobs)
        self.apply(states)
        return sorted(states)

    async def search(
        self, query: str, limit: int, mode: SearchMode | None, alpha: float
    ) -> list[DocHit]:
        """Search the checkpointed passages of searchable docs."""
        return await self.cp.search(query, limit, mode, alpha)

    def apply(self, states: dict[str, list[bytes]]) -> None:
        """Merge checkpointed states like any remote update: cached, gossiped, never undone."""
        for name, blobs in states.items():
            for state in blobs:
                try:
                    self._replica.apply_remote(name, state, CHECKPOINT_ORIGIN)
                except ProtocolError as exc:
                    log.warning("a checkpoint of one doc could not be merged: %s", exc)

    async def close(self) -> None:
        """A last checkpoint of what changed (bounded), then release the sink."""
        try:
            if self.cp.dirty and not self._halted:
                await asyncio.wait_for(self.cp.checkpoint(), FINAL_CHECKPOINT_TIMEOUT)
        except (CheckpointError, TimeoutError) as exc:
            log.warning(
                "final checkpoint on close failed (the local cache has every edit): %s", exc
            )
        finally:
            await self.cp.close()

    # -- commit notices -----------------------------------------------------------------------

    def _send_notice(self, doc: str, generation: str) -> None:
        sv, digest = self._replica.state_vector(doc), self._replica.digest(doc)
        self._notify(Notice(doc, self._device_id, generation, sv, digest))

    def on_notice(self, notice: Notice) -> None:
        """A member checkpointed a doc: if our copy is behind it, pull that doc now."""
        if notice.device == self._device_id:
            return
        ours = read_state_vector(self._replica.state_vector(notice.doc))
        theirs = read_state_vector(notice.state_vector)
        behind = any(clock > ours.get(client, 0) for client, clock in theirs.items())
        if not behind and (ours != theirs or self._replica.digest(notice.doc) == notice.digest):
            return
        if notice.doc not in self._pulling:
            self._pulling.add(notice.doc)
            self._spawn(self._pull_doc(notice.doc), "pull on notice")

    async def _pull_doc(self, doc: str) -> None:
        try:
            self.apply(await self.cp.restore([doc], include_own=False))
        except CheckpointError as exc:
            log.warning("a commit notice's pull failed (the next pull repairs it): %s", exc)
        finally:
            self._pulling.discard(doc)

    def pull_everything(self) -> None:
        """Restore every doc in the background (the relay lost history it cannot replay)."""

        async def pull() -> None:
            try:
                await self.restore()
            except CheckpointError as exc:
                log.warning("restore after a relay gap failed: %s", exc)

        self._spawn(pull(), "restore after relay gap")

    def _text_of(self, name: str) -> str | None:
        """The plain text of a searchable doc: its Text roots in name order, each its own
        paragraph (passages are the blank-line separated paragraphs)."""
        if name not in self._config.searchable:
            return None
        doc = self._replica.doc(name)
        parts = []
        for key in sorted(doc.keys()):
            value = doc[key] if key in doc._roots and doc._roots[key] is not None else None
            if isinstance(value, pycrdt.Text):
                parts.append(str(value))
        return "\n\n".join(parts)
