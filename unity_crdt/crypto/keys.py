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
LABEL_LEGACY_SALT = b"unity-crdt/v1/group-secret"  # the scrypt salt of plain (v0) secrets
LABEL_GROUP_SALT = b"unity-crdt/v1/group-salt"  # prefixed to a v1 secret's random salt
LABEL_NOISE_PSK = b"unity-crdt/v1/noise-psk"
LABEL_PSK_ID = b"unity-crdt/v1/psk-id"
LABEL_CHECKPOINT = b"unity-crdt/v1/checkpoint-key"
LABEL_OBJECT_ID = b"unity-crdt/v1/object-id-key"
LABEL_BEACON = b"unity-crdt/v1/mdns-beacon-key"
LABEL_TENANT = b"unity-crdt/v1/weaviate-tenant"
LABEL_DEVICE_ID = b"unity-crdt/v1/device-id"
LABEL_BEACON_WINDOW = b"unity-crdt/v1/beacon-window"
LABEL_RELAY = b"unity-crdt/v1/relay-key"
LABEL_RELAY_NAMES = b"unity-crdt/v1/relay-name-key"
# Membership (v2): epochs after the first revocation, signatures, sealed epoch secrets, invites.
LABEL_GROUP_ID = b"unity-crdt/v2/group-id"  # from the epoch-0 secret: the group's stable id
LABEL_WORK_NAMES = b"unity-crdt/v2/work-names"  # group id -> the work bucket's naming key
LABEL_SIGNING_KEY = b"unity-crdt/v2/signing-key"  # X25519 private key -> Ed25519 seed
LABEL_ROSTER_OP = b"unity-crdt/v2/roster-op"  # prefix of every signed roster op
LABEL_EPOCH_SEAL = b"unity-crdt/v2/epoch-seal"  # HPKE info prefix of a sealed epoch secret
LABEL_INVITE_PSK = b"unity-crdt/v2/invite-psk"  # epoch secret || nonce -> an invite's PSK
LABEL_INVITE_BEACON = b"unity-crdt/v2/invite-beacon"  # an invite's PSK -> what it announces

# The secret string (what `unity-crdt keygen` prints): "ucg1.<salt>.<secret>", the salt 16
# random bytes in unpadded base64url (22 characters), the secret 32 random bytes the same way
# (43 characters) or any passphrase. Any other string is a plain (v0) secret: it keeps the
# fixed salt above, so groups made before v1 secrets existed keep working.
SECRET_PREFIX = "ucg"
SECRET_VERSION = 1
_SALT_BYTES = 16
_SALT_CHARS = 22
_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

# The mDNS beacon changes every window, so it neither tracks a group over time nor serves as
# a long-lived target for offline guessing; members accept the windows either side of theirs.
BEACON_WINDOW = 900.0

# scrypt cost: ~0.1 s and 32 MiB once per process, so a stolen beacon or checkpoint cannot be
# brute-forced cheaply back to a passphrase.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
MIN_SECRET_BYTES = 8

_BLOB_VERSION = b"\x01"
_NONCE = 12
_TAG = 16
SEAL_OVERHEAD = len(_BLOB_VERSION) + _NONCE + _TAG  # bytes seal_blob adds to its input


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
    salted: bool = True  # False for a plain (v0) secret, stretched with the fixed salt

    def __repr__(self) -> str:
        return "GroupKeys(<redacted>)"

    def beacon_for(self, window: int) -> str:
        """The group's mDNS beacon in one time window (`beacon_window(now)`)."""
        msg = LABEL_BEACON_WINDOW + window.to_bytes(8, "big", signed=True)
        return _b32(hmac.digest(self.beacon_key, msg, "sha256")[:10])

    def beacons(self, now: float) -> tuple[str, frozenset[str]]:
        """(the beacon to announce at wall-clock `now`, the beacons to accept: +-1 window)."""
        window = beacon_window(now)
        return self.beacon_for(window), frozenset(self.beacon_for(window + d) for d in (-1, 0, 1))

    @property
    def tenant(self) -> str:
        """The Weaviate tenant name of this group (keyed, so it reveals nothing)."""
        return "g" + hmac.digest(self.tenant_key, b"tenant", "sha256")[:16].hex()

    def object_key(self, *parts: str) -> bytes:
        """A keyed 32-byte id for (doc, device, ...) so stored ids never reveal names."""
        msg = b"\x00".join(p.encode("utf-8") for p in parts)
        return hmac.digest(self.object_id_key, msg, "sha256")


def hkdf(master: bytes, label: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 of `master` with `label` as info (labels: the block at the top)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(master)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def beacon_window(now: float) -> int:
    """The beacon window of wall-clock time `now` (seconds since the epoch)."""
    return int(now // BEACON_WINDOW)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def make_group_secret(passphrase: str | None = None) -> str:
    """A new v1 secret string: a fresh random salt and 32 random bytes (or `passphrase`)."""
    body = _b64url(secrets.token_bytes(32)) if passphrase is None else passphrase
    if len(body.encode("utf-8")) < MIN_SECRET_BYTES:
        raise ConfigError(f"a passphrase must be at least {MIN_SECRET_BYTES} bytes")
    salt = _b64url(secrets.token_bytes(_SALT_BYTES))
    return f"{SECRET_PREFIX}{SECRET_VERSION}.{salt}.{body}"


def parse_group_secret(secret: str | bytes) -> tuple[bytes, bytes, bool]:
    """-> (scrypt salt, secret bytes, whether it is a salted v1 secret); see SECRET_PREFIX."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    head, dot, rest = raw.partition(b".")
    if dot and head[:3] == SECRET_PREFIX.encode() and head[3:].isdigit():
        if int(head[3:]) != SECRET_VERSION:
            raise ConfigError(
                f"this group secret is format {head.decode()}, made by a newer unity-crdt"
            )
        salt, dot, body = rest.partition(b".")
        text = salt.decode("ascii", "replace")
        if not dot or len(salt) != _SALT_CHARS or not set(text) <= _B64URL:
            raise ConfigError(
                f"a {head.decode()} group secret looks like ucg1.<22-char salt>.<secret>"
            )
        raw, salted = body, LABEL_GROUP_SALT + base64.urlsafe_b64decode(salt + b"==")
        is_v1 = True
    else:
        salted, is_v1 = LABEL_LEGACY_SALT, False
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"group secret must be at least {MIN_SECRET_BYTES} bytes "
            "(make a strong one with `unity-crdt keygen`)"
        )
    return salted, raw, is_v1


def group_master(secret: str | bytes) -> tuple[bytes, bool]:
    """The slow KDF over a group secret: (the epoch-0 secret GS, whether it was salted)."""
    salt, raw, salted = parse_group_secret(secret)
    return Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P).derive(raw), salted


def keys_from_master(master: bytes, *, salted: bool = True) -> GroupKeys:
    """Every purpose key of one epoch, derived by label from that epoch's GS."""
    return GroupKeys(
        noise_psk=hkdf(master, LABEL_NOISE_PSK),
        psk_id=hkdf(master, LABEL_PSK_ID, 8),
        checkpoint_key=hkdf(master, LABEL_CHECKPOINT),
        object_id_key=hkdf(master, LABEL_OBJECT_ID),
        beacon_key=hkdf(master, LABEL_BEACON),
        tenant_key=hkdf(master, LABEL_TENANT),
        relay_key=hkdf(master, LABEL_RELAY),
        relay_name_key=hkdf(master, LABEL_RELAY_NAMES),
        salted=salted,
    )


def derive_group_keys(secret: str | bytes) -> GroupKeys:
    """Run the slow KDF once over the group secret, then derive every purpose key by label."""
    master, salted = group_master(secret)
    return keys_from_master(master, salted=salted)


def work_names_key(group_id: bytes) -> bytes:
    """The key naming the group's work bucket and lease keys: the same in every epoch.

    Lease names must map to the same keys before and after a revocation, or two members in
    different epochs could hold one lease; what the values say is sealed with each epoch's key.
    """
    return hkdf(group_id, LABEL_WORK_NAMES)


def group_id_of(master0: bytes) -> bytes:
    """The group's stable 16-byte id, from its epoch-0 GS (it names no one: a keyed hash)."""
    return hkdf(master0, LABEL_GROUP_ID, 16)


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

    def signing_seed(self) -> bytes:
        """The seed of this device's Ed25519 signing key: HKDF of the X25519 key under its
        own label, so one key file holds the whole identity and no key serves two uses."""
        return hkdf(self._private.private_bytes_raw(), LABEL_SIGNING_KEY)

    @property
    def private_key(self) -> X25519PrivateKey:
        """The X25519 key object, for opening what was sealed to this device (HPKE)."""
        return self._private

    def __repr__(self) -> str:
        return f"DeviceIdentity(device_id={self.device_id!r})"
