"""The roster's rules (members.roster, members.ops): merge, admission, revocation, epochs."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unity_crdt.crypto.epochs import open_epoch_secret, seal_epoch_secret
from unity_crdt.crypto.keys import DeviceIdentity
from unity_crdt.crypto.signing import SigningKey
from unity_crdt.errors import SecurityError
from unity_crdt.members.ops import (
    NO_EPOCH,
    Add,
    Body,
    Epoch,
    Grant,
    Invite,
    Join,
    Op,
    Revoke,
    decode_op,
    make_op,
)
from unity_crdt.members.roster import Roster

GROUP = b"G" * 16
T0 = 1_700_000_000_000


class Dev:
    """A device that makes ops on its own copy of the roster."""

    def __init__(self, name: str) -> None:
        self.identity = DeviceIdentity.generate()
        self.key = SigningKey(self.identity.signing_seed())
        self.id = self.identity.device_id
        self.name = name
        self.roster = Roster(GROUP)
        self.clock = T0

    def op(self, body: Body, deps: tuple[bytes, ...] | None = None) -> Op:
        self.clock += 1
        op = make_op(
            body,
            group_id=GROUP,
            author=self.id,
            at=self.clock,
            deps=self.roster.heads() if deps is None else deps,
            key=self.key,
        )
        assert self.roster.add(op.raw) == [op]
        return op

    def join(self, secret: bool = True) -> Op:
        return self.op(Join(self.identity.public_key, self.key.public_key, self.name, secret))

    def learn(self, *others: Dev) -> None:
        for other in others:
            for op in other.roster.ops:
                self.roster.add(op.raw)

    def epoch(self, number: int, members: list[Dev]) -> Op:
        nonce = b"n" * 16
        sealed = tuple(
            (
                m.id,
                seal_epoch_secret(
                    b"s" * 32,
                    m.identity.public_key,
                    group_id=GROUP,
                    number=number,
                    nonce=nonce,
                    device_id=m.id,
                ),
            )
            for m in sorted(members, key=lambda m: m.id)
        )
        return self.op(Epoch(number, nonce, sealed))


def group(*names: str) -> list[Dev]:
    """Devices that joined with the group secret and all saw each other's JOIN."""
    devs = [Dev(n) for n in names]
    for d in devs:
        d.join()
    for d in devs:
        d.learn(*devs)
    return devs


def test_ops_round_trip_and_tampering_is_refused() -> None:
    (a,) = group("a")
    op = a.op(Invite(b"i" * 16, T0 + 10_000, 0))
    assert decode_op(op.raw) == op
    fresh = Roster(GROUP)
    fresh.add(a.roster.ops[0].raw)
    flipped = bytearray(op.raw)
    flipped[-70] ^= 1  # inside the body: the signature no longer matches
    with pytest.raises(SecurityError, match="signature"):
        fresh.add(bytes(flipped))
    with pytest.raises(SecurityError):
        fresh.add(op.raw[:-1])
    with pytest.raises(SecurityError, match="another group"):
        Roster(b"H" * 16).add(a.roster.ops[0].raw)


def test_an_op_signed_with_another_devices_key_is_refused() -> None:
    a, b = group("a", "b")
    forged = make_op(
        Revoke(b.id), group_id=GROUP, author=a.id, at=T0, deps=b.roster.heads(), key=b.key
    )
    with pytest.raises(SecurityError, match="signature"):
        b.roster.add(forged.raw)


def test_v1_roster_is_built_from_the_devices_seen() -> None:
    a, b, c = group("alice", "bob", "carol")
    view = a.roster.view()
    assert sorted(view.members) == sorted([a.id, b.id, c.id])
    assert all(m.state == "active" and m.via == "secret" for m in view.members.values())
    assert view.members[b.id].added_by == b.id
    assert view.door_open and view.epoch.number == 0 and not view.needs_rekey


def test_revocation_rotates_and_closes_the_secret_door() -> None:
    a, b, c = group("a", "b", "c")
    a.op(Revoke(c.id))
    assert a.roster.view().needs_rekey  # c holds epoch 0
    a.epoch(1, [a, b])
    view = a.roster.view()
    assert view.members[c.id].state == "revoked" and view.members[c.id].revoked_by == a.id
    assert not view.door_open and not view.needs_rekey
    assert view.epoch.number == 1 and set(view.epoch.sealed) == {a.id, b.id}
    assert view.epochs[0].ended_at == view.epoch.at
    # A device joining with the group secret now (its JOIN after the revocation) is no member.
    late = Dev("late")
    late.learn(a)
    late.join()
    a.learn(late)
    assert a.roster.view().state(late.id) is None
    # ... nor is one whose JOIN was concurrent with the revocation (it never reached a).
    old = Dev("old")
    old.roster = Roster(GROUP)
    for op in b.roster.ops[:3]:
        old.roster.add(op.raw)
    old.join()
    a.learn(old)
    assert a.roster.view().state(old.id) is None


def test_revocation_wins_over_a_concurrent_invite_by_the_revoked_device() -> None:
    a, b, c = group("a", "b", "c")
    newbie = Dev("newbie")
    newbie.learn(c)
    nonce = b"x" * 16
    c.op(Invite(nonce, T0 + 60_000, 0))
    newbie.learn(c)
    newbie.join(secret=False)
    c.learn(newbie)
    c.op(Add(newbie.id, nonce))
    assert c.roster.view().state(newbie.id) == "active"  # in c's world, newbie got in
    a.op(Revoke(c.id))  # concurrently: a never saw the invite
    a.epoch(1, [a, b])
    for d in (a, b, c):
        d.learn(a, c)
    for d in (a, b, c):
        view = d.roster.view()
        assert view.state(c.id) == "revoked"
        assert view.state(newbie.id) is None  # the concurrent ADD is void
        assert view.epoch.number == 1
    # A revoked device cannot escape by naming old deps either ("before" its revocation).
    c.op(Invite(b"y" * 16, T0 + 60_000, 0), deps=a.roster.ops[2].deps or (a.roster.ops[2].id,))
    a.learn(c)
    assert b"y" * 16 not in a.roster.view().invites


def test_mutual_revocation_revokes_both_and_spares_the_rest() -> None:
    a, b, c, d = group("a", "b", "c", "d")
    a.op(Revoke(b.id))
    b.op(Revoke(a.id))  # concurrent: neither saw the other's
    b.op(Revoke(c.id))  # the revoked b also tries to take c down, concurrently
    for x in (a, b, c, d):
        x.learn(a, b)
    view = d.roster.view()
    assert view.state(a.id) == "revoked" and view.state(b.id) == "revoked"
    assert view.state(c.id) == "active"  # b's other revocation is void: a revoked it first
    assert view.needs_rekey  # and both revoked devices held epoch 0


def test_concurrent_epochs_pick_one_and_rekey_when_a_revoked_device_holds_it() -> None:
    a, b, c, d = group("a", "b", "c", "d")
    a.op(Revoke(c.id))
    e_a = a.epoch(1, [a, b, d])
    b.op(Revoke(d.id))
    e_b = b.epoch(1, [a, b, c])
    a.learn(b)
    b.learn(a)
    va, vb = a.roster.view(), b.roster.view()
    assert va.epoch.op_id == vb.epoch.op_id == min(e_a.id, e_b.id)
    assert va.needs_rekey  # whichever won was sealed to a device the other revoked
    a.epoch(2, [a, b])
    b.learn(a)
    view = b.roster.view()
    assert view.epoch.number == 2 and not view.needs_rekey


def test_invites_are_single_use_expire_and_belong_to_their_epoch() -> None:
    (a, b) = group("a", "b")
    nonce = b"n" * 16
    a.op(Invite(nonce, T0 + 100, 0))
    x, y = Dev("x"), Dev("y")
    for n in (x, y):
        n.learn(a)
        n.join(secret=False)
        a.learn(n)
    b.learn(a)
    a.op(Add(x.id, nonce))
    b.op(Add(y.id, nonce))  # the same code, redeemed at another member concurrently
    a.learn(b)
    b.learn(a)
    va = a.roster.view()
    assert va == b.roster.view() or va.members == b.roster.view().members
    used = va.invites[nonce].used_by
    assert used in (x.id, y.id)
    assert {va.state(x.id), va.state(y.id)} == {"active", None}
    # After its expiry (the adder's clock) an invitation adds no one.
    late = b"l" * 16
    a.op(Invite(late, a.clock + 1, 0))
    z = Dev("z")
    z.learn(a)
    z.join(secret=False)
    a.learn(z)
    a.clock += 10
    a.op(Add(z.id, late))
    assert a.roster.view().state(z.id) is None
    # An invitation made in epoch 0 adds no one in epoch 1.
    old = b"o" * 16
    a.op(Invite(old, T0 + 10**9, 0))
    a.op(Revoke(b.id))
    a.epoch(1, [a, x] if va.state(x.id) == "active" else [a, y])
    w = Dev("w")
    w.learn(a)
    w.join(secret=False)
    a.learn(w)
    a.op(Add(w.id, old))
    assert a.roster.view().state(w.id) is None


def test_grants_cover_members_added_after_an_epoch() -> None:
    a, b = group("a", "b")
    a.op(Revoke(b.id))
    e = a.epoch(1, [a])
    nonce = b"n" * 16
    a.op(Invite(nonce, T0 + 10**6, 1))
    n = Dev("n")
    n.learn(a)
    n.join(secret=False)
    a.learn(n)
    a.op(Add(n.id, nonce))
    view = a.roster.view()
    assert view.state(n.id) == "active" and view.lacking() == [n.id]
    sealed = seal_epoch_secret(
        b"s" * 32, n.identity.public_key, group_id=GROUP, number=1, nonce=b"n" * 16, device_id=n.id
    )
    a.op(Grant(1, e.id, n.id, sealed))
    view = a.roster.view()
    assert view.lacking() == []
    got = open_epoch_secret(
        view.epoch.sealed[n.id], n.identity, group_id=GROUP, number=1, nonce=view.epoch.nonce
    )
    assert got == b"s" * 32
    # Sealed to n, it opens for nobody else, and not as another epoch.
    with pytest.raises(SecurityError):
        open_epoch_secret(sealed, a.identity, group_id=GROUP, number=1, nonce=b"n" * 16)
    with pytest.raises(SecurityError):
        open_epoch_secret(sealed, n.identity, group_id=GROUP, number=2, nonce=b"n" * 16)
    # An epoch-0 grant names no EPOCH op.
    assert a.roster.view().epochs[0].op_id == NO_EPOCH


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_any_delivery_order_gives_the_same_view(seed: int) -> None:
    """Ops made concurrently on four devices, delivered in random orders and subsets:
    every roster holding the same ops computes the same view (the merge is set union)."""
    rng = random.Random(seed)
    devs = group("a", "b", "c", "d")
    for _ in range(8):
        d = rng.choice(devs)
        other = rng.choice(devs)
        choice = rng.randrange(4)
        if choice == 0:
            d.op(Revoke(other.id))
        elif choice == 1:
            d.op(Invite(rng.randbytes(16), T0 + 10**6, 0))
        elif choice == 2:
            d.epoch(1 + max(r.number for r in d.roster.view().epochs), [x for x in devs])
        else:
            d.learn(other)
    ops = {o.id: o for d in devs for o in d.roster.ops}
    views = []
    for order in itertools.islice(itertools.permutations(devs), 4):
        r = Roster(GROUP)
        pool = list(ops.values())
        rng.shuffle(pool)
        for _ in range(len(pool) + 1):  # deps may arrive after: retried until all are in
            for o in pool:
                r.add(o.raw)
        assert len(r) == len(ops), order
        views.append(r.view())
    assert all(v == views[0] for v in views)


def test_a_second_signing_key_for_a_device_voids_every_op_signed_in_its_name() -> None:
    """A member registers its own signing key for another member's device id, hoping to act
    in its name once itself revoked: every op under that id becomes void, honest or forged."""
    a, v, t = group("a", "v", "thief")
    fake = make_op(
        Join(v.identity.public_key, t.key.public_key, "v", True),
        group_id=GROUP,
        author=v.id,
        at=T0,
        deps=(),
        key=t.key,
    )
    honest = v.op(Invite(b"h" * 16, T0 + 10**6, 0))  # v's real op, before the fake spreads
    a.learn(v)
    a.roster.add(fake.raw)
    forged = make_op(
        Invite(b"f" * 16, T0 + 10**6, 0),
        group_id=GROUP,
        author=v.id,
        at=T0 + 5,
        deps=a.roster.heads(),
        key=t.key,
    )
    a.roster.add(forged.raw)  # verifies with the fake JOIN's key...
    view = a.roster.view()
    assert forged.id not in view.valid and honest.id not in view.valid  # ... and counts not
    assert b"f" * 16 not in view.invites and b"h" * 16 not in view.invites
    assert view.state(v.id) == "active"  # v still links and syncs (its X25519 key)
    assert view.members[v.id].x25519 == v.identity.public_key  # its id binds its link key
