"""Ed25519 signatures of roster changes, with the weak-key check `cryptography` leaves out.

`cryptography` (OpenSSL) accepts the identity point as an Ed25519 public key, and then the
signature (R = identity, S = 0) verifies for every message: whoever may name a signing key
could sign anything in its name. So every public key admitted here is checked first: 32 bytes,
a canonical encoding (y < p, and no sign bit on x = 0), and not one of the eight points of
small order (their y coordinates are listed below; a test derives them from the curve). Pure
functions of their inputs: no I/O, no clock.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ..errors import ConfigError, SecurityError

__all__ = ["SIGNATURE_LEN", "SigningKey", "check_public_key", "verify"]

SIGNATURE_LEN = 64
PUBLIC_KEY_LEN = 32
_P = 2**255 - 19
# The y coordinates of the points of order 1, 2, 4 and 8 on edwards25519 (x is the other half
# of each pair): 1 (the identity), p - 1, 0, and the two of order 8.
SMALL_ORDER_Y = frozenset(
    {
        1,
        _P - 1,
        0,
        0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,
        0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,
    }
)


def check_public_key(raw: bytes) -> None:
    """Refuse (SecurityError) a signing key that is malformed, non-canonical or of small order."""
    if len(raw) != PUBLIC_KEY_LEN:
        raise SecurityError(f"a signing key is {PUBLIC_KEY_LEN} bytes, got {len(raw)}")
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _P:
        raise SecurityError("signing key is not canonically encoded")
    if y in SMALL_ORDER_Y:
        raise SecurityError("signing key is a point of small order (it would verify anything)")
    if y in (1, _P - 1) and raw[31] & 0x80:  # x = 0 with a sign bit: non-canonical
        raise SecurityError("signing key is not canonically encoded")


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is `public`'s signature of `message` (weak keys never verify)."""
    try:
        check_public_key(public)
    except SecurityError:
        return False
    if len(signature) != SIGNATURE_LEN:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class SigningKey:
    """A device's Ed25519 signing key; the repr shows only the public key's start."""

    __slots__ = ("_private", "public_key")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ConfigError("a signing key seed is 32 bytes")
        self._private = Ed25519PrivateKey.from_private_bytes(bytes(seed))
        self.public_key: bytes = self._private.public_key().public_bytes_raw()

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        return self._private.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public_key[:4].hex()}...)"
