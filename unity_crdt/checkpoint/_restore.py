"""Restoring from checkpoints: which objects to read, reading them, and trusting none of it.

Separate from writing (`checkpoint._write`): it shares only the catalog and the ledger, and
its rules are about what a store may have done behind our back.

Restore trusts nothing in clear: it opens every header first and fetches chunks only for
objects whose clear `parts`/`nbytes` are exactly what their header implies (a store cannot make
it allocate by lying). The newest write seen per (doc, device) is kept in a ledger in the local
cache (`checkpoint._ledger`), so an older write served again is refused and a stored state
that vanished is reported (`Checkpointer.warnings`); a node that finds its own state gone
writes it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..errors import CheckpointError, SecurityError
from ._catalog import Catalog
from ._cover import Cover, Listed, maximal
from ._ledger import Ledger, LedgerEntry
from ._remote import Remote
from ._seal import Sealer
from .format import PUT_BUDGET, Manifest

__all__ = ["RESTORE_ROUNDS", "Restorer"]

# The policy's lines keep the logger name they always had.
log = logging.getLogger("unity_crdt.checkpoint.policy")

RESTORE_ROUNDS = 4  # list again this often when objects vanish mid-read (pruned meanwhile)


class Restorer:
    """Reads the verified states of a tenant's docs.

    `on_lost(doc)` is called for each doc whose state this device stored and the store lost.
    """

    def __init__(
        self,
        sealer: Sealer,
        catalog: Catalog,
        remote: Remote,
        ledger: Ledger,
        on_lost: Callable[[str], None],
    ) -> None:
        self._sealer = sealer
        self._catalog = catalog
        self._remote = remote
        self._ledger = ledger
        self._on_lost = on_lost

    async def restore(
        self,
        doc_names: Iterable[str] | None,
        *,
        changed_only: bool,
        include_own: bool,
        report: Callable[[Mapping[str, int] | None], None],
    ) -> dict[str, list[bytes]]:
        """The verified states to merge per doc (see `Checkpointer.restore`). `report` is
        given the counts of a `RestoreProgress` as they change, and None when it ends."""
        sealer, catalog = self._sealer, self._catalog
        names = None if doc_names is None else sorted(set(doc_names))
        doc_keys = None if names is None else [sealer.doc_key(n) for n in names]
        own = sealer.device_tag(sealer.device_id)
        out: dict[str, list[bytes]] = {}
        got: dict[str, list[Cover]] = {}
        read: set[str] = set()
        listing = await self._remote.manifests(doc_keys)
        counts = {"listed": len(listing), "total": 0, "done": 0, "nbytes": 0}

        def tick(n: int, nbytes: int) -> None:
            counts["done"] += n
            counts["nbytes"] += nbytes
            report(counts)

        try:
            scope: Sequence[str] | None = doc_keys
            for attempt in range(RESTORE_ROUNDS):
                todo: list[Listed] = []
                groups = self._check_store(catalog.group(listing, scope), scope)
                for key, group in groups.items():
                    held = got.get(key, []) + (catalog.held.get(key, []) if changed_only else [])
                    for o in maximal(group):
                        if (
                            o.object_id in read
                            or (not include_own and o.m.device == own)
                            or (changed_only and o.object_id in catalog.seen)
                            or (o.cover is not None and any(o.cover.within(h) for h in held))
                        ):
                            continue
                        todo.append(o)
                counts["total"] += len(todo)
                tick(0, 0)
                chunks = await self._chunks(todo, tick)
                again: set[str] = set()
                for o in todo:
                    try:
                        doc, state = sealer.open(o.m, chunks.get(o.object_id, []))
                    except SecurityError as exc:
                        log.warning("checkpoint: object %s refused: %s", o.object_id, exc)
                        continue
                    except CheckpointError as exc:
                        if attempt < RESTORE_ROUNDS - 1:  # pruned while we read: list again
                            again.add(o.m.doc_key)
                        else:
                            log.warning("checkpoint: object %s refused: %s", o.object_id, exc)
                        continue
                    out.setdefault(doc, []).append(state)
                    read.add(o.object_id)
                    catalog.seen.add(o.object_id)
                    self._ledger.seen(LedgerEntry.of(o))
                    if o.cover is not None:
                        got.setdefault(o.m.doc_key, []).append(o.cover)
                        catalog.remember(o.m.doc_key, o.cover)
                if not again:
                    break
                scope = sorted(again)
                listing = await self._remote.manifests(scope)
        finally:
            report(None)
            await asyncio.to_thread(self._ledger.save)
        return out

    def _check_store(
        self, groups: dict[str, list[Listed]], scope: Sequence[str] | None
    ) -> dict[str, list[Listed]]:
        """Report lost states (ours: `on_lost`) and drop older writes served again."""
        for gone in self._ledger.lost(groups, scope):
            if gone.device == self._sealer.device_id:
                self._on_lost(gone.doc)  # write ours again
        return {
            key: [o for o in objs if not self._ledger.is_rollback(o)]
            for key, objs in groups.items()
        }

    async def _chunks(
        self, objs: Sequence[Listed], tick: Callable[[int, int], None]
    ) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        batch: list[Manifest] = []
        for o in [*objs, None]:
            if o is not None:
                batch.append(o.m)
            size = sum(x.nbytes for x in batch)
            if batch and (o is None or size >= PUT_BUDGET or len(batch) >= 200):
                out.update(await self._remote.chunks(batch))
                tick(len(batch), size)
                batch = []
        return out
