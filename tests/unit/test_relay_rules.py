"""The sans-IO parts of the cloud channel: sealed relay envelopes, the NOTICE message, the
session's notice hook, the relay destination of the Router rule, and relay_url validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unity_crdt.config import NodeConfig
from unity_crdt.crypto.envelope import ENVELOPE_OVERHEAD, Reassembler, RelaySealer
from unity_crdt.crypto.keys import DeviceIdentity, derive_group_keys
from unity_crdt.errors import ConfigError, DecodeError, ProtocolError, SecurityError
from unity_crdt.sync import codec
from unity_crdt.sync.codec import PROTOCOL_VERSION, Hello, MsgType, Notice
from unity_crdt.sync.replica import RemoteOrigin, Replica
from unity_crdt.sync.router import Routed, Router
from unity_crdt.sync.session import SyncSession

KEYS = derive_group_keys("unit test group secret")
OTHER = derive_group_keys("another group's secret")
DEV = DeviceIdentity.generate().device_id
SEALER = RelaySealer(KEYS, DEV)
NOTICE = Notice("notes", DEV, "0011223344556677", b"\x01\x05\x03", bytes(range(16)))


# -- envelopes ----------------------------------------------------------------------------------


def test_subjects_and_ids_are_keyed_and_name_nothing() -> None:
    s = SEALER
    assert s.updates_subject.startswith("ucrdt.") and s.group_tag in s.updates_subject
    assert len({s.updates_subject, s.notices_subject, s.sync_subject}) == 3
    assert s.stream == "UCRDT_" + s.group_tag.upper()
    other = RelaySealer(OTHER, DEV)
    assert other.group_tag != s.group_tag  # groups never share a stream
    frag = s.frag_id(b"inc", 1)
    assert s.frag_id(b"inc", 1) == frag != s.frag_id(b"inc", 2) != s.frag_id(b"other", 1)
    assert len(s.msg_id(frag, 0)) == 32 and s.msg_id(frag, 0) != s.msg_id(frag, 1)
    assert DEV not in s.msg_id(frag, 0) and DEV not in s.updates_subject


def test_seal_open_round_trip_and_the_sender_is_inside() -> None:
    body = codec.encode(codec.Update("notes", b"\x00\x00"))
    (part,) = SEALER.seal(SEALER.updates_subject, body, b"f" * 8, 1024)
    assert DEV.encode() not in part and b"notes" not in part
    opened = SEALER.open(SEALER.updates_subject, part)
    assert (opened.sender, opened.index, opened.count, opened.chunk) == (DEV, 0, 1, body)


@pytest.mark.parametrize("how", ["subject", "key", "flip", "truncate"])
def test_tampered_moved_or_foreign_parts_are_refused(how: str) -> None:
    (part,) = SEALER.seal(SEALER.updates_subject, b"body", b"f" * 8, 1024)
    subject, sealer = SEALER.updates_subject, SEALER
    if how == "subject":
        subject = SEALER.notices_subject  # replayed onto another subject
    elif how == "key":
        sealer = RelaySealer(OTHER, DEV)
    elif how == "flip":
        part = part[:20] + bytes([part[20] ^ 1]) + part[21:]
    else:
        part = part[:-1]
    with pytest.raises(SecurityError):
        sealer.open(subject, part)


@given(size=st.integers(0, 5000), limit=st.integers(ENVELOPE_OVERHEAD + 64, 900))
def test_big_bodies_split_under_the_limit_and_reassemble_in_any_order(
    size: int, limit: int
) -> None:
    body = bytes(i % 251 for i in range(size))
    parts = SEALER.seal("s", body, b"x" * 8, limit)
    assert all(len(p) <= limit for p in parts)
    joiner = Reassembler()
    opened = [SEALER.open("s", p) for p in reversed(parts)]
    results = [joiner.add(p) for p in opened]
    assert results[-1] == body and all(r is None for r in results[:-1])


def test_reassembly_is_bounded() -> None:
    joiner = Reassembler(max_bytes=1000)
    for n in range(20):  # twenty bodies that never complete
        parts = SEALER.seal("s", bytes(600), n.to_bytes(8, "big"), ENVELOPE_OVERHEAD + 300)
        assert joiner.add(SEALER.open("s", parts[0])) is None
    assert joiner.dropped > 0 and joiner._size <= 1000


def test_a_device_id_of_the_wrong_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        RelaySealer(KEYS, "short")


# -- the NOTICE message -------------------------------------------------------------------------


def test_notice_has_exact_bytes_and_round_trips() -> None:
    data = codec.encode(NOTICE)
    assert data[0] == MsgType.NOTICE == 14
    expected = (
        b"\x0e"
        + b"\x05notes"
        + bytes([26])
        + DEV.encode()
        + b"\x10"
        + b"0011223344556677"
        + b"\x03\x01\x05\x03"
        + bytes(range(16))
    )
    assert data == expected
    assert codec.decode(data) == NOTICE
    assert codec.decode(codec.encode(codec.Batch((NOTICE, codec.Ping(1))))) == codec.Batch(
        (NOTICE, codec.Ping(1))
    )


@pytest.mark.parametrize(
    "data",
    [
        b"\x08\x05notes",  # truncated
        b"\x08\x05notes\x00",  # empty device
        b"\x08\x05notes\x01\xff\x01g\x01\x00" + bytes(16),  # non-ASCII device
        b"\x08\x05notes\x01d\x01g\x05\x0a\x00\x00\x00\x00" + bytes(16),  # implausible sv
        codec.encode(NOTICE) + b"\x00",  # trailing byte
    ],
)
def test_malformed_notices_are_decode_errors(data: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.decode(data)


def test_notices_the_codec_could_not_send_back_are_refused() -> None:
    with pytest.raises(ConfigError):
        codec.encode(Notice("notes", DEV, "g", b"\x00", b"short"))
    with pytest.raises(ConfigError):
        codec.encode(Notice("notes", "", "g", b"\x00", bytes(16)))


def test_the_session_hands_notices_to_its_hook_after_hello_only() -> None:
    got: list[Notice] = []
    session = SyncSession(
        Replica(on_update=lambda *a: None), peer="p", now=0.0, on_notice=got.append
    )
    with pytest.raises(ProtocolError):
        session.receive(NOTICE, 0.0)  # before HELLO
    session.receive(Hello(PROTOCOL_VERSION, {}), 0.0)
    assert session.receive(NOTICE, 1.0) == [] and got == [NOTICE]
    hidden = SyncSession(
        Replica(on_update=lambda *a: None),
        peer="p",
        now=0.0,
        allow=lambda doc: doc != "notes",
        on_notice=got.append,
    )
    hidden.receive(Hello(PROTOCOL_VERSION, {}), 0.0)
    hidden.receive(NOTICE, 1.0)
    assert got == [NOTICE]  # a doc hidden from this peer: its notices are ignored too


# -- the relay destination and the config -------------------------------------------------------


def test_the_relay_gets_every_update_but_its_own() -> None:
    relay = "relay"
    assert Router.forwards(Routed("d", b"u", None), relay)
    assert Router.forwards(Routed("d", b"u", "DEVICEA"), relay)
    assert not Router.forwards(Routed("d", b"u", RemoteOrigin(relay).peer), relay)


def test_relay_url_forms() -> None:
    base = dict(name="n", cache_dir="/tmp/x", group_secret="secret secret")
    assert NodeConfig(**base).relay_url is None
    assert NodeConfig(**base, relay_url="nats://h:4222").relay_url == ("nats://h:4222",)
    three = "nats://a:4222, nats://b:4222,tls://c:4222"
    assert NodeConfig(**base, relay_url=three).relay_url == (
        "nats://a:4222",
        "nats://b:4222",
        "tls://c:4222",
    )
    assert NodeConfig.from_mapping({**base, "relay_url": ["nats://a:1"]}).relay_url == (
        "nats://a:1",
    )
    assert "relay_credentials" not in repr(NodeConfig(**base, relay_credentials="u:p"))
    for bad in ("http://h:4222", "nats://", "nats://h:99999", ""):
        with pytest.raises(ConfigError):
            NodeConfig(**base, relay_url=bad)
