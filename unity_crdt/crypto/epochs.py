"""Epoch secrets sealed to devices (HPKE, RFC 9180), and the keys of invitations. Sans-IO.

An epoch secret is the GS of an epoch (`crypto.keys.keys_from_master` derives its keys): the
scrypt output of the group secret for epoch 0, 32 random bytes chosen by the member that
starts any later epoch. It reaches each
member sealed to that member's X25519 device key with HPKE (`cryptography`'s RFC 9180 single
shot: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305), whose `info` binds the group
id, the epoch number, the epoch's random nonce and the recipient's device id: a sealed secret cannot
be replayed into another group, another epoch or to another device. Nothing here is home-made
cryptography: HPKE seals, HKDF derives (`crypto.keys`).

An invitation's PSK is derived from the current epoch secret and a random nonce, so every
member of that epoch can answer the invited device's handshake, and the invite code carries
only the PSK (never an epoch secret).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from ..errors import SecurityError
from .keys import (
    LABEL_EPOCH_SEAL,
    LABEL_INVITE_BEACON,
    LABEL_INVITE_PSK,
    LABEL_PSK_ID,
    DeviceIdentity,
    GroupKeys,
    hkdf,
)

__all__ = [
    "SEALED_LEN",
    "invite_beacon_key",
    "invite_keys",
    "invite_psk",
    "open_epoch_secret",
    "seal_epoch_secret",
]

_SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)
SEALED_LEN = 32 + 32 + 16  # the encapsulated key, the secret, the AEAD tag


def _info(group_id: bytes, number: int, nonce: bytes, device_id: str) -> bytes:
    return (
        LABEL_EPOCH_SEAL + group_id + number.to_bytes(8, "big") + nonce + device_id.encode("ascii")
    )


def seal_epoch_secret(
    secret: bytes,
    recipient: bytes,
    *,
    group_id: bytes,
    number: int,
    nonce: bytes,
    device_id: str,
) -> bytes:
    """Seal an epoch secret to one device's X25519 public key (`recipient`)."""
    public = X25519PublicKey.from_public_bytes(recipient)
    return _SUITE.encrypt(secret, public, info=_info(group_id, number, nonce, device_id))


def open_epoch_secret(
    sealed: bytes,
    identity: DeviceIdentity,
    *,
    group_id: bytes,
    number: int,
    nonce: bytes,
) -> bytes:
    """Open an epoch secret sealed to this device; SecurityError if it is not for us."""
    info = _info(group_id, number, nonce, identity.device_id)
    try:
        secret = _SUITE.decrypt(sealed, identity.private_key, info=info)
    except (InvalidTag, ValueError):
        raise SecurityError("sealed epoch secret does not open for this device") from None
    if len(secret) != 32:
        raise SecurityError("sealed epoch secret has the wrong length")
    return secret


def invite_psk(epoch_master: bytes, nonce: bytes) -> bytes:
    """The handshake PSK of one invitation, from the GS of the epoch it was made in."""
    return hkdf(epoch_master, LABEL_INVITE_PSK + nonce)


def invite_keys(psk: bytes, beacon_key: bytes) -> GroupKeys:
    """What an invited device handshakes with: the invite's PSK and PSK id, and the group's
    beacon key (to recognise members' mDNS announcements). It holds no other group key: the
    rest are derived from the PSK only to fill the record and are never used."""
    filler = hkdf(psk, b"unity-crdt/v2/invite-unused")
    return GroupKeys(
        noise_psk=psk,
        psk_id=hkdf(psk, LABEL_PSK_ID, 8),
        checkpoint_key=filler,
        object_id_key=filler,
        beacon_key=beacon_key,
        tenant_key=filler,
        relay_key=filler,
        relay_name_key=filler,
    )


def invite_beacon_key(psk: bytes) -> bytes:
    """The beacon key an invited device announces with (members never accept it: an invited
    device is found by dialling members, not by being dialled)."""
    return hkdf(psk, LABEL_INVITE_BEACON)
