"""The secure transport: Noise XXpsk0 handshake and sealed frames, attacked byte by byte."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from unity_crdt.crypto import frames, handshake, keys
from unity_crdt.crypto.frames import (
    FLAG_MORE,
    FRAME_DATA,
    FRAME_OVERHEAD,
    MAX_FRAME_PLAINTEXT,
    PeerHello,
    RekeyPolicy,
    SecureSession,
)
from unity_crdt.crypto.handshake import PRELUDE_LEN, PROLOGUE_LABEL, PROTOCOL_NAME, Handshake
from unity_crdt.crypto.keys import DeviceIdentity, GroupKeys, derive_group_keys
from unity_crdt.errors import ConfigError, ErrorCode, FrameError, HandshakeError, SecurityError

SECRET = "correct horse battery staple"
MiB = 2**20

KEYS = derive_group_keys(SECRET)
OTHER_KEYS = derive_group_keys("another group entirely")
ALICE, BOB, MALLORY = (
    DeviceIdentity.generate(),
    DeviceIdentity.generate(),
    DeviceIdentity.generate(),
)


def hello(ident: DeviceIdentity, name: str, version: int = 1) -> PeerHello:
    return PeerHello(name=name, device_id=ident.device_id, version=version, max_frame=MiB)


def pair(
    ikeys: GroupKeys = KEYS, rkeys: GroupKeys = KEYS, now: float = 0.0
) -> tuple[Handshake, Handshake]:
    i = Handshake(ikeys, ALICE, hello(ALICE, "alice"), initiator=True, now=now)
    r = Handshake(rkeys, BOB, hello(BOB, "bob"), initiator=False, now=now)
    return i, r


def messages() -> tuple[Handshake, Handshake, bytes, bytes, bytes]:
    i, r = pair()
    m1 = i.initiate()
    m2 = r.receive(m1, 0.1)
    assert m2 is not None
    m3 = i.receive(m2, 0.2)
    assert m3 is not None
    return i, r, m1, m2, m3


def sessions(**kw: object) -> tuple[SecureSession, SecureSession]:
    i, r, _, _, m3 = messages()
    assert r.receive(m3, 0.3) is None
    return i.session(**kw), r.session(**kw)  # type: ignore[arg-type]


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def assert_rejected(s: SecureSession, frame: bytes, code: ErrorCode | None = None) -> None:
    """The frame raises FrameError, no counter moves, and the session stays failed."""
    before = (s.recv_nonce, s.frames_received, s.bytes_received)
    with pytest.raises(FrameError) as info:
        s.open(frame)
    if code is not None:
        assert info.value.code == code
    assert (s.recv_nonce, s.frames_received, s.bytes_received) == before
    assert s.failed


# --- group keys and blobs (unity_crdt.crypto.keys) ----------------------------------------------


def test_group_keys_are_deterministic_distinct_and_labelled() -> None:
    again = derive_group_keys(SECRET.encode())
    assert again == KEYS and again.beacon_for(7) == KEYS.beacon_for(7)
    assert again.tenant == KEYS.tenant
    values = [getattr(KEYS, f.name) for f in dataclasses.fields(KEYS) if f.name != "salted"]
    assert len(set(values)) == len(values) and len(KEYS.psk_id) == 8
    assert KEYS.noise_psk != OTHER_KEYS.noise_psk
    assert KEYS.beacon_for(7) != OTHER_KEYS.beacon_for(7)
    assert KEYS.object_key("doc", "dev") != KEYS.object_key("doc", "dev2")
    with pytest.raises(ConfigError):
        derive_group_keys("short")


def test_f8_group_secrets_carry_a_random_salt_and_beacons_rotate() -> None:
    # Two groups choosing the same passphrase get unrelated keys: no shared precomputed table.
    a, b = keys.make_group_secret("same passphrase"), keys.make_group_secret("same passphrase")
    assert a != b and a.startswith("ucg1.") and a.endswith(".same passphrase")
    ka, kb = derive_group_keys(a), derive_group_keys(b)
    assert ka.salted and kb.salted
    for f in ("noise_psk", "psk_id", "checkpoint_key", "beacon_key", "tenant_key"):
        assert getattr(ka, f) != getattr(kb, f), f
    plain = derive_group_keys("same passphrase")
    assert not plain.salted and plain.psk_id not in (ka.psk_id, kb.psk_id)
    # Plain secrets keep the fixed salt, so existing groups keep their keys.
    master = Scrypt(salt=b"unity-crdt/v1/group-secret", length=32, n=2**15, r=8, p=1).derive(
        SECRET.encode()
    )
    expected = HKDF(hashes.SHA256(), 8, None, b"unity-crdt/v1/psk-id").derive(master)
    assert KEYS.psk_id == expected and not KEYS.salted
    # keygen's strings: 16 random bytes of salt, 32 of secret; any dots after the salt are
    # part of a passphrase; a newer version or a mangled salt is a clear error.
    fresh = keys.make_group_secret()
    assert len(fresh) == 4 + 1 + 22 + 1 + 43 and derive_group_keys(fresh).salted
    assert derive_group_keys(a.replace(".same passphrase", ".same.pass.phrase")).salted
    for bad in (
        "ucg2." + fresh[5:],
        "ucg1.tooshort.secretsecret",
        "ucg1." + "!" * 22 + ".secret!!",
    ):
        with pytest.raises(ConfigError):
            derive_group_keys(bad)
    with pytest.raises(ConfigError):
        keys.make_group_secret("short")
    # The beacon changes every window; members accept the windows either side of theirs.
    now = 1_700_000_000.0
    current, accepted = KEYS.beacons(now)
    later, _ = KEYS.beacons(now + keys.BEACON_WINDOW)
    assert current != later and later in accepted
    assert KEYS.beacons(now + 2 * keys.BEACON_WINDOW)[0] not in accepted
    assert current == KEYS.beacon_for(keys.beacon_window(now))
    assert current not in derive_group_keys(a).beacons(now)[1]


def test_sealed_blobs_detect_tampering_and_wrong_key() -> None:
    blob = keys.seal_blob(KEYS.checkpoint_key, b"state", aad=b"doc-1")
    assert keys.open_blob(KEYS.checkpoint_key, blob, aad=b"doc-1") == b"state"
    for bad_key, bad_blob, aad in [
        (OTHER_KEYS.checkpoint_key, blob, b"doc-1"),
        (KEYS.checkpoint_key, flip(blob, len(blob) - 1), b"doc-1"),
        (KEYS.checkpoint_key, blob, b"doc-2"),
        (KEYS.checkpoint_key, blob[:20], b"doc-1"),
    ]:
        with pytest.raises(SecurityError):
            keys.open_blob(bad_key, bad_blob, aad=aad)


# --- handshake --------------------------------------------------------------------------------


def test_full_handshake_both_sides() -> None:
    i, r, m1, m2, m3 = messages()
    assert len(m1) == PRELUDE_LEN + 48  # prelude + e + tag: nothing else in clear
    assert i.complete and not r.complete
    assert r.receive(m3, 0.3) is None
    assert r.complete
    assert i.remote == hello(BOB, "bob") and r.remote == hello(ALICE, "alice")
    a, b = i.session(), r.session()
    assert i.session() is a  # one session per handshake
    assert a.handshake_hash == b.handshake_hash and len(a.handshake_hash) == 32
    assert b.open(a.seal(b"ping")[0]) == b"ping"
    assert a.open(b.seal(b"pong")[0]) == b"pong"
    assert b"alice" not in m1 + m2 + m3 and ALICE.device_id.encode() not in m1 + m2 + m3


def test_limits_frames_are_not_padded_and_the_prelude_names_the_group() -> None:
    """What docs/security.md lists as not protected: sizes, and the group's PSK id in clear."""
    a, _ = sessions()
    short, long = a.seal(b"x" * 10)[0], a.seal(b"x" * 1000)[0]
    assert len(long) - len(short) == 990  # a frame's size is its plaintext's size plus 20
    first, second = pair()[0].initiate(), pair()[0].initiate()
    assert first[:PRELUDE_LEN] == second[:PRELUDE_LEN]  # links connections of one group
    assert first[8:PRELUDE_LEN] == KEYS.psk_id
    assert pair(OTHER_KEYS, OTHER_KEYS)[0].initiate()[:PRELUDE_LEN] != first[:PRELUDE_LEN]
    assert first[PRELUDE_LEN:] != second[PRELUDE_LEN:]  # message 1 itself is fresh each time


def test_interop_with_the_noise_reference_library() -> None:
    """A raw noiseprotocol responder completes the handshake and reads our frames as Noise
    transport messages with the header as AD, including after an in-band Rekey()."""
    i = Handshake(KEYS, ALICE, hello(ALICE, "alice"), initiator=True, now=0)
    m1 = i.initiate()
    raw = NoiseConnection.from_name(PROTOCOL_NAME)
    raw.set_psks(psk=KEYS.noise_psk)
    raw.set_prologue(PROLOGUE_LABEL + m1[:PRELUDE_LEN])
    raw.set_keypair_from_private_bytes(Keypair.STATIC, BOB.private_bytes())
    raw.set_as_responder()
    raw.start_handshake()
    assert raw.read_message(m1[PRELUDE_LEN:]) == b""
    m3 = i.receive(bytes(raw.write_message(handshake._encode_hello(hello(BOB, "bob")))), 0.1)
    assert m3 is not None
    assert handshake._decode_hello(bytes(raw.read_message(m3))) == hello(ALICE, "alice")
    s = i.session()
    assert s.handshake_hash == raw.get_handshake_hash()
    rx, tx = raw.noise_protocol.cipher_state_decrypt, raw.noise_protocol.cipher_state_encrypt
    for text in (b"one", b"two"):
        (frame,) = s.seal(text)
        assert rx.decrypt_with_ad(frame[:4], frame[4:]) == text
    rekey = s.rekey(1.0)
    assert rx.decrypt_with_ad(rekey[:4], rekey[4:]) == b""
    raw.rekey_inbound_cipher()
    (frame,) = s.seal(b"after rekey")
    assert rx.decrypt_with_ad(frame[:4], frame[4:]) == b"after rekey"
    header = bytes((1, FRAME_DATA, 0, 0))
    assert s.open(header + tx.encrypt_with_ad(header, b"from noise")) == b"from noise"


def test_different_group_rejected_from_the_prelude() -> None:
    i, r = pair(ikeys=OTHER_KEYS)
    with pytest.raises(HandshakeError, match="different sync group") as info:
        r.receive(i.initiate(), 0.1)
    assert info.value.code == ErrorCode.AUTH_FAILED
    assert r.failed and r.remote is None and i.remote is None and not i.complete


def test_wrong_psk_rejected_at_message_1_and_initiator_learns_nothing() -> None:
    # Same PSK id, different PSK: only the AEAD of message 1 can tell.
    forged = dataclasses.replace(OTHER_KEYS, psk_id=KEYS.psk_id)
    i, r = pair(ikeys=forged)
    with pytest.raises(HandshakeError, match="message 1") as info:
        r.receive(i.initiate(), 0.1)
    assert info.value.code == ErrorCode.AUTH_FAILED
    assert r.remote is None and i.remote is None and not i.complete
    # A responder without the secret cannot make the initiator accept a message 2 either.
    i = Handshake(KEYS, ALICE, hello(ALICE, "alice"), initiator=True, now=0)
    i.initiate()
    ei = Handshake(forged, ALICE, hello(ALICE, "alice"), initiator=True, now=0)
    er = Handshake(forged, MALLORY, hello(MALLORY, "mallory"), initiator=False, now=0)
    evil_m2 = er.receive(ei.initiate(), 0.1)
    assert evil_m2 is not None
    with pytest.raises(HandshakeError, match="message 2"):
        i.receive(evil_m2, 0.1)
    assert i.remote is None and not i.complete


@pytest.mark.parametrize(
    ("offset", "value", "match", "code"),
    [
        (0, b"X", "bad magic", ErrorCode.MALFORMED),
        (4, b"\x00", "version 0", ErrorCode.UNSUPPORTED_VERSION),  # downgrade
        (4, b"\x02", "version 2", ErrorCode.UNSUPPORTED_VERSION),
        (5, b"\x01", "message 1", ErrorCode.AUTH_FAILED),  # flags: caught by the prologue
        (6, b"\x01", "reserved", ErrorCode.MALFORMED),
        (8, b"\xaa", "different sync group", ErrorCode.AUTH_FAILED),  # another PSK id
    ],
)
def test_prelude_tampering(offset: int, value: bytes, match: str, code: ErrorCode) -> None:
    i, r = pair()
    m1 = bytearray(i.initiate())
    m1[offset : offset + 1] = value
    with pytest.raises(HandshakeError, match=match) as info:
        r.receive(bytes(m1), 0.1)
    assert info.value.code == code and r.remote is None


def fresh(which: int) -> tuple[Handshake, bytes]:
    """A fresh handshake stopped just before message `which` is read, and that message."""
    i, r = pair()
    msg = i.initiate()
    if which >= 2:
        msg = r.receive(msg, 0.1) or b""
    if which >= 3:
        msg = i.receive(msg, 0.2) or b""
    return (i if which == 2 else r), msg


@pytest.mark.parametrize("which", [1, 2, 3])
def test_bit_flip_at_every_offset(which: int) -> None:
    size = len(fresh(which)[1])
    for offset in range(size):
        # message 1 is cheap to reject (no DH): try every bit; elsewhere one bit per byte.
        for mask in [1 << b for b in range(8)] if which == 1 else [1 << (offset % 8)]:
            target, msg = fresh(which)
            with pytest.raises(HandshakeError):
                target.receive(flip(msg, offset, mask), 0.5)
            assert target.failed and target.remote is None and not target.complete


@pytest.mark.parametrize("which", [1, 2, 3])
def test_truncated_or_extended_messages(which: int) -> None:
    size = len(fresh(which)[1])
    for cut in [*range(size), -1]:
        target, msg = fresh(which)
        with pytest.raises(HandshakeError):
            target.receive(msg + b"\x00" if cut == -1 else msg[:cut], 0.5)
        assert target.failed and target.remote is None and not target.complete


@pytest.mark.parametrize("size", [65536, 200_000])
def test_huge_handshake_message_rejected_before_crypto(size: int) -> None:
    i, r = pair()
    m1 = i.initiate()
    with pytest.raises(HandshakeError) as info:
        r.receive(m1 + b"\x00" * (size - len(m1)), 0.1)
    assert info.value.code == ErrorCode.TOO_LARGE
    i, r = pair()
    r.receive(i.initiate(), 0.1)
    with pytest.raises(HandshakeError) as info:
        i.receive(b"\x00" * size, 0.2)
    assert info.value.code == ErrorCode.TOO_LARGE and i.failed


def test_deadline() -> None:
    i, r = pair(now=100.0)
    m1 = i.initiate()
    with pytest.raises(HandshakeError) as info:
        r.receive(m1, 105.01)
    assert info.value.code == ErrorCode.TIMEOUT and r.failed
    # Slowloris: message 3 never comes; the driver's timer check fails the handshake.
    i, r = pair(now=0.0)
    r.receive(i.initiate(), 1.0)
    r.check_deadline(4.9)
    with pytest.raises(HandshakeError) as info:
        r.check_deadline(5.1)
    assert info.value.code == ErrorCode.TIMEOUT
    with pytest.raises(HandshakeError, match="already failed"):
        r.receive(b"late", 5.2)


def test_application_data_before_handshake_completes() -> None:
    i, r, _, _, _m3 = messages()
    with pytest.raises(HandshakeError):
        r.session()
    (frame,) = i.session().seal(b"too early")  # message 3 lost; a frame arrives instead
    with pytest.raises(HandshakeError):
        r.receive(frame, 0.3)
    assert r.failed and not r.complete
    # After completion, frames must go to the session, not the handshake.
    i, r, _, _, m3 = messages()
    r.receive(m3, 0.3)
    with pytest.raises(HandshakeError, match="already complete"):
        r.receive(i.session().seal(b"x")[0], 0.4)


def test_claimed_device_id_must_match_static_key() -> None:
    # Mallory (a member) claims Alice's device id in message 3.
    i = Handshake(KEYS, MALLORY, hello(MALLORY, "mallory"), initiator=True, now=0)
    i._hello = hello(ALICE, "alice")
    r = Handshake(KEYS, BOB, hello(BOB, "bob"), initiator=False, now=0)
    m3 = i.receive(r.receive(i.initiate(), 0.1) or b"", 0.2)
    with pytest.raises(HandshakeError, match="claimed device id") as info:
        r.receive(m3 or b"", 0.3)
    assert info.value.code == ErrorCode.AUTH_FAILED and r.remote is None
    # ...and as a responder in message 2: the initiator stops before revealing itself.
    i = Handshake(KEYS, ALICE, hello(ALICE, "alice"), initiator=True, now=0)
    r = Handshake(KEYS, MALLORY, hello(MALLORY, "mallory"), initiator=False, now=0)
    r._hello = hello(BOB, "bob")
    with pytest.raises(HandshakeError, match="claimed device id"):
        i.receive(r.receive(i.initiate(), 0.1) or b"", 0.2)
    assert i.remote is None and not i.complete


def test_version_mismatch_and_self_connection() -> None:
    i = Handshake(KEYS, ALICE, hello(ALICE, "alice", version=2), initiator=True, now=0)
    r = Handshake(KEYS, BOB, hello(BOB, "bob"), initiator=False, now=0)
    with pytest.raises(HandshakeError) as info:
        i.receive(r.receive(i.initiate(), 0.1) or b"", 0.2)
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION
    i = Handshake(KEYS, ALICE, hello(ALICE, "alice"), initiator=True, now=0)
    r = Handshake(KEYS, ALICE, hello(ALICE, "alice"), initiator=False, now=0)
    with pytest.raises(HandshakeError) as info:
        i.receive(r.receive(i.initiate(), 0.1) or b"", 0.2)
    assert info.value.code == ErrorCode.DUPLICATE_LINK


def test_local_configuration_is_checked() -> None:
    with pytest.raises(ConfigError):
        Handshake(KEYS, ALICE, hello(BOB, "bob"), initiator=True, now=0)
    with pytest.raises(ConfigError):
        Handshake(
            KEYS,
            ALICE,
            dataclasses.replace(hello(ALICE, "a"), max_frame=MiB + 1),
            initiator=True,
            now=0,
        )
    for name in ("", "x" * 256, "bad\nname", "\ud800"):
        with pytest.raises(ConfigError):
            Handshake(KEYS, ALICE, hello(ALICE, name), initiator=True, now=0)
    with pytest.raises(ConfigError):
        DeviceIdentity.from_private_bytes(b"short")
    same = DeviceIdentity.from_private_bytes(ALICE.private_bytes())
    assert same.public_key == ALICE.public_key and same.device_id == ALICE.device_id


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(0, 2))
def test_handshake_parsers_raise_only_handshake_errors(data: bytes, step: int) -> None:
    i, r = pair()
    m1 = i.initiate()
    if step == 0:
        target, payload = r, m1[:PRELUDE_LEN] + data if data[:1] == b"\x00" else data
    elif step == 1:
        r.receive(m1, 0.1)
        target, payload = r, data
    else:
        target, payload = i, data
    with pytest.raises(HandshakeError):
        target.receive(payload, 0.2)
    with pytest.raises(HandshakeError):
        handshake._decode_hello(data + b"\xff")  # 0xff is never a valid UTF-8 name tail


# --- frames -----------------------------------------------------------------------------------


def test_frames_flow_and_count() -> None:
    a, b = sessions()
    for n in (0, 1, 100, 65536):
        frames = a.seal(b"m" * n)
        assert len(frames) == 1 and len(frames[0]) == n + FRAME_OVERHEAD
        assert b.open(frames[0]) == b"m" * n
    assert a.frames_sent == b.frames_received == b.recv_nonce == 4
    assert a.bytes_sent == b.bytes_received == 65637 + 4 * FRAME_OVERHEAD


def test_replay_reorder_drop() -> None:
    a, b = sessions()
    f1, f2 = a.seal(b"one")[0], a.seal(b"two")[0]
    assert b.open(f1) == b"one"
    assert_rejected(b, f1, ErrorCode.AUTH_FAILED)  # replay
    assert_rejected(b, f2)  # stays failed: even the next valid frame is refused
    a, b = sessions()
    f1, f2 = a.seal(b"one")[0], a.seal(b"two")[0]
    assert_rejected(b, f2)  # reorder (or f1 dropped)
    assert_rejected(b, f1)


@pytest.mark.parametrize("cut", [0, 3, 4, 19, 20, 21, -1, -16])
def test_truncated_frames(cut: int) -> None:
    a, b = sessions()
    (frame,) = a.seal(b"hello world")
    assert_rejected(b, frame[:cut])


def test_bit_flip_in_every_byte_of_a_frame() -> None:
    (frame,) = sessions()[0].seal(b"x")  # only to learn the length
    for offset in range(len(frame)):  # header (AD), ciphertext and tag
        a, b = sessions()
        (frame,) = a.seal(b"x")
        assert_rejected(b, flip(frame, offset, 0x80 >> (offset % 8)), ErrorCode.AUTH_FAILED)


def test_reflected_frame() -> None:
    a, b = sessions()
    (frame,) = a.seal(b"mine")
    assert_rejected(a, frame, ErrorCode.AUTH_FAILED)
    assert b.open(frame) == b"mine"


def test_over_cap_frames() -> None:
    a, b = sessions()
    frames = a.seal(b"z" * (MAX_FRAME_PLAINTEXT + 1))  # the sender splits
    assert [len(f) - FRAME_OVERHEAD for f in frames] == [MAX_FRAME_PLAINTEXT, 1]
    assert frames[0][2] == FLAG_MORE and frames[1][2] == 0
    assert b.open(frames[0]) is None and b.open(frames[1]) == b"z" * (MiB + 1)
    huge = a._seal_frame(FRAME_DATA, 0, b"z" * (MiB + 1))  # a sender ignoring the cap
    assert_rejected(b, huge, ErrorCode.TOO_LARGE)


def test_sender_respects_a_smaller_remote_max_frame() -> None:
    i = Handshake(KEYS, ALICE, hello(ALICE, "alice"), initiator=True, now=0)
    small = dataclasses.replace(hello(BOB, "bob"), max_frame=4096)
    r = Handshake(KEYS, BOB, small, initiator=False, now=0)
    r.receive(i.receive(r.receive(i.initiate(), 0) or b"", 0) or b"", 0)
    a, b = i.session(), r.session()
    frames = a.seal(b"q" * 10_000)
    assert [len(f) - FRAME_OVERHEAD for f in frames] == [4096, 4096, 1808]
    assert [b.open(f) for f in frames][-1] == b"q" * 10_000
    assert_rejected(b, a._seal_frame(FRAME_DATA, 0, b"q" * 4097), ErrorCode.TOO_LARGE)


def test_fragment_reassembly_and_cap() -> None:
    a, b = sessions()
    message = bytes(range(256)) * (3 * MiB // 256)
    frames = a.seal(message)
    assert len(frames) == 3
    assert [b.open(f) for f in frames] == [None, None, message]
    a, b = sessions(max_message=2 * MiB)
    with pytest.raises(FrameError):
        a.seal(message)  # the sender refuses too
    big = sessions()[0]
    a, b = sessions(max_message=2 * MiB)
    a.max_message = big.max_message  # a peer with a bigger limit than ours
    frames = a.seal(message)
    assert b.open(frames[0]) is None and b.open(frames[1]) is None
    assert_rejected(b, frames[2], ErrorCode.TOO_LARGE)


def test_empty_fragments_do_not_grow_memory() -> None:
    a, b = sessions()
    for _ in range(1000):
        assert b.open(a._seal_frame(FRAME_DATA, FLAG_MORE, b"")) is None
    assert len(b._partial) == 0
    assert b.open(a._seal_frame(FRAME_DATA, 0, b"end")) == b"end"


@pytest.mark.parametrize(
    ("ftype", "flags", "payload"),
    [
        (0, 0, b"x"),
        (9, 0, b"x"),
        (255, 0, b""),  # unknown types
        (FRAME_DATA, 0x02, b"x"),  # unknown DATA flag
        (frames.FRAME_REKEY, 0, b"x"),
        (frames.FRAME_REKEY, FLAG_MORE, b""),
        (frames.FRAME_CLOSE, 0, b"\x00"),  # CLOSE without a full code
    ],
)
def test_invalid_authenticated_frames(ftype: int, flags: int, payload: bytes) -> None:
    a, b = sessions()
    assert_rejected(b, a._seal_frame(ftype, flags, payload), ErrorCode.MALFORMED)


def test_close_frame() -> None:
    a, b = sessions()
    first = a._seal_frame(FRAME_DATA, FLAG_MORE, b"a" * 100)  # half a message, then CLOSE
    close = a.close_frame(ErrorCode.SHUTDOWN, "bye\nnow " + "é" * 100)
    with pytest.raises(FrameError):
        a.seal(b"after close")
    with pytest.raises(FrameError):
        a.close_frame(ErrorCode.SHUTDOWN)
    assert b.open(first) is None
    assert b.open(close) is None
    assert b.closed_by_peer is not None
    code, reason = b.closed_by_peer
    assert code == ErrorCode.SHUTDOWN and reason.startswith("bye?now é")
    assert len(reason.encode()) <= 120 and len(b._partial) == 0
    assert_rejected(b, a._seal_frame(FRAME_DATA, 0, b"late"), ErrorCode.MALFORMED)
    # an unknown code on the wire maps to INTERNAL instead of failing
    a, b = sessions()
    b.open(a._seal_frame(frames.FRAME_CLOSE, 0, struct.pack(">H", 999)))
    assert b.closed_by_peer == (ErrorCode.INTERNAL, "")


def test_close_still_possible_after_receive_failure() -> None:
    a, b = sessions()
    assert_rejected(b, b"\x01\x01\x00\x00" + b"\x00" * 40)
    with pytest.raises(FrameError):
        b.seal(b"nope")
    assert a.open(b.close_frame(ErrorCode.AUTH_FAILED, "bad frame")) is None
    assert a.closed_by_peer == (ErrorCode.AUTH_FAILED, "bad frame")


def test_rekey_both_directions() -> None:
    a, b = sessions()
    assert not a.needs_rekey(0.3 + 3599)
    assert a.needs_rekey(0.3 + 3600) and b.needs_rekey(0.3 + 3600)
    for _round in range(3):
        old_tx = a._tx._key
        rk_a, rk_b = a.rekey(3600.0), b.rekey(3600.0)
        assert a._tx._key != old_tx and not a.needs_rekey(3600.0)
        (fa,) = a.seal(b"a after rekey")
        assert b.open(rk_a) is None
        assert b.open(fa) == b"a after rekey"
        (fb,) = b.seal(b"b after rekey")
        assert a.open(rk_b) is None and a.open(fb) == b"b after rekey"
    assert a.rekeys_sent == a.rekeys_received == b.rekeys_sent == 3
    # a frame under the old key after REKEY is refused
    a, b = sessions()
    (stale,) = a.seal(b"x")
    rk = a.rekey(1.0)
    b.open(stale)
    b.open(rk)
    forged_old = sessions()[0]
    assert_rejected(b, forged_old.seal(b"y")[0])


def test_automatic_rekey_on_frame_count_and_lazy_peer() -> None:
    a, b = sessions(rekey_policy=RekeyPolicy(frames=3))
    out = []
    for k in range(10):
        for frame in a.seal(b"%d" % k):
            res = b.open(frame)
            if res is not None:
                out.append(res)
    assert out == [b"%d" % k for k in range(10)]
    assert a.rekeys_sent == b.rekeys_received == 3
    # REKEY frames may fall between the fragments of one message.
    i = Handshake(KEYS, ALICE, hello(ALICE, "alice"), initiator=True, now=0)
    small = dataclasses.replace(hello(BOB, "bob"), max_frame=1024)
    r = Handshake(KEYS, BOB, small, initiator=False, now=0)
    r.receive(i.receive(r.receive(i.initiate(), 0) or b"", 0) or b"", 0)
    a, b = i.session(rekey_policy=RekeyPolicy(frames=2)), r.session()
    message = bytes(range(250)) * 20
    sealed = a.seal(message)
    assert [f[1] for f in sealed].count(frames.FRAME_REKEY) == 2
    assert [b.open(f) for f in sealed][-1] == message
    # A peer that never rekeys is cut off once it doubles the limit.
    a, b = sessions()
    b.rekey_policy = RekeyPolicy(frames=3)
    for k in range(6):
        assert b.open(a.seal(b"%d" % k)[0]) == b"%d" % k
    assert_rejected(b, a.seal(b"7")[0])


def test_nonce_hard_stop() -> None:
    a, b = sessions()
    a._tx.nonce = b._rx.nonce = 2**64 - 3
    assert b.open(a.seal(b"last")[0]) == b"last"
    with pytest.raises(FrameError, match="nonce exhausted"):
        a.seal(b"one too many")  # could need a REKEY frame too
    assert b.open(a.close_frame(ErrorCode.SHUTDOWN)) is None  # nonce 2^64-2, the last one
    assert a.send_nonce == b.recv_nonce == 2**64 - 1  # reserved for Rekey(): never used
    a.close_sent = False
    with pytest.raises(FrameError, match="nonce exhausted"):
        a.rekey(0.0)
    b.closed_by_peer = None  # the receiver refuses nonce 2^64-1 too
    assert_rejected(b, a._seal_frame(FRAME_DATA, 0, b"x"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_open_raises_only_frame_errors(data: bytes) -> None:
    _, b = SESSION_PAIR
    b.failed = False
    with pytest.raises(FrameError):
        b.open(data)
    assert b.recv_nonce == 0


SESSION_PAIR = sessions()


# --- secrets never leak -----------------------------------------------------------------------


def test_secrets_in_no_repr_or_error() -> None:
    i, r, _, _, m3 = messages()
    r.receive(m3, 0.3)
    a, b = i.session(), r.session()
    secrets = [
        SECRET.encode(),
        KEYS.noise_psk,
        KEYS.checkpoint_key,
        KEYS.beacon_key,
        KEYS.object_id_key,
        KEYS.tenant_key,
        ALICE.private_bytes(),
        BOB.private_bytes(),
        a._tx._key,
        a._rx._key,
    ]
    errors: list[Exception] = []
    for attack in (lambda: b.open(b"\x00" * 30), lambda: b.open(b"\x00" * 30)):
        try:
            attack()
        except FrameError as exc:
            errors.append(exc)
    x, y = pair(ikeys=dataclasses.replace(OTHER_KEYS, psk_id=KEYS.psk_id))
    try:
        y.receive(x.initiate(), 0.1)
    except HandshakeError as exc:
        errors.append(exc)
    texts = [f(o) for o in (KEYS, ALICE, i, r, a, b, a._tx, a.remote, *errors) for f in (repr, str)]
    for text in texts:
        for s in secrets:
            for form in (s.hex(), repr(s), s.decode("latin-1")):
                assert form not in text
    assert len(errors) == 3 and "redacted" in repr(KEYS)
