"""The Yjs readers against real pycrdt: the guard, state vectors, delete sets, doc digests."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pycrdt import Doc, Map, Text, merge_updates
from ydocs import edit_session, string_item, uv, vs

from unity_crdt.errors import ConfigError, DecodeError, ErrorCode
from unity_crdt.sync.lib0 import put_varuint
from unity_crdt.sync.yjs import (
    DIGEST_SIZE,
    check_state_vector,
    check_update,
    doc_digest,
    is_empty_update,
    read_delete_set,
    read_state_vector,
)

TRACE = Path(__file__).resolve().parents[1] / "data" / "automerge-paper.json.gz"
_POOL = edit_session(7, steps=30)[1] + [b"\x00\x00"]


@pytest.fixture(scope="module")
def session() -> tuple[Doc, list[bytes]]:
    return edit_session(1)


def digest_of(doc: Doc) -> bytes:
    return doc_digest(doc.get_state(), doc.get_update(doc.get_state()))


def test_put_varuint_writes_minimal_lib0_varuints() -> None:
    for value in (0, 1, 127, 128, 300, 2**32, 2**64 - 1):
        out = bytearray(b"x")
        put_varuint(out, value)
        assert bytes(out) == b"x" + uv(value)
    for bad in (-1, 2**64):
        with pytest.raises(ConfigError):
            put_varuint(bytearray(), bad)


# ---------------------------------------------------------------- hypothesis


@given(st.sampled_from(_POOL), st.data())
def test_hypothesis_mutated_updates_never_break_the_guard(
    update: bytes, data: st.DataObject
) -> None:
    raw = bytearray(update)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        check_update(bytes(raw))
    except DecodeError:
        return
    # Accepted by the guard: pycrdt may still refuse it, with ValueError or (for structurally
    # valid nonsense, about 1 in 200,000 mutations) RuntimeError, never a Rust panic or crash.
    with contextlib.suppress(ValueError, RuntimeError):
        Doc().apply_update(bytes(raw))


# ---------------------------------------------------------------- Yjs guard: nothing valid rejected


def test_guard_accepts_the_automerge_trace_updates() -> None:
    trace = json.loads(gzip.decompress(TRACE.read_bytes()))
    doc = Doc()
    text = doc.get("t", type=Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    for txn in trace["txns"][:20_000]:
        for pos, deleted, inserted in txn["patches"]:
            with doc.transaction():
                if deleted:
                    del text[pos : pos + deleted]
                if inserted:
                    text.insert(pos, inserted)
    assert len(updates) == 20_000
    for update in updates:
        check_update(update)
    check_update(doc.get_update())
    check_update(merge_updates(*updates[:256]))
    check_state_vector(doc.get_state())


@pytest.mark.parametrize("seed", range(6))
def test_guard_accepts_every_kind_of_pycrdt_update(seed: int) -> None:
    doc, updates = edit_session(seed)
    replica = Doc()
    for update in updates:
        check_update(update)
        replica.apply_update(update)
    full = doc.get_update()
    check_update(full)
    check_state_vector(doc.get_state())
    # Diffs against partial states, merges with gaps (Skip structs) and delete-set-only updates.
    partial = Doc()
    for update in updates[: len(updates) // 2]:
        partial.apply_update(update)
    check_update(doc.get_update(partial.get_state()))
    check_update(merge_updates(*updates[::2]))
    check_update(doc.get_update(doc.get_state()))
    check_state_vector(partial.get_state())
    assert replica.get_state() == doc.get_state()


def test_guard_rejects_every_strict_prefix_of_a_valid_update(
    session: tuple[Doc, list[bytes]],
) -> None:
    doc, _ = session
    full = doc.get_update()
    for cut in range(len(full)):
        with pytest.raises(DecodeError):
            check_update(full[:cut])
    with pytest.raises(DecodeError):
        check_update(full + b"\x00")


def test_read_state_vector_matches_pycrdt(session: tuple[Doc, list[bytes]]) -> None:
    doc, _ = session
    sv = read_state_vector(doc.get_state())
    assert set(sv) == {doc.client_id}
    assert read_state_vector(b"\x00") == {}
    assert read_state_vector(b"\x02" + uv(5) + uv(9) + uv(300) + uv(1)) == {5: 9, 300: 1}
    with pytest.raises(DecodeError, match="duplicate"):
        read_state_vector(b"\x02\x05\x01\x05\x02")


# ---------------------------------------------------------------- Yjs guard: bombs rejected


def _item(content: bytes, ref: int) -> bytes:
    """An update with one item of `ref` under the root type "a", then an empty delete set."""
    return uv(1) + uv(1) + uv(7) + uv(0) + bytes([ref]) + b"\x01" + vs("a") + content + b"\x00"


UPDATE_BOMBS = {
    "client count": uv(2**28) + b"\x00\x00\x00",
    "client count u32 max": uv(2**32 - 1) + b"\x00\x00\x00",
    "struct count": uv(1) + uv(2**28) + uv(1) + uv(0) + b"\x00" * 4,
    "delete-set clients": b"\x00" + uv(2**28) + b"\x00\x00",
    "delete-set ranges": b"\x00" + uv(1) + uv(1) + uv(2**28) + b"\x00\x00",
    "nested Any map": _item(uv(1) + b"\x76" + uv(2**27) + vs("k") + b"\x7e", 8),
    "Any array length": _item(uv(1) + b"\x75" + uv(2**30) + b"\x7e", 8),
    "Any content count": _item(uv(2**30) + b"\x7e", 8),
    "deep Any nesting": _item(uv(1) + b"\x75\x01" * 200_000 + b"\x7e", 8),
    "JSON count": _item(uv(2**30) + vs("1"), 2),
    "string length": _item(uv(2**30) + b"ab", 4),
    "invalid UTF-8": _item(vs("x")[:1] + b"\xff", 4),
    "unknown Any tag": _item(uv(1) + b"\x10", 8),
    "unknown struct": uv(1) + uv(1) + uv(7) + uv(0) + b"\x0b\x00\x00",
    "weak link type": _item(b"\x07", 7),
    "varuint too long": b"\xff" * 11 + b"\x00",
    "empty": b"",
}
SV_BOMBS = {
    "count": uv(2**28) + b"\x00\x00",
    "u32 max": uv(2**32 - 1) + b"\x00\x00",
    "odd tail": b"\x01\x05",
    "trailing": b"\x00\x00",
    "empty": b"",
}


def test_guard_rejects_known_bombs() -> None:
    for name, update in UPDATE_BOMBS.items():
        with pytest.raises(DecodeError) as info:
            check_update(update)
        assert info.value.code == ErrorCode.BAD_UPDATE, name
    for name, sv in SV_BOMBS.items():
        with pytest.raises(DecodeError):
            check_state_vector(sv)
        with pytest.raises(DecodeError):
            read_state_vector(sv)
        assert name


def test_guard_accepts_nesting_up_to_its_limit() -> None:
    ok = _item(uv(1) + b"\x75\x01" * 128 + b"\x7e", 8)
    check_update(ok)
    Doc().apply_update(ok)
    with pytest.raises(DecodeError, match="nested"):
        check_update(_item(uv(1) + b"\x75\x01" * 129 + b"\x7e", 8))


def test_f3_guard_rejects_an_item_whose_parent_is_not_a_shared_type() -> None:
    # yrs applies the rest of such an update, then raises RuntimeError (InvalidParent).
    base = string_item(1, "abc", "t")
    for clock in (0, 1, 2):  # any clock inside the string item is that item
        poison = merge_updates(base, string_item(2, "x", (1, clock)))
        with pytest.raises(DecodeError, match="not a shared type") as info:
            check_update(poison)
        assert info.value.code == ErrorCode.BAD_UPDATE
        with pytest.raises(RuntimeError, match="must be deleted or shared ref type"):
            Doc().apply_update(poison)
    # Non-ASCII strings span UTF-16 units: the item after "é😀" starts at clock 3.
    wide = merge_updates(string_item(1, "é😀", "t"), string_item(1, "z", "t", clock=3))
    check_update(merge_updates(wide, string_item(2, "x", (3, 0))))
    with pytest.raises(DecodeError, match="not a shared type"):
        check_update(merge_updates(wide, string_item(2, "x", (1, 3))))
    # Children of a nested type, and ids this update does not hold, pass (the replica
    # catches what yrs raises for the latter).
    doc = Doc()
    doc.get("m", type=Map)["inner"] = Map({"k": "v"})
    check_update(doc.get_update())
    Doc().apply_update(doc.get_update())
    check_update(string_item(2, "x", (1, 0)))
    # An item under a deleted item is dropped by yrs, not refused: the guard lets it through.
    gone = Doc(client_id=1)
    gone.get("t", type=Text).insert(0, "abc")
    del gone.get("t", type=Text)[0:3]
    under_deleted = merge_updates(gone.get_update(), string_item(2, "x", (1, 1)))
    check_update(under_deleted)
    Doc().apply_update(under_deleted)


RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import psutil
    from pycrdt import Doc
    from unity_crdt.sync.yjs import check_state_vector, check_update
    from unity_crdt.errors import DecodeError
    sys.path.insert(0, sys.argv[2])
    from test_yjs import SV_BOMBS, UPDATE_BOMBS

    guarded = sys.argv[1] == "guarded"
    proc = psutil.Process()
    doc = Doc()
    doc.apply_update(b"\\x00\\x00")
    doc.get_update(b"\\x00")
    rss0 = proc.memory_info().rss
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    passed, refused = [], []
    cases = [("u", n, b) for n, b in UPDATE_BOMBS.items() if n != "deep Any nesting"]
    cases += [("s", n, b) for n, b in SV_BOMBS.items()]
    if sys.argv[3] == "deep":
        cases = [("u", "deep", UPDATE_BOMBS["deep Any nesting"])]
    for kind, name, blob in cases:
        try:
            if guarded:
                (check_update if kind == "u" else check_state_vector)(blob)
                passed.append(name)
            doc.apply_update(blob) if kind == "u" else doc.get_update(blob)
        except (DecodeError, ValueError) as exc:
            if "failed to allocate" in str(exc):
                refused.append(name)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss": proc.memory_info().rss - rss0, "peak": peak - peak0,
                      "passed": passed, "refused": refused}))
    """
)


def _run_rss(tmp_path: Path, mode: str, which: str = "all") -> subprocess.CompletedProcess[str]:
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), mode, str(Path(__file__).parent), which],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_no_core_dumps,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )


def _no_core_dumps() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def test_guarded_pipeline_keeps_rss_bounded_and_unguarded_does_not(tmp_path: Path) -> None:
    mb = 2**20
    guarded = _run_rss(tmp_path, "guarded")
    assert guarded.returncode == 0, guarded.stderr
    report = json.loads(guarded.stdout)
    assert report["passed"] == []
    assert report["peak"] < 50 * mb and report["rss"] < 50 * mb, report
    deep = _run_rss(tmp_path, "guarded", "deep")
    assert deep.returncode == 0, deep.stderr
    assert json.loads(deep.stdout)["peak"] < 50 * mb
    # Controls: the same bombs without the guard commit far more (198-512 MB seen here: how
    # much of the reservation gets touched varies with machine load), or kill the process.
    unguarded = _run_rss(tmp_path, "unguarded")
    assert unguarded.returncode == 0, unguarded.stderr
    # The control shows the bombs are real: pycrdt reserves hundreds of MB for them, or, when
    # the machine is short of memory, asks for so much that the kernel refuses it outright.
    control = json.loads(unguarded.stdout)
    assert control["peak"] > 150 * mb or len(control["refused"]) >= 3, control
    crashed = _run_rss(tmp_path, "unguarded", "deep")
    assert crashed.returncode < 0  # killed by SIGSEGV: pycrdt recursed off the stack


# ---------------------------------------------------------------- digests


def test_same_content_by_different_histories_gives_equal_digests() -> None:
    source, updates = edit_session(3, steps=80)
    _, other_updates = edit_session(4, steps=40)  # a concurrent editor
    for update in other_updates:
        source.apply_update(update)
    histories: list[list[bytes]] = [
        updates + other_updates,
        [merge_updates(*other_updates), merge_updates(*updates)],
        [source.get_update()],
    ]
    expected = digest_of(source)
    assert len(expected) == DIGEST_SIZE
    for history in histories:
        replica = Doc()
        for update in history:
            replica.apply_update(update)
        # Compared parsed: the order in which yrs encodes state-vector clients is not canonical.
        assert read_state_vector(replica.get_state()) == read_state_vector(source.get_state())
        assert digest_of(replica) == expected
    # Out-of-order delivery can leave pycrdt with pending structs (how often depends on the
    # random client ids); the digest then differs (so anti-entropy notices) until a
    # SyncStep2-style diff fills the gap.
    interleaved = other_updates[1::2] + updates[1::2] + other_updates[0::2] + updates[0::2]
    shuffled = random.Random(0).sample(updates, len(updates)) + other_updates
    for history in (interleaved, shuffled):
        replica = Doc()
        for update in history:
            replica.apply_update(update)
        replica.apply_update(source.get_update(replica.get_state()))
        assert digest_of(replica) == expected


def test_deletes_and_inserts_change_the_digest() -> None:
    doc = Doc()
    text = doc.get("t", type=Text)
    text += "hello world"
    before = digest_of(doc)
    state = doc.get_state()
    del text[0:1]
    assert doc.get_state() == state  # a delete does not move the state vector...
    after_delete = digest_of(doc)
    assert after_delete != before  # ...but it moves the digest
    text += "!"
    assert digest_of(doc) not in (before, after_delete)


def test_digest_is_canonical_over_encoding_order() -> None:
    sv_a = b"\x02" + uv(9) + uv(4) + uv(3) + uv(7)
    sv_b = b"\x03" + uv(3) + uv(7) + uv(5) + uv(0) + uv(9) + uv(4)  # reordered, a zero clock
    ds_a = b"\x00\x02" + uv(9) + b"\x01" + uv(0) + uv(5) + uv(3) + b"\x01" + uv(2) + uv(2)
    # Same deletions, clients swapped, ranges split, overlapping, empty and out of order.
    ds_b = (
        b"\x00\x03"
        + uv(3)
        + b"\x02"
        + uv(3)
        + uv(1)
        + uv(2)
        + uv(1)
        + uv(9)
        + b"\x03"
        + uv(2)
        + uv(3)
        + uv(0)
        + uv(3)
        + uv(7)
        + uv(0)
        + uv(4)
        + b"\x00"
    )
    assert read_delete_set(ds_a) == read_delete_set(ds_b) == {3: [(2, 2)], 9: [(0, 5)]}
    assert doc_digest(sv_a, ds_a) == doc_digest(sv_b, ds_b)
    assert doc_digest(sv_a, ds_a) != doc_digest(sv_a, b"\x00\x00")
    assert doc_digest(b"\x00", b"\x00\x00") != doc_digest(b"\x01\x01\x01", b"\x00\x00")


def test_delete_set_reader_and_empty_update(session: tuple[Doc, list[bytes]]) -> None:
    doc, updates = session
    ds_update = doc.get_update(doc.get_state())
    deletes = read_delete_set(ds_update)
    assert set(deletes) == {doc.client_id}
    assert not is_empty_update(ds_update)
    with pytest.raises(DecodeError):
        read_delete_set(updates[0])  # has structs
    with pytest.raises(DecodeError):
        doc_digest(b"\x05", ds_update)
    fresh = Doc()
    fresh.get("t", type=Text).insert(0, "no deletions")
    assert is_empty_update(fresh.get_update(fresh.get_state()))
    assert not is_empty_update(fresh.get_update())
    assert read_delete_set(b"\x00\x00") == {}


@given(st.integers(1, 2**53 - 1), st.integers(1, 3000))
def test_digest_fast_path_is_the_canonical_form(client: int, length: int) -> None:
    """One client and no deletions skip the parsing: the digest must not change."""
    doc = Doc(client_id=client)
    doc.get("t", type=Text).insert(0, "x" * length)
    state = doc.get_state()
    canonical = bytearray()
    for value in (1, client, length, 0):  # one client, its clock, no delete set
        put_varuint(canonical, value)
    expected = hashlib.sha256(b"unity-crdt/v1/digest" + bytes(canonical)).digest()[:16]
    assert doc_digest(state, doc.get_update(state)) == expected
