"""The cryptography under membership: signing keys, sealed epoch secrets, epoch and invite keys,
the responder's PSK lookup, invite codes."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from unity_crdt.crypto.epochs import invite_keys, invite_psk, open_epoch_secret, seal_epoch_secret
from unity_crdt.crypto.frames import PeerHello
from unity_crdt.crypto.handshake import Handshake
from unity_crdt.crypto.keys import (
    DeviceIdentity,
    GroupKeys,
    derive_group_keys,
    group_id_of,
    group_master,
    keys_from_master,
)
from unity_crdt.crypto.signing import SMALL_ORDER_Y, SigningKey, check_public_key, verify
from unity_crdt.errors import ConfigError, ErrorCode, HandshakeError, SecurityError
from unity_crdt.members.invites import InviteCode, parse_invite
from unity_crdt.sync.codec import PROTOCOL_VERSION

P = 2**255 - 19


def _order_divides_8(y: int) -> bool:
    """Whether a point with this y coordinate (either x) has an order dividing 8."""
    d = (-121665 * pow(121666, -1, P)) % P
    i = pow(2, (P - 1) // 4, P)  # a square root of -1
    x2 = (y * y - 1) * pow(d * y * y + 1, -1, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * i % P
    assert (x * x - x2) % P == 0, "not on the curve"

    def add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        (x1, y1), (x2_, y2) = a, b
        t = d * x1 * x2_ * y1 * y2
        return (x1 * y2 + x2_ * y1) * pow(1 + t, -1, P) % P, (y1 * y2 + x1 * x2_) * pow(
            1 - t, -1, P
        ) % P

    r = (x, y)
    for _ in range(3):  # 2P, 4P, 8P
        r = add(r, r)
    return r == (0, 1)


def test_small_order_list_is_right_and_weak_keys_never_verify() -> None:
    # The 8 points of order dividing 8 have exactly 5 distinct y coordinates: these.
    assert len(SMALL_ORDER_Y) == 5 and all(_order_divides_8(y) for y in SMALL_ORDER_Y)
    real = int.from_bytes(SigningKey(b"k" * 32).public_key, "little") & ((1 << 255) - 1)
    assert not _order_divides_8(real)  # and the check can tell
    identity = (1).to_bytes(32, "little")
    forged = identity + bytes(32)  # R = identity, S = 0
    # The hazard: cryptography alone accepts the identity key and this signature.
    Ed25519PublicKey.from_public_bytes(identity).verify(forged, b"anything at all")
    assert not verify(identity, forged, b"anything at all")
    for y in SMALL_ORDER_Y:
        for sign in (0, 0x80):
            raw = bytearray(y.to_bytes(32, "little"))
            raw[31] |= sign
            with pytest.raises(SecurityError):
                check_public_key(bytes(raw))
    non_canonical = (P + 5).to_bytes(32, "little")
    with pytest.raises(SecurityError, match="canonical"):
        check_public_key(non_canonical)
    key = SigningKey(b"k" * 32)
    check_public_key(key.public_key)
    sig = key.sign(b"msg")
    assert verify(key.public_key, sig, b"msg")
    assert not verify(key.public_key, sig, b"msh")
    assert not verify(key.public_key, sig[:-1], b"msg")
    assert "k" * 8 not in repr(key)


def test_a_device_signing_key_comes_from_its_device_key_alone() -> None:
    a = DeviceIdentity.generate()
    again = DeviceIdentity.from_private_bytes(a.private_bytes())
    assert a.signing_seed() == again.signing_seed()
    assert a.signing_seed() != a.private_bytes()
    assert a.signing_seed() != DeviceIdentity.generate().signing_seed()


def test_sealed_epoch_secret_binds_group_epoch_nonce_and_device() -> None:
    dev, other = DeviceIdentity.generate(), DeviceIdentity.generate()
    kw = {"group_id": b"g" * 16, "number": 3, "nonce": b"n" * 16}
    sealed = seal_epoch_secret(b"s" * 32, dev.public_key, device_id=dev.device_id, **kw)  # type: ignore[arg-type]
    assert len(sealed) == 80 and b"s" * 32 not in sealed
    assert open_epoch_secret(sealed, dev, **kw) == b"s" * 32  # type: ignore[arg-type]
    assert sealed != seal_epoch_secret(b"s" * 32, dev.public_key, device_id=dev.device_id, **kw)  # type: ignore[arg-type]
    wrong = [
        (other, kw),
        (dev, {**kw, "group_id": b"h" * 16}),
        (dev, {**kw, "number": 4}),
        (dev, {**kw, "nonce": b"m" * 16}),
    ]
    for who, args in wrong:
        with pytest.raises(SecurityError):
            open_epoch_secret(sealed, who, **args)  # type: ignore[arg-type]
    flipped = bytearray(sealed)
    flipped[40] ^= 1
    with pytest.raises(SecurityError):
        open_epoch_secret(bytes(flipped), dev, **kw)  # type: ignore[arg-type]


def test_epoch_keys_share_nothing_and_epoch_zero_is_v1() -> None:
    master, salted = group_master("unit test group secret")
    assert keys_from_master(master, salted=salted) == derive_group_keys("unit test group secret")
    e0, e1 = keys_from_master(master), keys_from_master(b"e" * 32)
    for field in ("noise_psk", "psk_id", "checkpoint_key", "beacon_key", "tenant_key", "relay_key"):
        assert getattr(e0, field) != getattr(e1, field)
    assert e0.tenant != e1.tenant
    assert len(group_id_of(master)) == 16 and group_id_of(master) != e0.psk_id


def _hello(dev: DeviceIdentity, name: str) -> PeerHello:
    return PeerHello(name, dev.device_id, PROTOCOL_VERSION, 2**20)


def _run(initiator: Handshake, responder: Handshake) -> None:
    m2 = responder.receive(initiator.initiate(), 0.0)
    assert m2 is not None
    m3 = initiator.receive(m2, 0.0)
    assert m3 is not None
    responder.receive(m3, 0.0)


def test_the_responder_picks_the_keys_the_prelude_names_or_refuses() -> None:
    a, b = DeviceIdentity.generate(), DeviceIdentity.generate()
    old, new = keys_from_master(b"0" * 32), keys_from_master(b"1" * 32)
    held: dict[bytes, GroupKeys] = {k.psk_id: k for k in (old, new)}

    def lookup(psk_id: bytes) -> GroupKeys:
        if psk_id not in held:
            raise HandshakeError("unknown")
        return held[psk_id]

    for keys in (old, new):
        initiator = Handshake(keys, a, _hello(a, "a"), initiator=True, now=0.0)
        responder = Handshake(new, b, _hello(b, "b"), initiator=False, now=0.0, lookup=lookup)
        _run(initiator, responder)
        assert responder.complete and responder.keys is keys
    stranger = keys_from_master(b"2" * 32)
    initiator = Handshake(stranger, a, _hello(a, "a"), initiator=True, now=0.0)
    responder = Handshake(new, b, _hello(b, "b"), initiator=False, now=0.0, lookup=lookup)
    with pytest.raises(HandshakeError, match="unknown"):
        responder.receive(initiator.initiate(), 0.0)

    def spent(psk_id: bytes) -> GroupKeys:
        raise HandshakeError("invite code already used", ErrorCode.INVITE_USED)

    responder = Handshake(new, b, _hello(b, "b"), initiator=False, now=0.0, lookup=spent)
    initiator = Handshake(new, a, _hello(a, "a"), initiator=True, now=0.0)
    with pytest.raises(HandshakeError) as err:
        responder.receive(initiator.initiate(), 0.0)
    assert err.value.code is ErrorCode.INVITE_USED


def test_invite_codes_carry_only_the_invitation_psk() -> None:
    master = b"m" * 32
    psk = invite_psk(master, b"n" * 16)
    assert psk != invite_psk(master, b"o" * 16) and psk != invite_psk(b"x" * 32, b"n" * 16)
    beacon = keys_from_master(master).beacon_key
    code = InviteCode(b"g" * 16, psk, beacon, 1_700_000_000_000)
    text = code.encode()
    assert text.startswith("uci1.") and len(text) == 123
    assert parse_invite(text) == code and parse_invite(text.encode()) == code
    assert parse_invite("ucg1.whatever") is None and parse_invite("a passphrase") is None
    with pytest.raises(ConfigError, match="damaged"):
        parse_invite(text[:-3])
    keys = invite_keys(psk, beacon)
    assert keys.noise_psk == psk and keys.beacon_key == beacon
    assert keys.psk_id != keys_from_master(master).psk_id
    assert (
        master not in text.encode() and "redacted" not in repr(code) and psk.hex() not in repr(code)
    )
