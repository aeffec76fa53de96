"""Membership on real nodes (127.0.0.1, real caches, a dir:// checkpoint sink): the roster,
revocation while a member is offline, a revoked device with its old key or a fresh one,
invitations, and what crosses the wire in clear."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pycrdt
import pytest
from meshkit import SECRET, NodeFactory, eventually, node_config
from tcp_proxy import RecordingProxy

from unity_crdt import ConfigError, MembershipError, Node
from unity_crdt.checkpoint.directory import DirectorySink
from unity_crdt.checkpoint.policy import Checkpointer
from unity_crdt.crypto.keys import derive_group_keys, open_blob
from unity_crdt.errors import CheckpointError, SecurityError
from unity_crdt.ids import PeerAddress
from unity_crdt.members.invites import InviteCode, parse_invite

pytestmark = pytest.mark.slow

T = 20.0  # generous: the box is shared


def text(node: Node, doc: str = "notes") -> str:
    return str(node.doc(doc).get("t", type=pycrdt.Text))


def write(node: Node, value: str, doc: str = "notes") -> None:
    t = node.doc(doc).get("t", type=pycrdt.Text)
    t.insert(len(str(t)), value)


def epoch(node: Node) -> int:
    ms = node.status().membership
    assert ms is not None
    return ms.epoch


def state(node: Node) -> str:
    ms = node.status().membership
    assert ms is not None
    return ms.state


def sink_url(tmp: Path) -> str:
    return f"dir://{tmp / 'sink'}"


async def test_revoke_one_of_four_while_one_is_offline(
    make_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cp = {"checkpoint_url": sink_url(tmp_path), "checkpoint_interval": 0.5}
    a = await make_node("alice", **cp)
    b = await make_node("bob", peers=(a.url,), **cp)
    c = await make_node("carol", peers=(a.url, b.url), **cp)
    d = await make_node("dave", peers=(a.url, b.url, c.url), **cp)
    await eventually(lambda: all(len(n.peers) == 3 for n in (a, b, c, d)), T, "full mesh")
    await eventually(lambda: all(len(n.members) == 4 for n in (a, b, c, d)), T, "rosters")
    assert {m.name for m in a.members} == {"alice", "bob", "carol", "dave"}
    assert all(m.state == "active" and m.added_by == m.device_id for m in b.members)
    write(c, "c-before. ")
    await eventually(lambda: all("c-before" in text(n) for n in (a, b, d)), T, "sync before")
    await d.checkpoint()
    d_id, c_id = d.device_id, c.device_id
    await d.close()  # dave goes offline
    await eventually(lambda: len(a.peers) == 2, T, "dave gone")

    await a.revoke(c_id)
    # revoke() returned: alice is in epoch 1 and has no link to carol.
    assert epoch(a) == 1 and c_id not in {p.device_id for p in a.peers}
    assert {m.name: m.state for m in a.members}["carol"] == "revoked"
    await eventually(lambda: epoch(b) == 1, T, "bob moves to epoch 1")
    await eventually(lambda: state(c) == "revoked" and not c.peers, T, "carol knows")
    assert "revoked" in (c.status().membership.error or "")  # type: ignore[union-attr]
    write(a, "a-after. ")
    write(b, "b-after. ")
    write(c, "c-after. ")  # carol's later edit: it must reach nobody
    await eventually(lambda: "a-after" in text(b) and "b-after" in text(a), T, "a and b sync")
    with pytest.raises(MembershipError):
        await c.invite()

    # Dave comes back with the same config (nobody typed a new secret) and joins epoch 1.
    d = await make_node("dave", peers=(a.url, b.url, c.url), **cp)
    assert d.device_id == d_id
    await eventually(lambda: epoch(d) == 1, T, "dave moves to epoch 1")
    await eventually(lambda: "a-after" in text(d) and "b-after" in text(d), T, "dave catches up")
    write(d, "d-after. ")
    await eventually(lambda: all("d-after" in text(n) for n in (a, b)), T, "dave's edit spreads")
    await asyncio.sleep(2.0)
    for n in (a, b, d):
        assert "c-after" not in text(n)
    assert "a-after" not in text(c) and "d-after" not in text(c)
    assert [epoch(n) for n in (a, b, d)] == [1, 1, 1]
    assert sorted(p.name for p in a.peers) == ["bob", "dave"]

    # Checkpoints written from now on are under epoch 1; carol's old keys open none of them.
    for n in (a, b, d):
        await n.checkpoint()
    with pytest.raises(CheckpointError, match="revoked"):
        await c.checkpoint()  # the revoked device's own node pushes nothing more
    old = Checkpointer(
        derive_group_keys(SECRET), c_id, DirectorySink(tmp_path / "sink"), lambda n: b""
    )
    states = await old.restore()
    got = pycrdt.Doc()
    for blob in states.get("notes", []):
        got.apply_update(blob)
    assert "c-before" in str(got.get("t", type=pycrdt.Text))  # the old epoch: yes
    for word in ("a-after", "b-after", "d-after"):
        assert word not in str(got.get("t", type=pycrdt.Text))
    _assert_no_plaintext(tmp_path / "sink", [b"a-after", b"b-after", b"d-after", b"c-after"])
    # ... and a member restoring (both epochs) never takes carol's later edits from it.
    assert "notes" in await a.restore()
    assert "c-after" not in text(a)

    # A member restarting keeps epoch 1 from its cache (membership.json, 0600).
    await b.close()
    state_file = tmp_path / "bob" / "membership.json"
    assert state_file.stat().st_mode & 0o777 == 0o600
    assert SECRET not in state_file.read_text()
    b = await make_node("bob", peers=(a.url,), **cp)
    assert epoch(b) == 1
    await eventually(lambda: any(p.name == "alice" for p in b.peers), T, "bob relinks")


def _assert_no_plaintext(root: Path, words: list[bytes]) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for word in words:
                assert word not in data, (word, path)


async def test_a_revoked_device_cannot_link_with_its_old_key_or_a_fresh_one(
    make_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cp = {"checkpoint_url": sink_url(tmp_path), "checkpoint_interval": 0.5}
    a = await make_node("alice", **cp)
    b = await make_node("bob", peers=(a.url,), **cp)
    c = await make_node("carol", peers=(a.url, b.url), **cp)
    await eventually(lambda: all(len(n.members) == 3 for n in (a, b, c)), T, "rosters")
    c_id = c.device_id
    await c.close()
    await a.revoke(c_id)
    await eventually(lambda: epoch(b) == 1, T, "bob moves")
    write(a, "secret-after. ")
    await a.checkpoint()

    # The thief's client ignores what it was told: it drops its membership state and dials
    # with its old device key and the old group secret.
    (tmp_path / "carol" / "membership.json").unlink()
    thief = await make_node("carol", peers=(a.url, b.url), **cp)
    assert thief.device_id == c_id and state(thief) == "member"  # it believes it is one
    write(thief, "thief-edit. ")
    await eventually(lambda: state(thief) == "revoked", T, "told it was revoked")
    assert "revoked" in (thief.status().membership.error or "")  # type: ignore[union-attr]
    assert "was revoked from this group" in caplog.text
    # ... and with a freshly generated key (a new cache dir) and the old secret.
    fresh = await make_node("carol2", peers=(a.url, b.url), **cp)
    write(fresh, "fresh-edit. ")
    await eventually(
        lambda: "roster" in ((fresh.status().membership.error) or ""),  # type: ignore[union-attr]
        T,
        "fresh key refused",
    )
    assert "invite code" in (fresh.status().membership.error or "")  # type: ignore[union-attr]
    await asyncio.sleep(3.0)
    assert not thief.peers and not fresh.peers
    assert {p.name for p in a.peers} == {"bob"}
    for n in (thief, fresh):
        assert "secret-after" not in text(n)
    for n in (a, b):
        assert "thief-edit" not in text(n) and "fresh-edit" not in text(n)
        assert {m.name for m in n.members} == {"alice", "bob", "carol"}  # no new member
    # Checkpoints: both wrote to the old epoch's store; a member's restore takes none of it.
    await thief.close()  # told it is revoked: it writes no final checkpoint
    await fresh.close()  # its final checkpoint goes to the old epoch's tenant
    assert "notes" in await b.restore()
    assert "thief-edit" not in text(b) and "fresh-edit" not in text(b)


async def test_an_old_epochs_checkpoints_restore_for_members_but_not_a_revoked_devices(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    cp = {"checkpoint_url": sink_url(tmp_path), "checkpoint_interval": 30.0}
    a = await make_node("alice", **cp)
    b = await make_node("bob", peers=(a.url,), **cp)
    c = await make_node("carol", peers=(a.url,), **cp)
    await eventually(lambda: all(len(n.members) == 3 for n in (a, b, c)), T, "rosters")
    # Bob writes a doc only the checkpoint store holds (epoch 0), then goes away for good.
    await b.close()
    b2 = Node(node_config(tmp_path, "bob", checkpoint_url=sink_url(tmp_path)))
    await b2.start()
    write(b2, "only in the store", doc="bobs")
    await b2.close()
    c_id = c.device_id
    await a.revoke(c_id)
    # Carol (revoked) comes back as a thief and writes the same doc into epoch 0's store...
    await c.close()
    (tmp_path / "carol" / "membership.json").unlink()
    c = await make_node("carol", **cp)
    write(c, "carol-later", doc="bobs")
    await c.checkpoint()
    # ... and forges one dated long before its revocation: the writer is revoked, so no.
    forged = pycrdt.Doc()
    forged.get("t", type=pycrdt.Text).insert(0, "backdated")
    thief = Checkpointer(
        derive_group_keys(SECRET),
        c_id,
        DirectorySink(tmp_path / "sink"),
        lambda name: forged.get_update(),
        clock=lambda: 1_000_000.0,
    )
    thief.mark_dirty("bobs")
    assert (await thief.checkpoint()).written == ("bobs",)
    # Alice loses her cache (she keeps her device key and membership state) and restores.
    await a.close()
    for f in (tmp_path / "alice").iterdir():
        if f.name.startswith("store.sqlite3"):
            f.unlink()
    a2 = Node(node_config(tmp_path, "alice", checkpoint_url=sink_url(tmp_path)))
    await a2.start()
    try:
        assert epoch(a2) == 1
        assert "bobs" in await a2.restore()
        assert text(a2, "bobs") == "only in the store"  # epoch 0, by an active member: yes
    finally:
        await a2.close()


async def test_invite_joins_a_new_device_once_and_the_code_then_fails_clearly(
    make_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = await make_node("alice")
    b = await make_node("bob", peers=(a.url,))
    await eventually(lambda: len(a.members) == 2, T, "roster")
    write(a, "shared. ")
    code = await a.invite(ttl=60)
    assert code.startswith("uci1.") and len(code) < 130
    assert SECRET not in code
    tablet = await make_node("tablet", peers=(b.url,), group_secret=code)
    await eventually(lambda: state(tablet) == "member", T, "tablet joins")
    await eventually(lambda: "shared" in text(tablet), T, "tablet syncs")
    roster = {m.name: m for m in a.members}
    await eventually(lambda: "tablet" in {m.name for m in a.members}, T, "alice sees tablet")
    roster = {m.name: m for m in a.members}
    assert roster["tablet"].added_by == b.device_id and roster["tablet"].state == "active"
    write(tablet, "from tablet. ")
    await eventually(lambda: "from tablet" in text(a), T, "tablet's edit reaches alice")
    # The same code again, on another device: refused, and it says why.
    again = await make_node("phone", peers=(a.url, b.url), group_secret=code)
    await eventually(
        lambda: "already used" in (again.status().membership.error or ""),  # type: ignore[union-attr]
        T,
        "used code refused",
    )
    assert state(again) == "joining" and not again.peers and "shared" not in text(again)
    assert "tablet" in {m.name for m in a.members} and "phone" not in {m.name for m in a.members}
    # The joined device restarts from its cache: the code is not used again.
    await tablet.close()
    tablet = await make_node("tablet", peers=(b.url,), group_secret=code)
    assert state(tablet) == "member"
    await eventually(lambda: any(p.name == "bob" for p in tablet.peers), T, "tablet relinks")
    # Invited devices can revoke too (any active member may).
    await tablet.revoke(a.device_id)
    await eventually(lambda: state(a) == "revoked", T, "alice revoked by the tablet")
    await eventually(lambda: epoch(b) == 1, T, "bob moves")


async def test_an_expired_invite_is_refused_by_the_device_and_by_members(
    make_node: NodeFactory,
) -> None:
    a = await make_node("alice")
    code = await a.invite(ttl=1.0)
    await asyncio.sleep(1.5)
    with pytest.raises(ConfigError, match="expired"):
        await make_node("late", peers=(a.url,), group_secret=code)
    # A code whose own expiry was pushed forward: the member's roster says no.
    parsed = parse_invite(code)
    assert parsed is not None
    forged = InviteCode(parsed.group_id, parsed.psk, parsed.beacon_key, parsed.expires + 10**9)
    late = await make_node("late2", peers=(a.url,), group_secret=forged.encode())
    await eventually(
        lambda: "expired" in (late.status().membership.error or ""),  # type: ignore[union-attr]
        T,
        "member refuses",
    )
    assert {m.name for m in a.members} == {"alice"}


async def test_wire_names_no_member_epoch_or_code(make_node: NodeFactory, tmp_path: Path) -> None:
    a = await make_node("alice-the-admin")
    proxy = await RecordingProxy("127.0.0.1", int(a.url.rsplit(":", 1)[1])).start()
    try:
        b = await make_node("bob-the-builder", peers=(proxy.url,))
        c = await make_node("carol-the-cook", peers=(proxy.url,))
        await eventually(lambda: len(a.members) == 3, T, "roster over the proxy")
        code = await a.invite(ttl=60)
        tab = await make_node("tablet-of-tom", peers=(proxy.url,), group_secret=code)
        await eventually(lambda: state(tab) == "member" and len(tab.peers) == 1, T, "join")
        await a.revoke(c.device_id)
        await eventually(lambda: epoch(b) == 1 and epoch(tab) == 1, T, "epoch 1 over the proxy")
        await eventually(lambda: state(c) == "revoked", T, "carol told")
        wire = bytes(proxy.captured)
        assert len(wire) > 5000
        for n in (a, b, c, tab):
            assert n.config.name.encode() not in wire
            assert n.device_id.encode() not in wire
        for needle in (b"epoch", b"revoke", b"invite", code.encode(), code[5:30].encode()):
            assert needle not in wire
    finally:
        await proxy.close()


async def test_membership_state_file_is_private_and_survives_damage(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    a = await make_node("alice")
    await a.close()
    path = tmp_path / "alice" / "membership.json"
    data: dict[str, Any] = json.loads(path.read_text())
    assert data["group"] and len(data["ops"]) == 1 and data["secrets"] == {}
    path.write_text("{ damaged")
    a = await make_node("alice")  # starts from the group secret, says so
    assert state(a) == "member" and len(a.members) == 1


def test_open_blob_refuses_a_foreign_key() -> None:
    """(A guard for the assertions above: an old key does not open a new epoch's blob.)"""
    from unity_crdt.crypto.keys import keys_from_master, seal_blob

    new = keys_from_master(b"n" * 32)
    blob = seal_blob(new.checkpoint_key, b"x")
    with pytest.raises(SecurityError):
        open_blob(derive_group_keys(SECRET).checkpoint_key, blob)


async def test_limits_a_member_not_yet_told_still_trusts_the_revoked_device(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """The documented limit: until the revocation reaches a member, that member links with the
    revoked device like any other, and what it takes from it then spreads."""
    a = await make_node("alice")
    b = await make_node("bob", peers=(a.url,))
    c = await make_node("carol", peers=(a.url,))
    await eventually(lambda: all(len(n.members) == 3 for n in (a, b, c)), T, "rosters")
    await b.close()
    await c.close()
    await a.revoke(c.device_id)
    (tmp_path / "carol" / "membership.json").unlink()  # the thief ignores what it was told
    thief = await make_node("carol")
    write(thief, "thief-edit. ")
    b = await make_node("bob", peers=(thief.url,))  # bob meets the thief first
    await eventually(lambda: "thief-edit" in text(b), T, "bob trusts the thief")
    assert epoch(b) == 0
    b._mesh.add_address(PeerAddress.parse(a.url))  # type: ignore[union-attr]
    await eventually(lambda: epoch(b) == 1, T, "bob learns the revocation from alice")
    await eventually(lambda: not thief.peers, T, "bob then cuts the thief")
    await eventually(lambda: "thief-edit" in text(a), T, "what bob took spreads")


async def test_limits_a_revoked_device_can_forge_an_old_epoch_checkpoint_as_a_member(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """The documented limit: checkpoint objects are sealed with the epoch's key, not signed by
    their writer, so in an epoch it still has the key of, a revoked device can write an object
    that claims another member and an early time; restore() of older epochs takes it."""
    cp = {"checkpoint_url": sink_url(tmp_path), "checkpoint_interval": 30.0}
    a = await make_node("alice", **cp)
    b = await make_node("bob", peers=(a.url,), **cp)
    c = await make_node("carol", peers=(a.url,), **cp)
    await eventually(lambda: all(len(n.members) == 3 for n in (a, b, c)), T, "rosters")
    await a.revoke(c.device_id)
    forged = pycrdt.Doc()
    forged.get("t", type=pycrdt.Text).insert(0, "forged")
    fake = Checkpointer(
        derive_group_keys(SECRET),
        b.device_id,  # claims to be bob, an active member
        DirectorySink(tmp_path / "sink"),
        lambda name: forged.get_update(),
        clock=lambda: 1_000_000.0,
    )
    fake.mark_dirty("notes")
    await fake.checkpoint()
    await a.restore()
    assert "forged" in text(a)


async def test_concurrent_revocations_by_two_members_converge_on_one_new_epoch(
    make_node: NodeFactory,
) -> None:
    a = await make_node("alice")
    b = await make_node("bob", peers=(a.url,))
    x = await make_node("xavier", peers=(a.url,))
    y = await make_node("yvonne", peers=(a.url,))
    await eventually(lambda: all(len(n.members) == 4 for n in (a, b, x, y)), T, "rosters")
    # Bob goes off on his own and revokes yvonne; meanwhile alice revokes xavier.
    await b.close()
    b = await make_node("bob")  # no peers: isolated
    await b.revoke(y.device_id)
    await a.revoke(x.device_id)
    assert epoch(a) == epoch(b) == 1  # two different epochs, both numbered 1
    b._mesh.add_address(PeerAddress.parse(a.url))  # type: ignore[union-attr]
    # One of the two epoch-1 secrets went to a device the other revoked: a member rekeys.
    await eventually(lambda: epoch(a) == 2 and epoch(b) == 2, T, "one new epoch")
    for n in (a, b):
        states = {m.name: m.state for m in n.members}
        assert states == {
            "alice": "active",
            "bob": "active",
            "xavier": "revoked",
            "yvonne": "revoked",
        }
    view_a, view_b = a._members.roster.view(), b._members.roster.view()  # type: ignore[union-attr]
    assert view_a.epoch == view_b.epoch and set(view_a.epoch.sealed) == {a.device_id, b.device_id}
    assert not view_a.needs_rekey
    await eventually(lambda: not x.peers and not y.peers, T, "both cut off")
    write(a, "after both. ")
    await eventually(lambda: "after both" in text(b), T, "alice and bob sync")
    assert "after both" not in text(x) and "after both" not in text(y)


def test_a_threaded_node_lists_invites_and_revokes(tmp_path: Path) -> None:
    """The same calls from a GUI thread (ThreadedNode blocks on the node's loop)."""
    import time

    from unity_crdt import ThreadedNode

    with ThreadedNode(node_config(tmp_path, "alice")) as alice:
        code = alice.invite(ttl=60)
        with ThreadedNode(
            node_config(tmp_path, "tab", group_secret=code, peers=(alice.url,))
        ) as tab:
            deadline = time.monotonic() + T
            while len(alice.members()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert {m.name for m in alice.members()} == {"alice", "tab"}
            alice.revoke(tab.device_id)
            assert {m.name: m.state for m in alice.members()}["tab"] == "revoked"
            assert alice.status().membership.epoch == 1  # type: ignore[union-attr]
            with pytest.raises(MembershipError, match="already revoked"):
                alice.revoke(tab.device_id)
