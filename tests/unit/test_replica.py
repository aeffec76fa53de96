"""Replica: capture of committed changes with their origin, loading, remote applies, digests."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from pycrdt import Array, Doc, Map, Text, UndoManager, merge_updates
from ydocs import string_item

from unity_crdt.errors import ConfigError, ErrorCode, ProtocolError, StoreError
from unity_crdt.sync.replica import RemoteOrigin, Replica

Report = tuple[str, bytes, object | None]


class Recorder:
    """An on_update callback that only queues, as the node does."""

    def __init__(self) -> None:
        self.reports: list[Report] = []

    def __call__(self, name: str, update: bytes, origin: object | None) -> None:
        self.reports.append((name, update, origin))

    def take(self) -> list[Report]:
        out, self.reports = self.reports, []
        return out


def make() -> tuple[Replica, Recorder]:
    rec = Recorder()
    return Replica(rec), rec


def text_of(replica: Replica, name: str) -> str:
    return str(replica.doc(name).get("t", type=Text))


def test_local_edit_is_reported_once_with_origin_none() -> None:
    replica, rec = make()
    text = replica.doc("notes").get("t", type=Text)
    text += "hello"
    reports = rec.take()
    assert len(reports) == 1
    name, update, origin = reports[0]
    assert (name, origin) == ("notes", None)
    assert type(update) is bytes
    copy: Doc[Any] = Doc()
    copy.apply_update(update)
    assert str(copy.get("t", type=Text)) == "hello"


def test_app_origin_is_reported_as_is() -> None:
    replica, rec = make()
    doc = replica.doc("d")
    text = doc.get("t", type=Text)
    with doc.transaction(origin="typing"):
        text += "x"
    assert [origin for _, _, origin in rec.take()] == ["typing"]


def test_remote_apply_reports_remote_origin_and_reapply_reports_nothing() -> None:
    source, src_rec = make()
    source.doc("d").get("m", type=Map)["k"] = "v"
    ((_, update, _),) = src_rec.take()

    replica, rec = make()
    replica.apply_remote("d", update, RemoteOrigin("peer-1"))
    assert rec.take() == [("d", update, RemoteOrigin("peer-1"))]
    replica.apply_remote("d", update, RemoteOrigin("peer-2"))
    assert rec.take() == []  # nothing new: this is what ends gossip
    assert replica.doc("d").get("m", type=Map).to_py() == {"k": "v"}


def test_load_replays_without_reporting_then_edits_report() -> None:
    source, src_rec = make()
    text = source.doc("d").get("t", type=Text)
    text += "héllo"
    text += " wörld"
    stored = [u for _, u, _ in src_rec.take()]

    replica, rec = make()
    replica.load("d", stored)
    assert rec.take() == []
    assert text_of(replica, "d") == "héllo wörld"
    loaded = replica.doc("d").get("t", type=Text)
    loaded += "!"
    assert len(rec.take()) == 1


def test_load_of_garbage_raises_store_error() -> None:
    replica, rec = make()
    with pytest.raises(StoreError, match="#0"):
        replica.load("d", [b"\x05\x01garbage"])
    assert rec.take() == []


@pytest.mark.parametrize("bad", [b"", b"\x01", b"\x01\x02garbage-garbage"])
def test_bad_remote_update_raises_bad_update_and_leaves_replica_unchanged(bad: bytes) -> None:
    replica, rec = make()
    text = replica.doc("kept").get("t", type=Text)
    text += "abc"
    rec.take()
    before = replica.doc("kept").get_update()
    for name in ("kept", "new-doc"):
        with pytest.raises(ProtocolError) as info:
            replica.apply_remote(name, bad, RemoteOrigin("p"))
        assert info.value.code == ErrorCode.BAD_UPDATE
    assert "new-doc" not in replica
    assert replica.names() == ["kept"]
    assert replica.doc("kept").get_update() == before
    assert rec.take() == []


def test_f3_an_item_under_a_non_type_parent_is_a_bad_update_and_the_doc_lives_on() -> None:
    # The parent (1, 0) is a string item applied earlier: no guard sees both, pycrdt raises
    # RuntimeError after committing the rest of the update.
    replica, rec = make()
    replica.apply_remote("d", string_item(1, "abc", "t"), RemoteOrigin("p"))
    rec.take()
    good = string_item(3, "G", "t")
    poison = merge_updates(good, string_item(2, "x", (1, 0)))
    with pytest.raises(ProtocolError) as info:
        replica.apply_remote("d", poison, RemoteOrigin("p"))
    assert info.value.code == ErrorCode.BAD_UPDATE
    # What pycrdt committed was reported (so it is cached and gossiped), and the doc goes on.
    assert [(n, o) for n, _, o in rec.take()] == [("d", RemoteOrigin("p"))]
    assert sorted(text_of(replica, "d")) == sorted("Gabc")
    replica.apply_remote("d", string_item(1, "d", "t", clock=3), RemoteOrigin("p"))
    assert "d" in text_of(replica, "d")
    # Sent before its parent, the item waits; the parent's (valid) update then raises, is
    # applied all the same, and the waiting item is gone for good.
    replica.apply_remote("early", string_item(2, "x", (1, 0)), RemoteOrigin("p"))
    with pytest.raises(ProtocolError):
        replica.apply_remote("early", string_item(1, "abc", "t"), RemoteOrigin("p"))
    assert text_of(replica, "early") == "abc"
    replica.apply_remote("early", string_item(1, "d", "t", clock=3), RemoteOrigin("p"))
    assert sorted(text_of(replica, "early")) == sorted("abcd")
    # The cache path: a poisoned cached update is a StoreError, never a RuntimeError.
    with pytest.raises(StoreError, match="#1"):
        replica.load("cached", [string_item(1, "abc", "t"), string_item(2, "x", (1, 0))])


def test_remote_apply_with_invalid_doc_name_is_a_protocol_error() -> None:
    replica, _ = make()
    with pytest.raises(ProtocolError):
        replica.apply_remote("bad\x00name", b"\x00\x00", RemoteOrigin("p"))
    assert len(replica) == 0


def test_undo_manager_never_undoes_remote_edits() -> None:
    other, other_rec = make()
    replica, _ = make()
    text = replica.doc("d").get("t", type=Text)
    undo = UndoManager(scopes=[text], capture_timeout_millis=0)
    text += "mine "
    # The remote edit builds on ours, so the peer needs our state first.
    other.apply_remote("d", replica.doc("d").get_update(), RemoteOrigin("a"))
    other_rec.take()
    other_text = other.doc("d").get("t", type=Text)
    other_text += "theirs"
    ((_, remote_update, _),) = other_rec.take()
    replica.apply_remote("d", remote_update, RemoteOrigin("b"))
    assert str(text) == "mine theirs"
    assert undo.undo()
    assert str(text) == "theirs"


def test_a_failing_callback_never_breaks_the_edit(caplog: pytest.LogCaptureFixture) -> None:
    def boom(name: str, update: bytes, origin: object | None) -> None:
        raise RuntimeError("callback bug")

    replica = Replica(boom)
    text = replica.doc("d").get("t", type=Text)
    text += "still here"  # would raise an ExceptionGroup if the observer let it escape
    assert str(text) == "still here"
    assert "update observer" in caplog.text


def test_names_contains_and_invalid_names() -> None:
    replica, _ = make()
    replica.doc("b")
    replica.doc("ä/ドキュメント")
    assert replica.names() == ["b", "ä/ドキュメント"]
    assert "b" in replica and "c" not in replica
    with pytest.raises(ConfigError):
        replica.doc("")
    with pytest.raises(ConfigError):
        replica.doc("x" * 256)


def test_client_id_factory_gives_each_doc_its_own_id() -> None:
    ids = itertools.count(1000)
    replica = Replica(Recorder(), client_id_factory=lambda: next(ids))
    assert replica.doc("a").client_id == 1000
    assert replica.doc("b").client_id == 1001
    assert replica.doc("a").client_id == 1000


def test_digest_covers_deletions_and_is_equal_for_equal_state() -> None:
    a, a_rec = make()
    b, _ = make()
    text = a.doc("d").get("t", type=Text)
    text += "hello"
    b.apply_remote("d", a.doc("d").get_update(), RemoteOrigin("a"))
    assert a.digest("d") == b.digest("d")
    assert len(a.digest("d")) == 16
    before_sv, before = a.state_vector("d"), a.digest("d")
    del text[0:2]
    assert a.state_vector("d") == before_sv  # deleting never moves the state vector ...
    assert a.digest("d") != before  # ... so the digest must cover the delete set
    a_rec.take()
    b.apply_remote("d", a.diff("d", b.state_vector("d")), RemoteOrigin("a"))
    assert a.digest("d") == b.digest("d")
    assert text_of(b, "d") == "llo"


def test_digest_cache_follows_every_kind_of_change() -> None:
    replica, _ = make()
    doc = replica.doc("d")
    seen = {replica.digest("d")}
    doc.get("m", type=Map)["k"] = "v"
    seen.add(replica.digest("d"))
    doc.get("a", type=Array).append(1)
    seen.add(replica.digest("d"))
    del doc.get("m", type=Map)["k"]
    seen.add(replica.digest("d"))
    assert len(seen) == 4


def test_diff_missing_doc_and_bad_state_vector() -> None:
    replica, _ = make()
    assert replica.diff("absent", b"\x00") == b"\x00\x00"
    assert "absent" not in replica
    assert replica.state_vector("absent") == b"\x00"
    text = replica.doc("d").get("t", type=Text)
    text += "x"
    with pytest.raises(ProtocolError):
        replica.diff("d", b"")
    with pytest.raises(ProtocolError):
        replica.diff("d", b"\x05\x01")


def test_inventory_lists_only_docs_with_content() -> None:
    replica, _ = make()
    replica.doc("empty")
    text = replica.doc("full").get("t", type=Text)
    text += "ü"
    assert list(replica.inventory()) == ["full"]
    assert replica.inventory()["full"] == replica.digest("full")
    assert replica.is_empty("empty") and not replica.is_empty("full")
