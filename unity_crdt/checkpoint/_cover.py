"""Which checkpoint objects hold which others: the order that makes compaction safe.

A sealed state holds exactly the Yjs items below its state vector and the deletions in its
delete set (pycrdt leaves pending structs out of `get_update()`, so nothing else). Object Y is
*covered* by X (Y ⊑ X) when X's state vector is at least Y's for every client and X's delete
set contains Y's: merging Y into X then changes nothing. ⊑ is a preorder; equal states cover
each other, so the strict order used to delete is

    Y ≺ X  iff  Y ⊑ X and (not X ⊑ Y, or Y's object id < X's object id).

≺ is a strict partial order fixed by the (immutable) objects alone, so every pruner anywhere
agrees on it. A pruner deletes Y only when it holds an X ≺-above Y that it has confirmed
stored. Follow any deleted object's justifications upwards: the chain is finite and strictly
increasing, so it ends at an object nobody deleted, which covers every object below it. Hence
concurrent pruners never delete the last copy of anything, in any interleaving.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pycrdt

from ..sync.yjs import read_delete_set, read_state_vector
from .format import Header, Manifest

__all__ = ["Cover", "Listed", "maximal", "precedes", "rank_of", "state_cover"]


@dataclass(frozen=True)
class Cover:
    """The items (state vector) and deletions (delete set) one state holds."""

    sv: dict[int, int]
    ds: dict[int, list[tuple[int, int]]]  # client -> sorted, merged (clock, length)

    @classmethod
    def parse(cls, sv: bytes, ds: bytes) -> Cover:
        """Read a Yjs state vector and a delete-set-only update (DecodeError if malformed)."""
        return cls(read_state_vector(sv), read_delete_set(ds))

    def within(self, other: Cover) -> bool:
        """Whether `other` holds everything this state holds (self ⊑ other)."""
        for client, clock in self.sv.items():
            if clock > other.sv.get(client, 0):
                return False
        for client, ranges in self.ds.items():
            theirs = other.ds.get(client)
            if not theirs:
                return False
            starts = [start for start, _ in theirs]
            for clock, length in ranges:
                i = bisect_right(starts, clock) - 1
                if i < 0 or clock + length > theirs[i][0] + theirs[i][1]:
                    return False
        return True


def state_cover(state: bytes) -> tuple[bytes, bytes]:
    """(state vector, delete-set update) of a full pycrdt state, as sealed into headers."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    if state:
        doc.apply_update(state)
    sv = doc.get_state()
    return sv, doc.get_update(sv)


def precedes(a: Cover, a_id: str, b: Cover, b_id: str) -> bool:
    """a ≺ b: b holds all of a, and is strictly more, or equal with the larger object id."""
    if a_id == b_id or not a.within(b):
        return False
    return not b.within(a) or a_id < b_id


@dataclass(frozen=True)
class Listed:
    """A stored object with its opened header and what its state holds (None: unknown)."""

    m: Manifest
    head: Header
    cover: Cover | None
    rank: tuple[int, int, str]  # (sum of clocks, deleted length, id): dominators sort first

    @property
    def object_id(self) -> str:
        """The stored object's id."""
        return self.m.object_id


def rank_of(m: Manifest, cover: Cover | None) -> tuple[int, int, str]:
    """Sort key putting every dominator of an object before it: clocks, deletions, id."""
    if cover is None:
        return (-1, -1, m.object_id)
    deleted = sum(n for ranges in cover.ds.values() for _, n in ranges)
    return (sum(cover.sv.values()), deleted, m.object_id)


def maximal(objs: Iterable[Listed]) -> list[Listed]:
    """The objects no other one dominates (objects of unknown content are all kept).

    Sorted by rank, every dominator of an object comes before it, so one pass suffices.
    """
    kept: list[Listed] = []
    for o in sorted(objs, key=lambda o: o.rank, reverse=True):
        if o.cover is None or not any(
            k.cover is not None and precedes(o.cover, o.object_id, k.cover, k.object_id)
            for k in kept
        ):
            kept.append(o)
    return kept
