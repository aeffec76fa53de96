"""SyncSession over in-memory links: every message goes through codec.encode/decode.

The harness is `unity_crdt.testing` (`Party`, `Net`): each party owns a Replica, one
SyncSession per link, and the node's own relay rule (`sync.router.Router`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pycrdt import Array, Map, Text

from unity_crdt.errors import ErrorCode, ProtocolError
from unity_crdt.sync import codec
from unity_crdt.sync.codec import (
    PROTOCOL_VERSION,
    Batch,
    Hello,
    Message,
    Part,
    Ping,
    Pong,
    SyncStep1,
    SyncStep2,
    Update,
)
from unity_crdt.sync.inventory import Advert, Buckets, Inventory, InventoryRequest, Summary
from unity_crdt.sync.nodewide import SeenFilter
from unity_crdt.sync.replica import RemoteOrigin, Replica
from unity_crdt.sync.session import EMPTY_UPDATE, Outgoing, Reply, SyncSession
from unity_crdt.sync.yjs import bucket_of
from unity_crdt.testing import Net, Party


def pair(**kw: Any) -> tuple[Party, Party, Net]:
    a, b = Party("A"), Party("B")
    return a, b, Net(a, b, **kw)


def states_equal(parties: list[Party], docs: list[str]) -> bool:
    return all(
        len({p.replica.doc(d).get_state() for p in parties}) == 1
        and all(p.content(d) == parties[0].content(d) for p in parties)
        for d in docs
    )


def test_first_sync_of_disjoint_docs_then_everything_is_acknowledged() -> None:
    a, b, net = pair()
    a.text("alpha").insert(0, "from A")
    b.replica.doc("beta").get("m", type=Map)["k"] = "from B"
    b.replica.doc("gamma").get("a", type=Array).append("x")
    net.connect("A", "B")
    net.pump()
    assert a.content("beta") == b.content("beta") == ("", {"k": "from B"}, [])
    assert b.text("alpha").to_py() == "from A"
    assert states_equal([a, b], ["alpha", "beta", "gamma"])
    for p, other in ((a, "B"), (b, "A")):
        assert p.sessions[other].synced_docs >= {"alpha", "beta", "gamma"}
    # Docs that already match cost nothing: a fresh link exchanges HELLO and SUMMARY only.
    net.disconnect("A", "B")
    net.sent.clear()
    net.connect("A", "B")
    net.pump()
    assert net.sent == Counter({"Hello": 2, "Summary": 2})
    assert a.sessions["B"].is_synced("alpha") and b.sessions["A"].is_synced("gamma")


def test_live_updates_and_deletions_flow_both_ways() -> None:
    a, b, net = pair()
    net.connect("A", "B")
    net.pump()
    text = a.text("d")
    text += "hello world"
    net.pump()
    assert str(b.text("d")) == "hello world"
    del b.text("d")[0:6]
    net.pump()
    assert str(a.text("d")) == "world"
    assert states_equal([a, b], ["d"])


def test_deletion_made_offline_is_found_by_digest_on_reconnect() -> None:
    a, b, net = pair()
    a.replica.doc("d").get("m", type=Map)["gone"] = "soon"
    a.text("d").insert(0, "abcdef")
    net.connect("A", "B")
    net.pump()
    net.disconnect("A", "B")
    sv = a.replica.state_vector("d")
    del a.replica.doc("d").get("m", type=Map)["gone"]
    del a.text("d")[1:3]
    assert a.replica.state_vector("d") == sv  # only the digest can see this difference
    net.sent.clear()
    net.connect("A", "B")
    net.pump()
    assert b.content("d") == ("adef", {}, [])
    assert net.sent["SyncStep1"] == 2
    assert states_equal([a, b], ["d"])


def test_concurrent_edits_merge_with_no_edit_lost() -> None:
    a, b, net = pair()
    a.text("d").insert(0, "base")
    net.connect("A", "B")
    net.pump()
    net.disconnect("A", "B")
    a.text("d").insert(0, "A1-")
    a.replica.doc("d").get("m", type=Map)["a"] = "1"
    b.text("d").insert(4, "-B1")
    b.replica.doc("d").get("m", type=Map)["b"] = "2"
    del b.text("d")[0:1]
    net.connect("A", "B")
    net.pump()
    text, m, _ = a.content("d")
    assert text == "A1-ase-B1"
    assert m == {"a": "1", "b": "2"}
    assert states_equal([a, b], ["d"])
    assert a.sessions["B"].is_synced("d") and b.sessions["A"].is_synced("d")


def test_non_ascii_text_uses_utf8_byte_indices() -> None:
    a, b, net = pair()
    net.connect("A", "B")
    net.pump()
    text = a.text("ドキュメント/ü")
    text += "héllo wörld"
    net.pump()
    # pycrdt Text indices count UTF-8 bytes: after "hé" is byte 3, not character 2.
    b.text("ドキュメント/ü").insert(len("hé".encode()), "🌍")
    net.pump()
    del a.text("ドキュメント/ü")[len("hé🌍llo ".encode()) : len("hé🌍llo wö".encode())]
    net.pump()
    assert str(b.text("ドキュメント/ü")) == "hé🌍llo rld"
    assert states_equal([a, b], ["ドキュメント/ü"])


def test_bad_update_is_bad_update_error_and_replica_unchanged() -> None:
    a, b, net = pair()
    a.text("d").insert(0, "keep")
    net.connect("A", "B")
    net.pump()
    session = b.sessions["A"]
    before = b.replica.doc("d").get_update()
    names = b.replica.names()
    garbage = b"\x01\x01\x05garbage"
    for msg in (Update("d", garbage), SyncStep2("d", garbage), Update("new", garbage)):
        with pytest.raises(ProtocolError) as info:
            session.receive(msg, net.now)
        assert info.value.code == ErrorCode.BAD_UPDATE
    assert b.replica.doc("d").get_update() == before
    assert b.replica.names() == names
    assert b.reports == [r for r in b.reports if r[0] == "d"]  # nothing new was reported
    with pytest.raises(ProtocolError):
        session.receive(SyncStep1("d", b"\x09"), net.now)


def test_version_mismatch_and_messages_before_hello() -> None:
    replica = Replica(lambda *_: None)
    session = SyncSession(replica, peer="p", now=0.0)
    assert session.receive(Ping(7), 0.0) == [Pong(7)]  # keepalive is fine before HELLO
    for early in (Update("d", EMPTY_UPDATE), SyncStep1("d", b"\x00"), SyncStep2("d", b"\x00\x00")):
        with pytest.raises(ProtocolError, match="before HELLO"):
            session.receive(early, 0.0)
    with pytest.raises(ProtocolError) as info:
        session.receive(Hello(PROTOCOL_VERSION + 1, {}), 0.0)
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION
    assert not session.ready
    assert session.receive(Hello(PROTOCOL_VERSION, {}), 0.0) == []
    assert session.ready


def test_keepalive_ping_pong_and_idle_timeout() -> None:
    replica = Replica(lambda *_: None)
    s = SyncSession(
        replica, peer="p", now=0.0, ping_interval=10, idle_timeout=30, anti_entropy_interval=1000
    )
    assert s.tick(5.0) == []
    out = s.tick(10.0)
    assert len(out) == 1 and isinstance(out[0], Ping)
    assert s.tick(15.0) == []  # one ping per interval
    s.receive(Pong(out[0].nonce), 10.25)
    assert s.stats.rtt == pytest.approx(0.25)
    assert s.tick(35.0) != []  # heard at 10.25: silent for 24.75 s, so only a ping
    with pytest.raises(ProtocolError) as info:
        s.tick(40.25)
    assert info.value.code == ErrorCode.TIMEOUT
    # Our own stall (the driver saw its timer fire far too late) is not the peer's silence:
    # a ping asks at once, and the peer has the rest of the timeout to answer.
    t = SyncSession(replica, peer="p", now=0.0, ping_interval=10, idle_timeout=30)
    t.resumed(100.0)
    assert any(isinstance(m, Ping) for m in t.tick(100.0))
    t.tick(119.0)
    with pytest.raises(ProtocolError):
        t.tick(120.0)


def test_anti_entropy_repairs_a_lost_update_and_restores_synced_status() -> None:
    a, b, net = pair(anti_entropy_interval=30.0, ping_interval=1000.0, idle_timeout=1e9)
    net.connect("A", "B")
    net.pump()
    a.text("d").insert(0, "lost")
    net.relay(a)
    assert not a.sessions["B"].is_synced("d")  # sent, but not acknowledged
    assert net.drop_in_flight("A", "B") == 1
    net.pump()
    assert "d" not in b.replica
    net.tick(29.0)
    assert net.pump() == 0  # not yet due
    net.tick(1.0)
    net.pump()
    assert str(b.text("d")) == "lost"
    assert a.sessions["B"].is_synced("d") and b.sessions["A"].is_synced("d")


def test_relay_across_a_line_with_no_direct_link() -> None:
    a, b, c = Party("A"), Party("B"), Party("C")
    net = Net(a, b, c)
    net.connect("A", "B")
    net.connect("B", "C")
    a.text("d").insert(0, "from A ü")
    a.replica.doc("d").get("m", type=Map)["k"] = "v"
    net.pump()
    assert c.content("d") == ("from A ü", {"k": "v"}, [])
    # A deletion is an update too: it must travel two hops, live ...
    del a.text("d")[0:5]
    net.pump()
    assert str(c.text("d")) == "A ü"
    # ... and through the digest handshake when the middle link was down.
    net.disconnect("B", "C")
    del a.replica.doc("d").get("m", type=Map)["k"]
    net.pump()
    net.connect("B", "C")
    net.pump()
    assert c.content("d") == ("A ü", {}, [])
    assert states_equal([a, b, c], ["d"])
    assert ("A", "C") not in net.queues


class Amnesiac(SeenFilter):
    """A SeenFilter that remembers nothing."""

    def add(self, update: bytes) -> bool:
        return True


@pytest.mark.parametrize("shared_filter", [True, False])
def test_gossip_terminates_and_reapplied_updates_are_not_regossiped(
    shared_filter: bool,
) -> None:
    # Without a shared SeenFilter, termination rests on the replica alone: applying an update
    # it already has changes nothing and is not reported.
    parties = [Party(n) for n in "ABC"]
    net = Net(*parties)
    for x, y in (("A", "B"), ("B", "C"), ("A", "C")):
        net.connect(x, y)
    net.pump()
    if not shared_filter:
        for p in parties:
            for s in p.sessions.values():
                s.seen = Amnesiac()
    for p in parties:
        p.reports.clear()
    net.sent.clear()
    parties[0].text("d").insert(0, "once")
    net.pump()
    assert states_equal(parties, ["d"])
    assert [len(p.reports) for p in parties] == [1, 1, 1]
    # A sends to B and C; B and C each relay once to the other; nobody sends it back to A.
    assert net.sent["Update"] == 4
    skipped = sum(s.stats.duplicates_skipped for p in parties for s in p.sessions.values())
    assert skipped == (2 if shared_filter else 0)


def test_seen_filter_is_bounded_and_forgets_oldest_first() -> None:
    seen = SeenFilter(capacity=3)
    for i in range(5):
        assert seen.add(bytes([i]))
    assert len(seen) == 3
    assert bytes([0]) not in seen and bytes([4]) in seen
    assert not seen.add(bytes([2]))  # refreshes 2, so 3 is now the oldest
    assert seen.add(bytes([5]))
    assert bytes([2]) in seen and bytes([3]) not in seen
    assert len(SeenFilter.key(b"x")) == 16
    with pytest.raises(ValueError):
        SeenFilter(capacity=0)


def test_policy_hook_hides_docs_from_a_peer() -> None:
    a, b = Party("A"), Party("B")
    net = Net(a, b)
    a.text("secret").insert(0, "hidden")
    a.text("public").insert(0, "shown")
    allow: Callable[[str], bool] = lambda d: d != "secret"  # noqa: E731
    net.connect("A", "B", a_kw={"allow": allow})
    net.pump()
    assert "secret" not in b.replica
    assert str(b.text("public")) == "shown"
    assert all("secret" not in repr(m) for src, _, m in net.log if src == "A")
    # Asking for it directly gets the same answer as for a doc that does not exist ...
    session = a.sessions["B"]
    (owed,) = session.receive(SyncStep1("secret", b"\x00"), net.now)
    assert session.reply(owed) == [SyncStep2("secret", EMPTY_UPDATE)]
    # ... and writes to it are dropped and counted: the pushed update, and the inventory
    # entry B's acknowledging SUMMARY leads A to page.
    b.text("secret").insert(0, "intrusion")
    net.pump()
    for _ in range(3):
        net.tick(1.0)
        net.pump()
    assert str(a.text("secret")) == "hidden"
    assert a.sessions["B"].stats.denied >= 2
    a.text("secret").insert(0, "more ")
    assert a.sessions["B"].local_update("secret", b"\x00\x00") == []


def test_asking_about_an_unknown_doc_creates_nothing() -> None:
    replica = Replica(lambda *_: None)
    s = SyncSession(replica, peer="p", now=0.0)
    s.receive(Hello(PROTOCOL_VERSION, {}), 0.0)
    (owed,) = s.receive(SyncStep1("ghost", b"\x00"), 0.0)
    assert owed == Reply("ghost", b"\x00")  # computed when the link can send it
    assert s.reply(owed) == [SyncStep2("ghost", EMPTY_UPDATE)]
    assert s.receive(SyncStep2("ghost", EMPTY_UPDATE), 0.0) == []
    assert s.receive(Update("ghost", EMPTY_UPDATE), 0.0) == []
    assert "ghost" not in replica


def test_a_round_pulls_only_what_the_peer_has_and_differs() -> None:
    """SUMMARY differs -> bucket fingerprints -> pages of the differing buckets -> pulls for
    docs the peer holds in another state; a doc only we hold is the peer's to pull."""
    a, p, _ = pair()
    a.text("mine").insert(0, "x")
    a.text("same").insert(0, "y")
    p.replica.apply_remote("same", a.replica.doc("same").get_update(), RemoteOrigin("a"))
    p.text("theirs").insert(0, "z")
    s = SyncSession(a.replica, peer="p", now=0.0)
    assert s.receive(Hello(PROTOCOL_VERSION, {}), 0.0) == []
    fingerprint, count = p.replica.fingerprint()
    assert count == 2
    assert s.receive(Summary(fingerprint, count), 0.0) == [InventoryRequest(None)]
    requests = s.receive(Buckets(p.replica.bucket_fingerprints()), 0.0)
    differing = {bucket_of("mine"), bucket_of("theirs")} - {bucket_of("same")}
    assert {r.bucket for r in requests if isinstance(r, InventoryRequest)} >= differing
    pulls = []
    for req in requests:
        assert isinstance(req, InventoryRequest) and req.bucket is not None
        entries, more = p.replica.bucket_page(req.bucket, req.after, 1024)
        pulls += s.receive(Inventory(req.bucket, tuple(entries), more), 0.0)
    assert [m for m in pulls if isinstance(m, SyncStep1)] == [SyncStep1("theirs", b"\x00")]
    assert "same" in s.synced_docs and "mine" not in s.synced_docs
    # A page nobody asked for (late, from an abandoned round) changes nothing.
    before = dict(s._peer_digests)
    assert s.receive(Inventory(bucket_of("mine"), (("mine", b"\x07" * 16),), False), 0.0) == []
    assert s._peer_digests == before and s.stats.unsolicited == 1


def test_summary_of_an_equal_inventory_costs_nothing_and_acknowledges_everything() -> None:
    a, p, _ = pair()
    for i in range(50):
        a.text(f"doc{i}").insert(0, f"text {i}")
        p.replica.apply_remote(f"doc{i}", a.replica.doc(f"doc{i}").get_update(), RemoteOrigin("a"))
    s = SyncSession(a.replica, peer="p", now=0.0)
    s.receive(Hello(PROTOCOL_VERSION, {}), 0.0)
    assert s.receive(Summary(*p.replica.fingerprint()), 0.0) == []
    assert s.synced_docs == frozenset(f"doc{i}" for i in range(50))


def _frames(msgs: list[Message]) -> Iterator[bytes]:
    for m in msgs:
        yield codec.encode(m)


def test_batch_is_processed_in_order() -> None:
    a, b = Party("A"), Party("B")
    a.text("d").insert(0, "x")
    s = SyncSession(b.replica, peer="A", now=0.0)
    src = SyncSession(a.replica, peer="B", now=0.0)
    batch = Batch((*src.start(), Update("d", a.replica.doc("d").get_update()), Ping(3)))
    (data,) = _frames([batch])
    out = s.receive(codec.decode(data), 0.0)
    assert Pong(3) in out
    assert str(b.text("d")) == "x"


def test_quiet_link_acknowledges_live_updates_within_the_ack_delay() -> None:
    """After a burst of live updates, both sides report the doc synced about one ack_delay
    after the link went quiet, long before the next anti-entropy round."""
    from unity_crdt.sync import codec as _codec

    got: dict[str, list[tuple[str, bytes]]] = {"a": [], "b": []}
    ra = Replica(lambda d, u, o: got["a"].append((d, u)))
    rb = Replica(lambda d, u, o: got["b"].append((d, u)))
    sa = SyncSession(ra, peer="b", now=0.0, anti_entropy_interval=1000.0, ack_delay=0.5)
    sb = SyncSession(rb, peer="a", now=0.0, anti_entropy_interval=1000.0, ack_delay=0.5)

    def pump(out: list[Outgoing], to: SyncSession, back: SyncSession, now: float) -> None:
        while out:  # `back` sent `out`; it computes the replies it owes as it sends them
            replies: list[Outgoing] = []
            for item in out:
                for m in back.reply(item) if isinstance(item, Reply) else [item]:
                    replies += to.receive(_codec.decode(_codec.encode(m)), now)
            out, to, back = replies, back, to

    pump(sa.start(), sb, sa, 0.0)
    pump(sb.start(), sa, sb, 0.0)
    ra.doc("d").get("t", type=Text).insert(0, "live edit")
    ((doc, update),) = got["a"]
    pump(sa.local_update(doc, update), sb, sa, 0.1)
    assert str(rb.doc("d").get("t", type=Text)) == "live edit"
    assert not sa.is_synced("d")
    now = 0.1
    while now < 3.0 and not (sa.is_synced("d") and sb.is_synced("d")):
        now += 0.25
        pump(sa.tick(now), sb, sa, now)
        pump(sb.tick(now), sa, sb, now)
    assert sa.is_synced("d") and sb.is_synced("d")
    assert now <= 1.5
    # Quiet and acknowledged: no further SUMMARY until anti-entropy.
    summaries = sa.stats.summaries_sent + sb.stats.summaries_sent
    for _ in range(8):
        now += 0.25
        pump(sa.tick(now), sb, sa, now)
        pump(sb.tick(now), sa, sb, now)
    assert sa.stats.summaries_sent + sb.stats.summaries_sent == summaries


def test_a_part_stream_is_taken_whole_or_dropped_whole() -> None:
    """Parts carry no offset: a stream that began before we pulled (a late answer, a round
    abandoned mid-stream) is dropped to its final part, never spliced into the next one."""
    big = Party("big")
    body = big.text("big")
    body.insert(0, "lorem ipsum ✓ " * 100_000)  # about 1.5 MB: three or four parts
    sender = SyncSession(big.replica, peer="r", now=0.0)
    old = sender.reply(Reply("big", b"\x00"))
    body.insert(0, "more ")
    new = sender.reply(Reply("big", b"\x00"))
    assert len(old) >= 3 and all(isinstance(m, Part) for m in old + new)

    fresh = Party("fresh")
    s = SyncSession(fresh.replica, peer="big", now=0.0)
    s.receive(Hello(PROTOCOL_VERSION, {}), 0.0)
    # The old answer starts streaming before we pull; we pull in the middle of it.
    assert s.receive(old[0], 0.0) == []
    pull = s.receive(Advert("big", big.replica.digest("big")), 0.0)
    assert [type(m) for m in pull] == [SyncStep1]
    for msg in old[1:] + new:
        s.receive(msg, 0.0)  # before the fix: the old tail + the new stream, spliced
    assert fresh.content("big") == big.content("big")
    assert not s.busy

    # A round abandoned mid-stream: the rest of that stream is dropped, the next one taken.
    body.insert(0, "again ")
    s.receive(Advert("big", big.replica.digest("big")), 1.0)
    again = sender.reply(Reply("big", b"\x00"))
    s.receive(again[0], 1.0)
    later = 1.0 + s.anti_entropy_interval
    s.receive(Ping(1), later)
    s.tick(later)
    assert not s.busy
    s.receive(Advert("big", big.replica.digest("big")), 100.0)
    latest = sender.reply(Reply("big", b"\x00"))
    for msg in again[1:] + latest:
        s.receive(msg, 100.0)
    assert fresh.content("big") == big.content("big")


def test_a_slow_stream_that_keeps_moving_is_not_abandoned() -> None:
    big = Party("big")
    big.text("big").insert(0, "x" * 2_000_000)
    parts = SyncSession(big.replica, peer="r", now=0.0).reply(Reply("big", b"\x00"))
    assert len(parts) >= 4
    fresh = Party("fresh")
    s = SyncSession(fresh.replica, peer="big", now=0.0)
    s.receive(Hello(PROTOCOL_VERSION, {}), 0.0)
    s.receive(Advert("big", big.replica.digest("big")), 0.0)
    step = s.anti_entropy_interval * 0.6  # the whole transfer takes over twice the interval
    for i, part in enumerate(parts, 1):
        s.receive(part, i * step)
        s.tick(i * step)
    assert s.stats.rounds_abandoned == 0
    assert fresh.content("big") == big.content("big")
