"""The relay rule (`sync.router.Router`): what the node, the harness and the property test run."""

from __future__ import annotations

from pycrdt import Doc, Text

from unity_crdt.sync.codec import Awareness, Update
from unity_crdt.sync.replica import RemoteOrigin, Replica
from unity_crdt.sync.router import Routed, Router, source_of
from unity_crdt.sync.session import SyncSession


def _updates(n: int) -> list[bytes]:
    doc: Doc = Doc()
    text = doc.get("t", type=Text)
    out: list[bytes] = []
    doc.observe(lambda e: out.append(bytes(e.update)))
    for i in range(n):
        text += f"{i},"
    return out


def test_source_of_names_the_peer_only_for_remote_origins() -> None:
    assert source_of(RemoteOrigin("p1")) == "p1"
    assert source_of(None) is None
    assert source_of("app origin") is None


def test_updates_coalesce_per_doc_and_source_until_drained() -> None:
    router = Router()
    ups = _updates(5)
    assert router.add("d", ups[0], None) is True  # first: the caller schedules a drain
    assert router.add("d", ups[1], None) is False
    router.add("d", ups[2], RemoteOrigin("p"))
    router.add("e", ups[3], None)
    router.add("d", ups[4], None)
    assert router.pending
    routed = router.drain()
    assert not router.pending and router.drain() == []
    assert [(r.doc, r.source) for r in routed] == [("d", None), ("d", "p"), ("e", None)]
    merged = Doc()
    merged.apply_update(routed[0].update)  # ups 0, 1 and 4: 4 waits on 2 and 3 (pending)
    merged.apply_update(routed[1].update)
    merged.apply_update(ups[3])
    assert str(merged.get("t", type=Text)) == "0,1,2,3,4,"


def test_fan_out_skips_the_source_and_denied_docs() -> None:
    replica = Replica(lambda *_: None)
    sessions = {
        peer: SyncSession(replica, peer=peer, now=0.0, allow=lambda d, p=peer: p != "c")
        for peer in ("a", "b", "c")
    }
    update = _updates(1)[0]
    out = Router.fan_out(Routed("doc", update, "a"), sessions)
    assert out == {"b": [Update("doc", update)]}  # not back to a; c may not see the doc
    local = Router.fan_out(Routed("doc", update, None), sessions)
    assert set(local) == {"a", "b"}


def test_presence_fans_out_to_everyone_but_its_source() -> None:
    out = Router.fan_out_presence("doc", b"\x00", "b", ["a", "b", "c"])
    assert out == {"a": [Awareness("doc", b"\x00")], "c": [Awareness("doc", b"\x00")]}
    assert set(Router.fan_out_presence("doc", b"\x00", None, ["a", "b"])) == {"a", "b"}
