"""The wire codec: exact bytes, strict decoding, doc payloads guarded at decode time."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pycrdt import (
    Doc,
    create_sync_message,
    create_update_message,
    handle_sync_message,
)
from ydocs import edit_session, uv, vs

from unity_crdt.errors import (
    ConfigError,
    DecodeError,
    ErrorCode,
    LimitExceeded,
    ProtocolError,
)
from unity_crdt.ids import check_doc_id
from unity_crdt.sync.codec import (
    PROTOCOL_VERSION,
    Awareness,
    Batch,
    Hello,
    Members,
    Message,
    MsgType,
    Part,
    Ping,
    Pong,
    SyncStep1,
    SyncStep2,
    Update,
    decode,
    encode,
)
from unity_crdt.sync.inventory import Advert, Inventory, InventoryRequest, Summary
from unity_crdt.sync.replica import Replica
from unity_crdt.sync.session import SyncSession
from unity_crdt.sync.wire import DEFAULT_LIMITS, Limits
from unity_crdt.sync.yjs import DIGEST_SIZE


@pytest.fixture(scope="module")
def session() -> tuple[Doc, list[bytes]]:
    return edit_session(1)


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
    (Batch((Ping(1), Pong(1))), "0702020301020401"),
    (Members((), want_all=True), "0f0100"),
    (Members((b"\xaa" * 130,)), "0f000182" + "01" + "aa" * 130),
    (Summary(b"\x78" * 16, 5), "08" + "78" * 16 + "05"),
    (InventoryRequest(None), "0900"),
    (InventoryRequest(3, ""), "09010300"),
    (Inventory(7, (("a", b"\x31" * 16),), more=True), "0a07" + "01" + "0161" + "31" * 16 + "01"),
    (Advert("d", b"\x33" * 16), "0b" + "01" + "0164" + "33" * 16),
    (Part("d", b"xyz", final=True), "0c" + "0164" + "01" + "0378797a"),
]


@pytest.mark.parametrize(("msg", "hexstr"), WORKED)
def test_worked_examples_have_exact_bytes(msg: Message, hexstr: str) -> None:
    assert encode(msg).hex() == hexstr
    assert decode(bytes.fromhex(hexstr)) == msg


def test_constants() -> None:
    assert PROTOCOL_VERSION == 2 and DIGEST_SIZE == 16
    assert Limits(64 * 2**20, 255, 100_000, 10_000) == DEFAULT_LIMITS
    assert [int(t) for t in MsgType] == [1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14, 15, 20]


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
        Batch(()),
        Batch((Ping(1), Update("a", updates[1]), Awareness("a", b"t"), Hello(1, {}))),
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
    tight = Limits(max_message=100, max_doc_id=4, max_inventory=2, max_batch=2)
    inv3 = Hello(1, {"a": b"1" * 16, "b": b"2" * 16, "c": b"3" * 16})
    cases = [
        encode(Ping(1)),  # fits
        encode(Awareness("a", b"x" * 200)),
        encode(Update("abcde", b"\x00\x00")),
        encode(inv3),
        encode(Batch((Ping(1), Ping(2), Ping(3)))),
    ]
    assert decode(cases[0], tight) == Ping(1)
    for data in cases[1:]:
        with pytest.raises(LimitExceeded) as info:
            decode(data, tight)
        assert info.value.code == ErrorCode.TOO_LARGE
    assert decode(encode(Update("abcd", b"\x00\x00")), tight) == Update("abcd", b"\x00\x00")
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


def test_retired_tags_are_unknown_and_versions_pass_through() -> None:
    # Tags 5 (BYE) and 6 (ERROR) were never sent: links end with a sealed CLOSE frame.
    for retired in (b"\x05" + uv(9) + b"\x00", b"\x06" + uv(2) + b"\x00\x00"):
        with pytest.raises(DecodeError, match="unknown message tag"):
            decode(retired)
    assert decode(encode(Hello(7, {}))) == Hello(7, {})


def test_doc_payload_bombs_are_refused_before_pycrdt_sees_them() -> None:
    """The codec frames Yjs payloads; the session guards them once, where they meet pycrdt."""
    bombs = [
        (0, uv(2**28) + b"\x00\x00"),  # SyncStep1 with a state-vector bomb
        (1, uv(2**28) + b"\x00" * 3),  # SyncStep2 with an update bomb
        (2, b"\x01"),  # Update, truncated
    ]
    replica = Replica(lambda *_: None)
    session = SyncSession(replica, peer="p", now=0.0)
    session.receive(Hello(PROTOCOL_VERSION, {}), 0.0)
    for step, payload in bombs:
        msg = decode(b"\x02\x01a\x00" + bytes([step]) + uv(len(payload)) + payload)
        with pytest.raises(ProtocolError) as info:
            session.receive(msg, 0.0)
        assert info.value.code == ErrorCode.BAD_UPDATE
    assert "a" not in replica


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


# ---------------------------------------------------------------- hypothesis

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
    st.builds(Members, st.lists(st.binary(min_size=130, max_size=300), max_size=3).map(tuple)),
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
