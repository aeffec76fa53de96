"""Checkpointing one batch of docs: skip what is stored, write the rest, prune, index.

Separate from the policy (`checkpoint.policy`, which decides *which* docs to write, batches
them and keeps their status) because this is the part whose order makes compaction safe.

Compaction (`checkpoint._cover` has the order and the proof): before writing a doc, the
checkpointer lists the doc's objects. If one it has confirmed stored already holds its state,
it writes nothing; otherwise it writes its own. Then it deletes every listed object that the
confirmed one dominates, its own older writes included. A node holding the merged state thus
leaves about one object per doc, however many devices wrote it, and restore reads only the
objects no other listed object dominates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import CheckpointError
from ._catalog import Catalog
from ._cover import Cover, Listed, maximal, precedes, rank_of, state_cover
from ._ledger import Ledger, LedgerEntry
from ._passages import IndexUpdate, PassageIndex
from ._remote import Remote, reason
from ._seal import Sealer
from .format import Manifest

__all__ = ["Pending", "Tally", "Writer"]

# The policy's lines keep the logger name they always had.
log = logging.getLogger("unity_crdt.checkpoint.policy")


@dataclass
class Pending:
    """One doc being checkpointed: its state, its text if searchable, what the state holds."""

    name: str
    key: str
    state: bytes
    text: str | None
    sv: bytes | None
    ds: bytes | None
    cover: Cover | None


@dataclass
class Tally:
    """What one checkpoint() call did so far."""

    written: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    nbytes: int = 0
    pruned: int = 0


class Writer:
    """Reads docs from the app and writes them to the sink in batches (see the module)."""

    def __init__(
        self,
        sealer: Sealer,
        catalog: Catalog,
        remote: Remote,
        ledger: Ledger,
        index: PassageIndex,
        get_state: Callable[[str], bytes],
        text_of: Callable[[str], str | None] | None,
        on_written: Callable[[str, str], None] | None,
    ) -> None:
        self._sealer = sealer
        self._catalog = catalog
        self._remote = remote
        self._ledger = ledger
        self._index = index
        self._get_state = get_state
        self._text_of = text_of
        self._on_written = on_written  # (doc, generation) after each successful write

    async def read(self, doc: str) -> Pending:
        """The doc's state and text from the app, and what the state holds if it is Yjs."""
        state = self._get_state(doc)
        text = self._text_of(doc) if self._text_of is not None else None
        sv = ds = None
        cover = None
        try:
            if len(state) > 1 << 20:  # big states are parsed off the loop
                sv, ds = await asyncio.to_thread(state_cover, state)
            else:
                sv, ds = state_cover(state)
            cover = Cover.parse(sv, ds)
        except Exception:  # not a Yjs state (tests, other apps): written, never compacted
            sv = ds = None
        return Pending(doc, self._sealer.doc_key(doc), state, text, sv, ds, cover)

    async def write(self, batch: list[Pending], tally: Tally) -> list[str]:
        """Checkpoint one batch of docs: skip, write, prune, index. Returns the docs done."""
        keys = sorted({d.key for d in batch})
        listed = self._catalog.group(await self._remote.manifests(keys), keys)
        # A doc whose state a stored object already holds needs no new object.
        holders: dict[str, Listed] = {}
        for d in batch:
            if d.cover is not None:
                for o in maximal(listed.get(d.key, [])):
                    if o.cover is not None and d.cover.within(o.cover):
                        holders[d.name] = o
                        break
        if holders:
            ok = await self._remote.confirm([o.m for o in holders.values()])
            holders = {n: o for n, o in holders.items() if o.object_id in ok}
        records = {
            d.name: self._sealer.seal(d.name, d.state, d.sv, d.ds)
            for d in batch
            if d.name not in holders
        }
        if records:
            await self._remote.put(list(records.values()))
        justifiers: dict[str, Listed] = dict(holders)
        for d in batch:
            rec = records.get(d.name)
            if rec is not None:
                head = self._sealer.header(rec.manifest)
                o = Listed(rec.manifest, head, d.cover, rank_of(rec.manifest, d.cover))
                self._catalog.add(o)
                justifiers[d.name] = o
                tally.written.append(d.name)
                tally.nbytes += rec.manifest.nbytes
                self._ledger.seen(LedgerEntry.of(o))
                if self._on_written is not None:
                    self._on_written(d.name, rec.manifest.generation)
            else:
                tally.held.append(d.name)
        updates = []
        victims: list[Manifest] = []
        for d in batch:
            j = justifiers[d.name]  # never deleted here: it holds this doc's state
            self._catalog.remember(d.key, d.cover)
            others = [o for o in listed.get(d.key, []) if o.object_id != j.object_id]
            doomed = [
                o
                for o in others
                if j.cover is not None
                and o.cover is not None
                and precedes(o.cover, o.object_id, j.cover, j.object_id)
            ]
            victims += [o.m for o in doomed]
            updates.append(IndexUpdate(d.key, d.text, len(doomed) == len(others)))
        tally.pruned += await self._prune(victims)
        await asyncio.to_thread(self._ledger.save)
        try:
            await self._index.sync(updates)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"search index update failed: {reason(exc)}") from exc
        return [d.name for d in batch]

    async def _prune(self, victims: Sequence[Manifest]) -> int:
        """Delete dominated objects; best effort (a failure only leaves extra objects)."""
        if not victims:
            return 0
        try:
            await self._remote.delete(victims)
        except CheckpointError as exc:
            log.warning("checkpoint: %d dominated object(s) not deleted: %s", len(victims), exc)
            return 0
        self._catalog.forget(victims)
        return len(victims)
