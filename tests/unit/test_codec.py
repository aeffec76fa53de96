"""The wire codec: exact bytes, strict decoding, the Yjs guard against real pycrdt, digests."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pycrdt import (
    Array,
    Doc,
    Map,
    Text,
    XmlElement,
    XmlFragment,
    XmlText,
    create_sync_message,
    create_update_message,
    handle_sync_message,
    merge_updates,
)

from unity_crdt.codec import (
    DEFAULT_LIMITS,
    DIGEST_SIZE,
    PROTOCOL_VERSION,
    Awareness,
    Batch,
    Bye,
    Error,
    Hello,
    Limits,
    Message,
    MsgType,
    Ping,
    Pong,
    SyncStep1,
    SyncStep2,
    Update,
    check_state_vector,
    check_update,
    decode,
    doc_digest,
    encode,
    is_empty_update,
    read_delete_set,
    read_state_vector,
)
from unity_crdt.errors import (
    ConfigError,
    DecodeError,
    ErrorCode,
    LimitExceeded,
    ProtocolError,
)
from unity_crdt.ids import check_doc_id

TRACE = Path("/work/shared/data/automerge-paper.json.gz")


def uv(n: int) -> bytes:
    """Minimal unsigned LEB128, written independently of the codec."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def vs(s: str) -> bytes:
    raw = s.encode()
    return uv(len(raw)) + raw


# ---------------------------------------------------------------- real pycrdt material


def edit_session(seed: int, steps: int = 60) -> tuple[Doc, list[bytes]]:
    """Random edits of every content kind, with deletions; returns the doc and its updates."""
    rng = random.Random(seed)
    doc = Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    text, arr, mp = doc.get("t", type=Text), doc.get("a", type=Array), doc.get("m", type=Map)
    frag = doc.get("x", type=XmlFragment)
    values = [
        1,
        -7,
        2**40,
        1.5,
        "s",
        "ünï😀",
        True,
        False,
        None,
        b"\x00\xff",
        [1, [2]],
        {"k": {"n": 1}},
    ]
    rich = doc.get("r", type=Text)

    def offset(chars: int) -> int:
        # pycrdt Text indices count UTF-8 bytes; cut only on character boundaries.
        return len(str(text)[:chars].encode())

    for step in range(steps):
        op = rng.randrange(9)
        chars = len(str(text))
        with doc.transaction():
            if op == 0:
                where = offset(rng.randint(0, chars))
                text.insert(where, rng.choice(["ab", "é", "日本", "x😀y"]))
            elif op == 1 and chars > 2:
                start = rng.randrange(chars - 1)
                del text[offset(start) : offset(start + 1)]
            elif op == 2 and chars > 2:
                text.format(0, offset(1), {"bold": True})
            elif op == 3:
                rich.insert_embed(0, {"img": "a.png"})
                rich.insert(0, "ü", {"italic": True})
            elif op == 4:
                arr.append(rng.choice(values))
            elif op == 5 and len(arr):
                del arr[rng.randrange(len(arr))]
            elif op == 6:
                mp[f"k{step % 5}"] = rng.choice(values)
            elif op == 7 and len(mp):
                del mp[rng.choice(list(mp.keys()))]
            else:
                frag.children.append(XmlElement("p", {"class": "c"}, [XmlText("hi")]))
    with doc.transaction():
        mp["sub"] = Doc()
        arr.append(Map({"nested": "type"}))
        arr.append(Array(["nested", "array"]))
        mp["txt"] = Text("nested text")
    return doc, updates


@pytest.fixture(scope="module")
def session() -> tuple[Doc, list[bytes]]:
    return edit_session(1)


def digest_of(doc: Doc) -> bytes:
    return doc_digest(doc.get_state(), doc.get_update(doc.get_state()))


# ---------------------------------------------------------------- exact bytes (docs/protocol.md)

WORKED = [
    (Ping(300), "03ac02"),
    (Pong(1), "0401"),
    (Hello(1, {"a": bytes(range(16))}), "010101" + "0161" + bytes(range(16)).hex()),
    (Hello(1, {}), "010100"),
    (SyncStep1("notes", b"\x00"), "0205" + b"notes".hex() + "00000100"),
    (SyncStep2("notes", b"\x00\x00"), "0205" + b"notes".hex() + "0001020000"),
    (Update("notes", b"\x00\x00"), "0205" + b"notes".hex() + "0002020000"),
    (Awareness("notes", b"\x00"), "0205" + b"notes".hex() + "010100"),
    (Update("é", b"\x00\x00"), "0202c3a90002020000"),
    (Bye(ErrorCode.SHUTDOWN), "050900"),
    (Error(ErrorCode.TOO_LARGE, None, "big"), "060200" + "03" + b"big".hex()),
    (Error(ErrorCode.BAD_UPDATE, "n", ""), "060401016e00"),
    (Batch((Ping(1), Pong(1))), "0702020301020401"),
]


@pytest.mark.parametrize(("msg", "hexstr"), WORKED)
def test_worked_examples_have_exact_bytes(msg: Message, hexstr: str) -> None:
    assert encode(msg).hex() == hexstr
    assert decode(bytes.fromhex(hexstr)) == msg


def test_constants() -> None:
    assert PROTOCOL_VERSION == 1 and DIGEST_SIZE == 16
    assert Limits(64 * 2**20, 255, 100_000, 1024, 10_000) == DEFAULT_LIMITS
    assert [int(t) for t in MsgType] == [1, 2, 3, 4, 5, 6, 7]


def test_doc_messages_are_byte_compatible_with_y_protocols(
    session: tuple[Doc, list[bytes]],
) -> None:
    doc, updates = session
    prefix = b"\x02" + vs("notes")
    sync1 = create_sync_message(doc)
    assert encode(SyncStep1("notes", doc.get_state())) == prefix + sync1
    assert encode(Update("notes", updates[3])) == prefix + create_update_message(updates[3])
    # A y-protocols SyncStep2 reply from pycrdt decodes as our SyncStep2 and applies.
    fresh = Doc()
    reply = handle_sync_message(create_sync_message(fresh)[1:], doc)
    assert reply is not None
    msg = decode(prefix + reply)
    assert isinstance(msg, SyncStep2)
    fresh.apply_update(msg.update)
    assert fresh.get_state() == doc.get_state()


# ---------------------------------------------------------------- roundtrips and prefixes


def samples(session: tuple[Doc, list[bytes]]) -> list[Message]:
    doc, updates = session
    big = {f"doc-{i}-ñ": i.to_bytes(16, "big") for i in range(40)}
    return [
        Hello(PROTOCOL_VERSION, {}),
        Hello(2**64 - 1, big),
        Hello(1, {"café/日本 notes": b"\xff" * 16, "😀": b"\x00" * 16}),
        SyncStep1("a", b"\x00"),
        SyncStep1("é" * 127, doc.get_state()),
        SyncStep2("doc", doc.get_update()),
        SyncStep2("doc", b"\x00\x00"),
        Update("x", updates[0]),
        Update("x" * 255, updates[-1]),
        Awareness("x", b""),
        Awareness("日本", b"\x01\x02\x03"),
        Ping(0),
        Ping(2**64 - 1),
        Pong(127),
        Pong(128),
        Bye(ErrorCode.NORMAL),
        Bye(ErrorCode.SHUTDOWN, "going away ✓"),
        Error(ErrorCode.BAD_UPDATE, None, ""),
        Error(ErrorCode.MALFORMED, "日本語", "r" * 1024),
        Batch(()),
        Batch((Ping(1), Update("a", updates[1]), Error(ErrorCode.TIMEOUT, "a", "t"), Hello(1, {}))),
    ]


def test_every_sample_roundtrips(session: tuple[Doc, list[bytes]]) -> None:
    for msg in samples(session):
        assert decode(encode(msg)) == msg


def test_every_strict_prefix_is_rejected(session: tuple[Doc, list[bytes]]) -> None:
    for msg in samples(session):
        data = encode(msg)
        for cut in range(len(data)):
            with pytest.raises(DecodeError):
                decode(data[:cut])


def test_trailing_bytes_are_rejected(session: tuple[Doc, list[bytes]]) -> None:
    for msg in samples(session):
        with pytest.raises(DecodeError, match="trailing"):
            decode(encode(msg) + b"\x00")


def test_bytes_like_input_is_accepted() -> None:
    data = encode(Ping(5))
    assert decode(bytearray(data)) == decode(memoryview(data)) == Ping(5)


# ---------------------------------------------------------------- strictness


@pytest.mark.parametrize(
    ("hexstr", "error"),
    [
        ("", DecodeError),
        ("00", DecodeError),  # unknown tag
        ("08", DecodeError),
        ("ff", DecodeError),
        ("038000", DecodeError),  # non-minimal varuint (0 in two bytes)
        ("03ff00", DecodeError),  # non-minimal varuint (127 in two bytes)
        ("03" + "ff" * 10 + "01", DecodeError),  # 11-byte varuint
        ("03" + "ff" * 9 + "02", DecodeError),  # 2^64
        ("0202c328000200", DecodeError),  # invalid UTF-8 doc id
        ("0201" + "0a" + "000200", DecodeError),  # control character in doc id
        ("0200000200", DecodeError),  # empty doc id
        ("0201610300", DecodeError),  # unknown y-protocols type
        ("020161000300", DecodeError),  # unknown sync step
        ("060002016100", DecodeError),  # has_doc flag 2
        ("0701020700", DecodeError),  # nested batch
        ("07010100", DecodeError),  # inner message: unknown tag 0
        ("070100", DecodeError),  # inner message empty
        ("0701030301ff", DecodeError),  # inner message with a trailing byte
        ("0101020161" + "00" * 16 + "0161" + "11" * 16, DecodeError),  # duplicate doc id
        ("0101" + "ffffffffffffffff7f", LimitExceeded),  # inventory count 2^63-1
    ],
)
def test_malformed_messages_are_rejected(hexstr: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(bytes.fromhex(hexstr))


def test_max_varuint_is_accepted() -> None:
    assert decode(bytes.fromhex("03" + "ff" * 9 + "01")) == Ping(2**64 - 1)


def test_size_and_count_limits() -> None:
    tight = Limits(max_message=100, max_doc_id=4, max_inventory=2, max_reason=3, max_batch=2)
    inv3 = Hello(1, {"a": b"1" * 16, "b": b"2" * 16, "c": b"3" * 16})
    cases = [
        encode(Ping(1)),  # fits
        encode(Awareness("a", b"x" * 200)),
        encode(Update("abcde", b"\x00\x00")),
        encode(inv3),
        encode(Bye(ErrorCode.NORMAL, "four")),
        encode(Error(ErrorCode.NORMAL, None, "four")),
        encode(Batch((Ping(1), Ping(2), Ping(3)))),
    ]
    assert decode(cases[0], tight) == Ping(1)
    for data in cases[1:]:
        with pytest.raises(LimitExceeded) as info:
            decode(data, tight)
        assert info.value.code == ErrorCode.TOO_LARGE
    assert decode(encode(Bye(ErrorCode.NORMAL, "abc")), tight) == Bye(ErrorCode.NORMAL, "abc")
    with pytest.raises(LimitExceeded):
        decode(encode(Update("x" * 255, b"\x00\x00")), Limits(max_doc_id=10))


def test_counts_beyond_the_message_fail_fast_without_allocating() -> None:
    hostile = [
        "01" + "01" + "ffffffff0f",  # inventory 2^32-1 within limits of a lax config
        "07" + "ffffffff0f",  # batch count
    ]
    lax = Limits(max_inventory=2**40, max_batch=2**40)
    start = time.perf_counter()
    for hexstr in hostile:
        with pytest.raises(DecodeError, match="exceeds the message"):
            decode(bytes.fromhex(hexstr), lax)
    assert time.perf_counter() - start < 0.05


def test_unknown_error_codes_map_to_internal_and_versions_pass_through() -> None:
    assert decode(b"\x05" + uv(999) + b"\x00") == Bye(ErrorCode.INTERNAL, "")
    assert decode(b"\x06" + uv(77) + b"\x00\x00") == Error(ErrorCode.INTERNAL, None, "")
    assert decode(encode(Hello(7, {}))) == Hello(7, {})


def test_doc_payloads_are_guarded_at_decode_time() -> None:
    bombs = [
        (0, uv(2**28) + b"\x00\x00"),  # SyncStep1 with a state-vector bomb
        (1, uv(2**28) + b"\x00" * 3),  # SyncStep2 with an update bomb
        (2, b"\x01"),  # Update, truncated
    ]
    for step, payload in bombs:
        with pytest.raises(DecodeError) as info:
            decode(b"\x02\x01a\x00" + bytes([step]) + uv(len(payload)) + payload)
        assert info.value.code == ErrorCode.BAD_UPDATE


def test_encode_refuses_what_a_peer_could_not_decode() -> None:
    bad: list[Message] = [
        Update("", b"\x00\x00"),
        Update("a\nb", b"\x00\x00"),
        Update("x" * 256, b"\x00\x00"),
        Hello(1, {"a": b"short"}),
        Hello(-1, {}),
        Ping(2**64),
        Batch((Batch(()),)),
    ]
    for msg in bad:
        with pytest.raises(ConfigError):
            encode(msg)
    with pytest.raises(ConfigError):
        encode("not a message")  # type: ignore[arg-type]


def test_long_reasons_are_truncated_on_a_character_boundary() -> None:
    reason = "x" + "é" * 1000
    msg = decode(encode(Bye(ErrorCode.NORMAL, reason)))
    assert isinstance(msg, Bye)
    assert reason.startswith(msg.reason)
    assert len(msg.reason.encode()) == 1023  # the next "é" would not fit in 1024


# ---------------------------------------------------------------- hypothesis

texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
codes = st.sampled_from(list(ErrorCode))
_POOL = edit_session(7, steps=30)[1] + [b"\x00\x00"]
payloads = st.sampled_from(_POOL)


def _valid_doc_id(name: str) -> bool:
    try:
        check_doc_id(name)
    except ConfigError:
        return False
    return True


doc_ids = st.text(min_size=1, max_size=30).filter(_valid_doc_id)
simple_messages = st.one_of(
    st.builds(
        Hello,
        st.integers(0, 2**64 - 1),
        st.dictionaries(doc_ids, st.binary(min_size=16, max_size=16), max_size=5),
    ),
    st.builds(SyncStep1, doc_ids, st.sampled_from([Doc().get_state(), b"\x00"])),
    st.builds(SyncStep2, doc_ids, payloads),
    st.builds(Update, doc_ids, payloads),
    st.builds(Awareness, doc_ids, st.binary(max_size=50)),
    st.builds(Ping, st.integers(0, 2**64 - 1)),
    st.builds(Pong, st.integers(0, 2**64 - 1)),
    st.builds(Bye, codes, texts),
    st.builds(Error, codes, st.none() | doc_ids, texts),
)
messages = simple_messages | st.builds(Batch, st.lists(simple_messages, max_size=5).map(tuple))


@given(messages)
def test_hypothesis_valid_messages_roundtrip(msg: Message) -> None:
    data = encode(msg)
    assert decode(data) == msg
    assert encode(decode(data)) == data


@given(st.binary(max_size=400))
def test_hypothesis_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError as exc:
        assert isinstance(exc, DecodeError | LimitExceeded)


@given(st.sampled_from([t.value for t in MsgType]), st.binary(max_size=400))
def test_hypothesis_random_bodies_raise_only_protocol_errors(tag: int, body: bytes) -> None:
    try:
        decode(bytes([tag]) + body)
    except ProtocolError as exc:
        assert isinstance(exc, DecodeError | LimitExceeded)


@given(messages, st.data())
def test_hypothesis_mutated_messages_are_rejected_or_stable(
    msg: Message, data: st.DataObject
) -> None:
    raw = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        decoded = decode(bytes(raw))
    except ProtocolError:
        return
    # Whatever is accepted is well-formed: it encodes and decodes to itself.
    assert decode(encode(decoded)) == decoded


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


RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import psutil
    from pycrdt import Doc
    from unity_crdt.codec import check_state_vector, check_update
    from unity_crdt.errors import DecodeError
    sys.path.insert(0, sys.argv[2])
    from test_codec import SV_BOMBS, UPDATE_BOMBS

    guarded = sys.argv[1] == "guarded"
    proc = psutil.Process()
    doc = Doc()
    doc.apply_update(b"\\x00\\x00")
    doc.get_update(b"\\x00")
    rss0 = proc.memory_info().rss
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    passed = []
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
        except (DecodeError, ValueError):
            pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss": proc.memory_info().rss - rss0, "peak": peak - peak0,
                      "passed": passed}))
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
    # Controls: the same bombs without the guard commit hundreds of MB, or kill the process.
    unguarded = _run_rss(tmp_path, "unguarded")
    assert unguarded.returncode == 0, unguarded.stderr
    assert json.loads(unguarded.stdout)["peak"] > 200 * mb
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
        other_updates[1::2] + updates[1::2] + other_updates[0::2] + updates[0::2],
        [merge_updates(*other_updates), merge_updates(*updates)],
        [source.get_update()],
    ]
    expected = digest_of(source)
    assert len(expected) == DIGEST_SIZE
    for history in histories:
        replica = Doc()
        for update in history:
            replica.apply_update(update)
        assert replica.get_state() == source.get_state()
        assert digest_of(replica) == expected
    # Shuffled delivery can leave pycrdt with pending structs; the digest then differs (so
    # anti-entropy notices) until a SyncStep2-style diff fills the gap.
    shuffled = Doc()
    for update in random.Random(0).sample(updates, len(updates)) + other_updates:
        shuffled.apply_update(update)
    shuffled.apply_update(source.get_update(shuffled.get_state()))
    assert digest_of(shuffled) == expected


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
        + uv(3) + b"\x02" + uv(3) + uv(1) + uv(2) + uv(1)
        + uv(9) + b"\x03" + uv(2) + uv(3) + uv(0) + uv(3) + uv(7) + uv(0)
        + uv(4) + b"\x00"
    )  # fmt: skip
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
