"""What a Checkpointer knows of the stored objects between calls, kept in memory only.

Separate from writing and restoring, which both read and update it: the headers opened so far
(objects are immutable, so each opens once; a refused one is logged and left out), the doc
names those headers revealed (search results name docs by them), the objects a restore has
returned (`changed_only` skips them), and the states this node holds per doc (restore skips
any object whose state one of them covers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from ..errors import ProtocolError, SecurityError
from ._cover import Cover, Listed, rank_of
from ._seal import Sealer
from .format import Header, Manifest

__all__ = ["Catalog"]

# The policy's lines keep the logger name they always had.
log = logging.getLogger("unity_crdt.checkpoint.policy")


class Catalog:
    """Opened objects by id, doc names by doc key, objects restored, states held per doc."""

    def __init__(self, sealer: Sealer, admit: Callable[[Header], bool] | None = None) -> None:
        self._sealer = sealer
        # Which opened objects to read at all (an ended epoch's: only its members', and only
        # what they wrote before it ended); None: every object that opens.
        self._admit = admit
        self.names: dict[str, str] = {}  # doc_key -> doc name, for search results
        self._opened: dict[str, Listed] = {}  # object_id -> opened header
        self.seen: set[str] = set()  # object ids already returned by restore
        self.held: dict[str, list[Cover]] = {}  # doc_key -> states this node holds

    def name(self, doc: str) -> None:
        """Learn the doc key of a doc this node has."""
        self.names[self._sealer.doc_key(doc)] = doc

    def opened(self, m: Manifest) -> Listed | None:
        """The listed object with its header opened (cached); None, logged, if refused."""
        o = self._opened.get(m.object_id)
        if o is not None and o.m == m:
            return o
        try:
            head = self._sealer.header(m)
            cover = None
            if head.sv is not None and head.ds is not None:
                cover = Cover.parse(head.sv, head.ds)
        except (SecurityError, ProtocolError) as exc:
            log.warning("checkpoint: object %s refused: %s", m.object_id, exc)
            return None
        if self._admit is not None and not self._admit(head):
            log.info(
                "checkpoint: object %s skipped (its writer or time is not admitted)", m.object_id
            )
            return None
        o = self._opened[m.object_id] = Listed(m, head, cover, rank_of(m, cover))
        self.names[m.doc_key] = head.doc
        return o

    def add(self, o: Listed) -> None:
        """Note an object this node has just written."""
        self._opened[o.object_id] = o

    def forget(self, manifests: Iterable[Manifest]) -> None:
        """Drop deleted objects."""
        for m in manifests:
            self._opened.pop(m.object_id, None)

    def group(
        self, manifests: Sequence[Manifest], scope: Iterable[str] | None = ()
    ) -> dict[str, list[Listed]]:
        """Opened objects per doc key. The listing is complete for the doc keys in `scope`
        (None: every doc), so cached objects of those docs missing from it are forgotten."""
        present = {m.object_id for m in manifests}
        keys = None if scope is None else set(scope)
        gone = [
            oid
            for oid, o in self._opened.items()
            if oid not in present and (keys is None or o.m.doc_key in keys)
        ]
        for oid in gone:
            del self._opened[oid]
            self.seen.discard(oid)
        if keys is None:
            self.seen &= present
        out: dict[str, list[Listed]] = {}
        for m in manifests:
            o = self.opened(m)
            if o is not None:
                out.setdefault(m.doc_key, []).append(o)
        return out

    def remember(self, doc_key: str, cover: Cover | None) -> None:
        """Note that this node holds `cover` of a doc (restore then skips what it holds)."""
        if cover is None:
            return
        held = self.held.setdefault(doc_key, [])
        if not any(cover.within(k) for k in held):
            held[:] = [k for k in held if not k.within(cover)] + [cover]
