"""Key material: group keys from the group secret, sealed blobs, the device identity.

Pure functions of their inputs (no sockets, files or clock reads). Secrets never appear in reprs
or errors. The handshake and frames live in `crypto.handshake` and `crypto.frames`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import ConfigError, SecurityError

# Every derivation label lives in this one block, so no two uses can ever share a key.
_SCRYPT_SALT = b"unity-crdt/v1/group-secret"
LABEL_NOISE_PSK = b"unity-crdt/v1/noise-psk"
LABEL_PSK_ID = b"unity-crdt/v1/psk-id"
LABEL_CHECKPOINT = b"unity-crdt/v1/checkpoint-key"
LABEL_OBJECT_ID = b"unity-crdt/v1/object-id-key"
LABEL_BEACON = b"unity-crdt/v1/mdns-beacon-key"
LABEL_TENANT = b"unity-crdt/v1/weaviate-tenant"
LABEL_DEVICE_ID = b"unity-crdt/v1/device-id"
LABEL_RELAY = b"unity-crdt/v1/relay-key"
LABEL_RELAY_NAMES = b"unity-crdt/v1/relay-name-key"

# scrypt cost: ~0.1 s and 32 MiB once per process, so a stolen beacon or checkpoint cannot be
# brute-forced cheaply back to a passphrase.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
MIN_SECRET_BYTES = 8

_BLOB_VERSION = b"\x01"
_NONCE = 12
_TAG = 16


@dataclass(frozen=True)
class GroupKeys:
    """Keys derived from a group secret; one per purpose. The repr never shows key material."""

    noise_psk: bytes = field(repr=False)
    psk_id: bytes = field(repr=False)
    checkpoint_key: bytes = field(repr=False)
    object_id_key: bytes = field(repr=False)
    beacon_key: bytes = field(repr=False)
    tenant_key: bytes = field(repr=False)
    relay_key: bytes = field(repr=False)
    relay_name_key: bytes = field(repr=False)

    def __repr__(self) -> str:
        return "GroupKeys(<redacted>)"

    @property
    def beacon(self) -> str:
        """The group's mDNS beacon: lets members recognise each other without naming the group."""
        return _b32(hmac.digest(self.beacon_key, b"beacon", "sha256")[:10])

    @property
    def tenant(self) -> str:
        """The Weaviate tenant name of this group (keyed, so it reveals nothing)."""
        return "g" + hmac.digest(self.tenant_key, b"tenant", "sha256")[:16].hex()

    def object_key(self, *parts: str) -> bytes:
        """A keyed 32-byte id for (doc, device, ...) so stored ids never reveal names."""
        msg = b"\x00".join(p.encode("utf-8") for p in parts)
        return hmac.digest(self.object_id_key, msg, "sha256")


def _hkdf(master: bytes, label: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(master)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def derive_group_keys(secret: str | bytes) -> GroupKeys:
    """Run the slow KDF once over the group secret, then derive every purpose key by label."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"group secret must be at least {MIN_SECRET_BYTES} bytes "
            "(make a strong one with `unity-crdt keygen`)"
        )
    master = Scrypt(salt=_SCRYPT_SALT, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P).derive(raw)
    return GroupKeys(
        noise_psk=_hkdf(master, LABEL_NOISE_PSK),
        psk_id=_hkdf(master, LABEL_PSK_ID, 8),
        checkpoint_key=_hkdf(master, LABEL_CHECKPOINT),
        object_id_key=_hkdf(master, LABEL_OBJECT_ID),
        beacon_key=_hkdf(master, LABEL_BEACON),
        tenant_key=_hkdf(master, LABEL_TENANT),
        relay_key=_hkdf(master, LABEL_RELAY),
        relay_name_key=_hkdf(master, LABEL_RELAY_NAMES),
    )


def device_id_for(public_key: bytes) -> str:
    """The stable device id: short base32 of SHA-256(label || X25519 public key)."""
    return _b32(hashlib.sha256(LABEL_DEVICE_ID + public_key).digest()[:16])


def seal_blob(key: bytes, data: bytes, aad: bytes = b"") -> bytes:
    """Encrypt and authenticate `data` (version || random nonce || ciphertext+tag)."""
    nonce = secrets.token_bytes(_NONCE)
    return _BLOB_VERSION + nonce + ChaCha20Poly1305(key).encrypt(nonce, data, _BLOB_VERSION + aad)


def open_blob(key: bytes, blob: bytes, aad: bytes = b"") -> bytes:
    """Decrypt a `seal_blob` result; any tampering raises SecurityError."""
    if len(blob) < 1 + _NONCE + _TAG or blob[:1] != _BLOB_VERSION:
        raise SecurityError("sealed blob is truncated or of an unknown version")
    nonce, body = blob[1 : 1 + _NONCE], blob[1 + _NONCE :]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, _BLOB_VERSION + aad)
    except InvalidTag:
        raise SecurityError("sealed blob failed authentication (tampered or wrong key)") from None


class DeviceIdentity:
    """This device's X25519 static key; the repr shows only the public device id."""

    __slots__ = ("_private", "device_id", "public_key")

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public_key: bytes = private.public_key().public_bytes_raw()
        self.device_id: str = device_id_for(self.public_key)

    @classmethod
    def generate(cls) -> DeviceIdentity:
        """A fresh random device key (first run)."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> DeviceIdentity:
        """Load the 32-byte raw private key written by `private_bytes`."""
        if len(data) != 32:
            raise ConfigError("device key must be exactly 32 bytes")
        return cls(X25519PrivateKey.from_private_bytes(bytes(data)))

    def private_bytes(self) -> bytes:
        """The raw private key, for the 0600 key file only."""
        return self._private.private_bytes_raw()

    def __repr__(self) -> str:
        return f"DeviceIdentity(device_id={self.device_id!r})"
