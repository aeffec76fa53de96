"""Presence tables: kept for held docs only, aside (bounded) for others, freed when empty."""

from __future__ import annotations

import pytest

from unity_crdt.errors import LimitExceeded
from unity_crdt.sync.presence import Presence
from unity_crdt.sync.yprotocol import encode_awareness


def entry(client: int, state: bytes = b'{"u":1}', clock: int = 0) -> bytes:
    return encode_awareness([(client, clock, state)])


def test_f4_presence_for_docs_not_held_is_bounded_never_relayed_and_freed() -> None:
    p = Presence(timeout=10.0, max_unheld=8)
    for i in range(1000):
        assert p.apply(f"made-up-{i}", entry(i), now=0.0, held=False) is None
    assert len(p) == 8  # only the newest docs are kept aside
    assert p.states("made-up-999") == {999: {"u": 1}}
    assert p.states("made-up-0") == {}
    assert p.snapshot(0.0) == []  # never offered to newly linked peers either
    # Once the doc is held, its entries are promoted and new ones are relayed.
    assert p.apply("made-up-999", entry(7), now=1.0) == entry(7)
    assert set(p.states("made-up-999")) == {999, 7}
    assert [doc for doc, _ in p.snapshot(1.0)] == ["made-up-999"]
    # Tables that empty are deleted; a doc with this node's own state keeps its table.
    p.set_local("mine", 42, {"me": True}, now=1.0)
    p.renew(now=15.0)
    p.expire(now=20.0)
    assert len(p) == 1 and p.states("mine") == {42: {"me": True}}


def test_f4_held_tables_are_capped_and_states_are_small() -> None:
    p = Presence(max_tables=3)
    for i in range(3):
        p.apply(f"d{i}", entry(i), now=0.0)
    with pytest.raises(LimitExceeded):
        p.apply("d3", entry(3), now=0.0)
    with pytest.raises(LimitExceeded, match="awareness state over"):
        p.apply("d0", entry(9, b'"' + b"x" * 70_000 + b'"'), now=0.0)
    assert len(p) == 3
