"""The content digest (`sync.content`): history-independent, and it tells two versions apart."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from unity_crdt.sync.content import content_digest


def _edit_history(seed: int, steps: int) -> list[bytes]:
    """The updates of three writers editing Text, Map and Array concurrently, with deletions."""
    rng = random.Random(seed)
    updates: list[bytes] = []
    docs = [Doc(client_id=i + 1) for i in range(3)]
    for d in docs:
        d.observe(lambda e: updates.append(bytes(e.update)))
    for _ in range(steps):
        d = rng.choice(docs)
        t, m, a = d.get("t", type=Text), d.get("m", type=Map), d.get("a", type=Array)
        r = rng.random()
        if r < 0.35:
            t.insert(rng.randint(0, len(t)), rng.choice(["ab", "c", "xyz"]))
        elif r < 0.5 and len(t) > 2:
            i = rng.randint(0, len(t) - 2)
            del t[i : i + rng.randint(1, 2)]
        elif r < 0.65:
            m[rng.choice("xyz")] = rng.choice([1, "s", [1, 2], {"k": 3}])
        elif r < 0.75 and "x" in m:
            del m["x"]
        elif r < 0.9:
            a.insert(rng.randint(0, len(a)), rng.choice([1, "v", None]))
        elif len(a) > 1:
            del a[0]
        if rng.random() < 0.3:
            x, y = rng.sample(docs, 2)
            y.apply_update(x.get_update(y.get_state()))
    return updates


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(5, 80))
def test_the_same_items_give_the_same_digest_whatever_the_history(seed: int, steps: int) -> None:
    # yrs encodes one state differently depending on its history (items split or squashed,
    # deleted content kept or collected): 7 of 200 such histories give other bytes.
    updates = _edit_history(seed, steps)
    in_order, shuffled = Doc(), Doc()
    for u in updates:
        in_order.apply_update(u)
    mixed = updates[:]
    random.Random(seed).shuffle(mixed)
    for _ in range(3):  # until every pending struct is integrated
        for u in mixed:
            shuffled.apply_update(u)
    assert content_digest(in_order.get_update()) == content_digest(shuffled.get_update())


def _one(client: int, text: str) -> bytes:
    d = Doc(client_id=client)
    d.get("t", type=Text).insert(0, text)
    return d.get_update()


def test_two_versions_of_one_id_differ_and_non_ascii_counts_utf16_units() -> None:
    base = _one(9, "shared ✓ 😀 ")
    x, y = Doc(), Doc()
    for doc, text in ((x, "evil A é"), (y, "evil B é")):
        doc.apply_update(base)
        doc.apply_update(_one(5, text))
    assert content_digest(x.get_update()) != content_digest(y.get_update())
    # A deletion changes it; deleting the same units on both sides makes them equal again.
    for doc in (x, y):
        del doc.get("t", type=Text)[0:1]
    assert content_digest(x.get_update()) != content_digest(y.get_update())
    same = Doc()
    same.apply_update(x.get_update())
    assert content_digest(same.get_update()) == content_digest(x.get_update())
