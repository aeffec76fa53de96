"""Roster operations: signed, hash-linked records of who joined, was invited, added, revoked.

Every op names the ops its author had seen (`deps`, their ids), so the ops of a group form a
DAG whose edges say what happened before what. An op's id is the SHA-256 of its bytes, and its
author signs everything before the signature with the Ed25519 key of its own JOIN. Byte layout
(all integers big-endian):

    version u8 (= 1) | kind u8 | group_id 16 | author 26 (ASCII device id) | at u64 (ms)
    | n_deps u8 | dep ids 32 each (sorted, unique) | body | signature 64

    JOIN    secret u8 | x25519 32 | ed25519 32 | name_len u8 | name (UTF-8)   the device's card
            (secret = 1: the device holds the group secret, which admits it while no one was
            ever revoked; an invited device says 0 and is admitted by an ADD)
    INVITE  nonce 16 | expires u64 (ms) | epoch u32
    ADD     target 26 | nonce 16                 (the invite it redeems; target's JOIN in deps)
    REVOKE  target 26
    EPOCH   number u32 | nonce 16 | n u16 | (device 26 | sealed secret 80) * n
    GRANT   number u32 | epoch op id 32 (zeros: epoch 0) | device 26 | sealed secret 80

The signed message is `LABEL_ROSTER_OP || everything before the signature`. Sans-IO: `at` is the
author's wall clock, passed in. Parsing is strict (exact lengths, known kinds, sorted deps);
anything else is a SecurityError before any signature is checked.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

from ..crypto.epochs import SEALED_LEN
from ..crypto.keys import LABEL_ROSTER_OP, device_id_for
from ..crypto.signing import SIGNATURE_LEN, SigningKey, check_public_key, verify
from ..errors import SecurityError

__all__ = [
    "MAX_DEPS",
    "NO_EPOCH",
    "Add",
    "Body",
    "Epoch",
    "Grant",
    "Invite",
    "Join",
    "Op",
    "OpKind",
    "Revoke",
    "decode_op",
    "make_op",
]

VERSION = 1
GROUP_ID_LEN = 16
DEVICE_LEN = 26
NONCE_LEN = 16
OP_ID_LEN = 32
MAX_DEPS = 64
MAX_RECIPIENTS = 4096
_HEAD = struct.Struct(">BB16s26sQB")
_B32 = frozenset(b"abcdefghijklmnopqrstuvwxyz234567")
NO_EPOCH = b"\x00" * OP_ID_LEN  # a GRANT of epoch 0 names no op


class OpKind(IntEnum):
    """What a roster op does."""

    JOIN = 1
    INVITE = 2
    ADD = 3
    REVOKE = 4
    EPOCH = 5
    GRANT = 6


@dataclass(frozen=True, slots=True)
class Join:
    """A device's own card: its keys and name (the author is the device of `x25519`), and
    whether it joined with the group secret (`secret`) rather than an invitation."""

    x25519: bytes
    ed25519: bytes
    name: str
    secret: bool = True


@dataclass(frozen=True, slots=True)
class Invite:
    """An invitation (single use) made in epoch `epoch`, redeemable until `expires` (ms)."""

    nonce: bytes
    expires: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Add:
    """`target` joins, redeeming the invitation `nonce`."""

    target: str
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Revoke:
    """`target` is no longer a member."""

    target: str


@dataclass(frozen=True, slots=True)
class Epoch:
    """A new epoch: its secret sealed to each member it was made for."""

    number: int
    nonce: bytes
    sealed: tuple[tuple[str, bytes], ...]  # (device id, sealed secret), sorted by device


@dataclass(frozen=True, slots=True)
class Grant:
    """An epoch's secret sealed to one more device (`epoch`: the EPOCH op id, or NO_EPOCH)."""

    number: int
    epoch: bytes
    device: str
    sealed: bytes


Body = Join | Invite | Add | Revoke | Epoch | Grant
_KINDS: dict[type[Body], OpKind] = {}


@dataclass(frozen=True, slots=True)
class Op:
    """One parsed roster op (its signature is checked by the roster, which knows the key)."""

    id: bytes
    kind: OpKind
    group_id: bytes
    author: str
    at: int  # the author's wall clock, ms since the Unix epoch
    deps: tuple[bytes, ...]
    body: Body
    signed: bytes  # the bytes the signature covers (label excluded)
    signature: bytes
    raw: bytes

    def __repr__(self) -> str:
        return f"Op({self.kind.name}, {self.id[:4].hex()}, by {self.author[:8]})"

    @property
    def target(self) -> str:
        """The device an ADD, REVOKE or GRANT is about (the author otherwise)."""
        b = self.body
        if isinstance(b, Add | Revoke):
            return b.target
        if isinstance(b, Grant):
            return b.device
        return self.author

    def signed_by(self, public: bytes) -> bool:
        """Whether the signature is `public`'s over this op."""
        return verify(public, self.signature, LABEL_ROSTER_OP + self.signed)


_KINDS.update(
    {
        Join: OpKind.JOIN,
        Invite: OpKind.INVITE,
        Add: OpKind.ADD,
        Revoke: OpKind.REVOKE,
        Epoch: OpKind.EPOCH,
        Grant: OpKind.GRANT,
    }
)


def _device(raw: bytes) -> str:
    if len(raw) != DEVICE_LEN or not set(raw) <= _B32:
        raise SecurityError("roster op names a malformed device id")
    return raw.decode("ascii")


def _enc_device(device: str) -> bytes:
    raw = device.encode("ascii")
    _device(raw)
    return raw


def _fixed(value: bytes, size: int, what: str) -> bytes:
    if len(value) != size:
        raise SecurityError(f"{what} must be {size} bytes")
    return value


def _encode_body(b: Body) -> bytes:
    if isinstance(b, Join):
        name = b.name.encode("utf-8")
        if not 1 <= len(name) <= 255:
            raise SecurityError("a device name is 1-255 bytes")
        return (
            bytes([1 if b.secret else 0])
            + _fixed(b.x25519, 32, "x25519")
            + _fixed(b.ed25519, 32, "ed25519")
            + bytes([len(name)])
            + name
        )
    if isinstance(b, Invite):
        return _fixed(b.nonce, NONCE_LEN, "nonce") + struct.pack(">QI", b.expires, b.epoch)
    if isinstance(b, Add):
        return _enc_device(b.target) + _fixed(b.nonce, NONCE_LEN, "nonce")
    if isinstance(b, Revoke):
        return _enc_device(b.target)
    if isinstance(b, Epoch):
        out = struct.pack(">I", b.number) + _fixed(b.nonce, NONCE_LEN, "nonce")
        out += struct.pack(">H", len(b.sealed))
        for device, sealed in sorted(b.sealed):
            out += _enc_device(device) + _fixed(sealed, SEALED_LEN, "sealed secret")
        return out
    return (
        struct.pack(">I", b.number)
        + _fixed(b.epoch, OP_ID_LEN, "epoch id")
        + _enc_device(b.device)
        + _fixed(b.sealed, SEALED_LEN, "sealed secret")
    )


def _take(data: bytes, pos: int, n: int) -> tuple[bytes, int]:
    if pos + n > len(data):
        raise SecurityError("roster op is truncated")
    return data[pos : pos + n], pos + n


def _decode_body(kind: OpKind, data: bytes) -> Body:
    if kind is OpKind.JOIN:
        if len(data) < 67 or len(data) != 66 + data[65] or data[0] not in (0, 1):
            raise SecurityError("roster JOIN has the wrong length")
        check_public_key(data[33:65])
        try:
            name = data[66:].decode("utf-8")
        except UnicodeDecodeError:
            raise SecurityError("roster JOIN name is not UTF-8") from None
        if not name.isprintable():
            raise SecurityError("roster JOIN name is not printable")
        return Join(data[1:33], data[33:65], name, data[0] == 1)
    if kind is OpKind.INVITE:
        if len(data) != NONCE_LEN + 12:
            raise SecurityError("roster INVITE has the wrong length")
        expires, epoch = struct.unpack(">QI", data[NONCE_LEN:])
        return Invite(data[:NONCE_LEN], expires, epoch)
    if kind is OpKind.ADD:
        if len(data) != DEVICE_LEN + NONCE_LEN:
            raise SecurityError("roster ADD has the wrong length")
        return Add(_device(data[:DEVICE_LEN]), data[DEVICE_LEN:])
    if kind is OpKind.REVOKE:
        return Revoke(_device(data))
    if kind is OpKind.EPOCH:
        if len(data) < 4 + NONCE_LEN + 2:
            raise SecurityError("roster op is truncated")
        (number,) = struct.unpack_from(">I", data)
        nonce = data[4 : 4 + NONCE_LEN]
        (count,) = struct.unpack_from(">H", data, 4 + NONCE_LEN)
        pos = 4 + NONCE_LEN + 2
        if count > MAX_RECIPIENTS or len(data) != pos + count * (DEVICE_LEN + SEALED_LEN):
            raise SecurityError("roster EPOCH has the wrong length")
        sealed: list[tuple[str, bytes]] = []
        for _ in range(count):
            dev, pos = _take(data, pos, DEVICE_LEN)
            blob, pos = _take(data, pos, SEALED_LEN)
            device = _device(dev)
            if sealed and device <= sealed[-1][0]:
                raise SecurityError("roster EPOCH recipients are not sorted")
            sealed.append((device, blob))
        if number < 1:
            raise SecurityError("roster EPOCH number must be >= 1")
        return Epoch(number, nonce, tuple(sealed))
    if len(data) != 4 + OP_ID_LEN + DEVICE_LEN + SEALED_LEN:
        raise SecurityError("roster GRANT has the wrong length")
    (number,) = struct.unpack_from(">I", data)
    epoch = data[4 : 4 + OP_ID_LEN]
    device = _device(data[4 + OP_ID_LEN : 4 + OP_ID_LEN + DEVICE_LEN])
    return Grant(number, epoch, device, data[-SEALED_LEN:])


def make_op(
    body: Body,
    *,
    group_id: bytes,
    author: str,
    at: int,
    deps: tuple[bytes, ...] | list[bytes],
    key: SigningKey,
) -> Op:
    """Build and sign one op (its deps sorted and deduplicated)."""
    ordered = tuple(sorted(set(deps)))
    if len(ordered) > MAX_DEPS:
        raise SecurityError(f"an op names at most {MAX_DEPS} deps")
    kind = _KINDS[type(body)]
    head = _HEAD.pack(VERSION, kind, group_id, _enc_device(author), at, len(ordered))
    signed = head + b"".join(ordered) + _encode_body(body)
    raw = signed + key.sign(LABEL_ROSTER_OP + signed)
    return decode_op(raw)


def decode_op(raw: bytes) -> Op:
    """Parse one op strictly (the signature is not checked here); SecurityError if malformed."""
    if len(raw) < _HEAD.size + SIGNATURE_LEN:
        raise SecurityError("roster op is truncated")
    version, kind, group_id, author, at, n_deps = _HEAD.unpack_from(raw)
    if version != VERSION:
        raise SecurityError(f"roster op of unknown version {version}")
    try:
        op_kind = OpKind(kind)
    except ValueError:
        raise SecurityError(f"roster op of unknown kind {kind}") from None
    if n_deps > MAX_DEPS:
        raise SecurityError("roster op names too many deps")
    pos = _HEAD.size
    deps_raw, pos = _take(raw, pos, n_deps * OP_ID_LEN)
    deps = tuple(deps_raw[i : i + OP_ID_LEN] for i in range(0, len(deps_raw), OP_ID_LEN))
    if list(deps) != sorted(set(deps)):
        raise SecurityError("roster op deps are not sorted and unique")
    body_end = len(raw) - SIGNATURE_LEN
    if body_end < pos:
        raise SecurityError("roster op is truncated")
    body = _decode_body(op_kind, raw[pos:body_end])
    device = _device(author)
    if isinstance(body, Join) and device_id_for(body.x25519) != device:
        raise SecurityError("roster JOIN author is not the device of its key")
    return Op(
        id=hashlib.sha256(raw).digest(),
        kind=op_kind,
        group_id=group_id,
        author=device,
        at=at,
        deps=deps,
        body=body,
        signed=raw[:body_end],
        signature=raw[body_end:],
        raw=raw,
    )
