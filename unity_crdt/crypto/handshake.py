"""Sans-IO secure transport: the Noise_XXpsk0 handshake that opens a session of sealed frames.

Everything here is a pure function of its inputs (no sockets, files or clock reads: time is a
`now` argument), so the security rules are unit-testable byte for byte. Secrets never appear in
reprs or errors. Key derivation lives in `crypto.keys` and the frames in `crypto.frames`.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from noise.connection import Keypair, NoiseConnection

from ..errors import ConfigError, ErrorCode, HandshakeError
from .frames import (
    DEFAULT_MAX_MESSAGE,
    MAX_FRAME_PLAINTEXT,
    MIN_FRAME_PLAINTEXT,
    SECURE_VERSION,
    PeerHello,
    RekeyPolicy,
    SecureSession,
)
from .keys import DeviceIdentity, GroupKeys, device_id_for

__all__ = ["Handshake"]

_TAG = 16

PROTOCOL_NAME = b"Noise_XXpsk0_25519_ChaChaPoly_SHA256"
PRELUDE_MAGIC = b"UCRD"
PRELUDE_LEN = 16
PROLOGUE_LABEL = b"unity-crdt/v1/prologue"
# Noise's own message limit; anything of 64 KiB or more is refused before any crypto runs.
MAX_HANDSHAKE_MESSAGE = 65535
_MSG1_LEN = 32 + _TAG  # e, then the (empty) payload's tag: psk0 makes it authenticated
_MSG2_MIN = 32 + 32 + _TAG + _TAG  # e, encrypted s, payload tag
_MSG3_MIN = 32 + _TAG + _TAG  # encrypted s, payload tag
_HELLO_MIN = 2 + 4 + 1 + 1 + 1
_DEVICE_ID_LEN = 26
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def _hello_problem(h: PeerHello) -> str | None:
    try:
        name = h.name.encode("utf-8")
    except (AttributeError, UnicodeEncodeError):
        name = b""
    if not 1 <= len(name) <= 255 or not h.name.isprintable():
        return "name must be 1-255 bytes of printable UTF-8"
    if len(h.device_id) != _DEVICE_ID_LEN or not set(h.device_id) <= _B32_ALPHABET:
        return "device id is malformed"
    if not 0 <= h.version <= 0xFFFF:
        return "version must fit in 16 bits"
    if not MIN_FRAME_PLAINTEXT <= h.max_frame <= MAX_FRAME_PLAINTEXT:
        return f"max_frame must be {MIN_FRAME_PLAINTEXT}-{MAX_FRAME_PLAINTEXT} bytes"
    return None


def _encode_hello(h: PeerHello) -> bytes:
    name, dev = h.name.encode("utf-8"), h.device_id.encode("ascii")
    return struct.pack(">HIB", h.version, h.max_frame, len(dev)) + dev + bytes([len(name)]) + name


def _decode_hello(data: bytes) -> PeerHello:
    bad = HandshakeError("peer hello is malformed", ErrorCode.MALFORMED)
    if len(data) < _HELLO_MIN:
        raise bad
    version, max_frame, dev_len = struct.unpack_from(">HIB", data)
    end = 7 + dev_len
    if len(data) < end + 1 or len(data) != end + 1 + data[end]:
        raise bad
    try:
        hello = PeerHello(
            data[end + 1 :].decode("utf-8"), data[7:end].decode("ascii"), version, max_frame
        )
    except UnicodeDecodeError:
        raise bad from None
    problem = _hello_problem(hello)
    if problem is not None:
        raise HandshakeError(f"peer hello is invalid: {problem}", ErrorCode.MALFORMED)
    return hello


class Handshake:
    """One Noise_XXpsk0_25519_ChaChaPoly_SHA256 handshake, driven one message at a time."""

    def __init__(
        self,
        keys: GroupKeys,
        identity: DeviceIdentity,
        hello: PeerHello,
        *,
        initiator: bool,
        now: float,
        deadline: float = 5.0,
        lookup: Callable[[bytes], GroupKeys] | None = None,
    ) -> None:
        """`keys` are what an initiator dials with. A responder given `lookup` takes the keys
        of the PSK id the initiator names instead (the group's epochs, open invitations);
        `lookup` raises HandshakeError for an id it does not know or refuses."""
        problem = _hello_problem(hello)
        if problem is not None:
            raise ConfigError(f"local hello: {problem}")
        if hello.device_id != identity.device_id:
            raise ConfigError("local hello must carry this identity's device id")
        if not deadline > 0:
            raise ConfigError("handshake deadline must be positive")
        self._keys, self._identity, self._hello = keys, identity, hello
        self._lookup = lookup
        self.initiator = initiator
        self.expires_at = now + deadline
        self.complete = False
        self.failed = False
        self.remote: PeerHello | None = None
        self._step = 0  # handshake messages done so far
        self._conn: Any = None
        self._result: tuple[bytes, bytes, bytes] | None = None
        self._completed_at = now
        self._session: SecureSession | None = None

    def __repr__(self) -> str:
        role = "initiator" if self.initiator else "responder"
        return (
            f"Handshake({role}, step={self._step}, complete={self.complete}, failed={self.failed})"
        )

    def _prelude(self) -> bytes:
        return struct.pack(">4sBBH8s", PRELUDE_MAGIC, SECURE_VERSION, 0, 0, self._keys.psk_id)

    def _new_conn(self, prelude: bytes) -> Any:
        conn = NoiseConnection.from_name(PROTOCOL_NAME)
        conn.set_psks(psk=self._keys.noise_psk)
        conn.set_prologue(PROLOGUE_LABEL + prelude)
        conn.set_keypair_from_private_bytes(Keypair.STATIC, self._identity.private_bytes())
        if self.initiator:
            conn.set_as_initiator()
        else:
            conn.set_as_responder()
        conn.start_handshake()
        return conn

    @property
    def keys(self) -> GroupKeys:
        """The keys this handshake runs with (a responder's: those its `lookup` chose)."""
        return self._keys

    def initiate(self) -> bytes:
        """Initiator only: the clear 16-byte prelude followed by Noise message 1."""
        if not self.initiator or self._step != 0 or self.failed:
            raise HandshakeError("initiate() is for a fresh initiator only", ErrorCode.INTERNAL)
        prelude = self._prelude()
        self._conn = self._new_conn(prelude)
        self._step = 1
        return prelude + bytes(self._conn.write_message(b""))

    def check_deadline(self, now: float) -> None:
        """Fail the handshake (TIMEOUT) once its deadline has passed."""
        if not self.complete and now > self.expires_at:
            self._fail()
            raise HandshakeError("handshake deadline passed", ErrorCode.TIMEOUT)

    def receive(self, data: bytes, now: float) -> bytes | None:
        """Consume the peer's next handshake message; return our reply, if any."""
        if self.failed:
            raise HandshakeError("handshake already failed")
        if self.complete:
            raise HandshakeError(
                "handshake already complete; frames belong to the session", ErrorCode.MALFORMED
            )
        self.check_deadline(now)
        try:
            if len(data) > MAX_HANDSHAKE_MESSAGE:
                raise HandshakeError(
                    f"handshake message of {len(data)} bytes is too large", ErrorCode.TOO_LARGE
                )
            if self.initiator:
                if self._step != 1:
                    raise HandshakeError("initiate() must come first", ErrorCode.INTERNAL)
                reply: bytes | None = self._read_msg2(data)
            else:
                if self._step == 0:
                    reply = self._read_msg1(data)
                else:
                    self._read_msg3(data)
                    reply = None
        except HandshakeError:
            self._fail()
            raise
        self._completed_at = now
        return reply

    def _fail(self) -> None:
        self.failed, self._conn, self._result = True, None, None

    def _read(self, data: bytes, what: str) -> tuple[bytes, bytes]:
        # Noise drops its handshake state when it finishes; keep it to read the remote static key.
        state = self._conn.noise_protocol.handshake_state
        try:
            payload = bytes(self._conn.read_message(bytes(data)))
        except InvalidTag:
            raise HandshakeError(f"{what} failed authentication") from None
        except Exception:  # noise raises assorted types for bad points and lengths
            raise HandshakeError(f"{what} is malformed", ErrorCode.MALFORMED) from None
        rs = state.rs
        return payload, (rs.public_bytes if hasattr(rs, "public_bytes") else b"")

    def _read_msg1(self, data: bytes) -> bytes:
        if len(data) < PRELUDE_LEN:
            raise HandshakeError("handshake message 1 is truncated", ErrorCode.MALFORMED)
        magic, version, _flags, reserved, psk_id = struct.unpack_from(">4sBBH8s", data)
        if magic != PRELUDE_MAGIC:
            raise HandshakeError("not a unity-crdt handshake (bad magic)", ErrorCode.MALFORMED)
        if version != SECURE_VERSION:
            raise HandshakeError(
                f"unsupported secure transport version {version}", ErrorCode.UNSUPPORTED_VERSION
            )
        if reserved:
            raise HandshakeError("handshake prelude has reserved bits set", ErrorCode.MALFORMED)
        if self._lookup is not None:
            self._keys = self._lookup(bytes(psk_id))
        elif not hmac.compare_digest(psk_id, self._keys.psk_id):
            raise HandshakeError("peer belongs to a different sync group (PSK id mismatch)")
        if len(data) != PRELUDE_LEN + _MSG1_LEN:
            raise HandshakeError("handshake message 1 has the wrong length", ErrorCode.MALFORMED)
        # Flags have no v1 meaning but are bound by the prologue, like the whole prelude.
        self._conn = self._new_conn(bytes(data[:PRELUDE_LEN]))
        self._read(
            data[PRELUDE_LEN:], "handshake message 1 (wrong group secret or tampered prelude)"
        )
        self._step = 2
        return bytes(self._conn.write_message(_encode_hello(self._hello)))

    def _read_msg2(self, data: bytes) -> bytes:
        if len(data) < _MSG2_MIN + _HELLO_MIN:
            raise HandshakeError("handshake message 2 is truncated", ErrorCode.MALFORMED)
        remote = self._verify(*self._read(data, "handshake message 2"))
        reply = bytes(self._conn.write_message(_encode_hello(self._hello)))
        self._finish(remote)
        return reply

    def _read_msg3(self, data: bytes) -> None:
        if len(data) < _MSG3_MIN + _HELLO_MIN:
            raise HandshakeError("handshake message 3 is truncated", ErrorCode.MALFORMED)
        self._finish(self._verify(*self._read(data, "handshake message 3")))

    def _verify(self, payload: bytes, remote_static: bytes) -> PeerHello:
        hello = _decode_hello(payload)
        if not hmac.compare_digest(hello.device_id, device_id_for(remote_static)):
            raise HandshakeError("peer's claimed device id does not match its static key")
        if remote_static == self._identity.public_key:
            raise HandshakeError("peer is this device (self-connection)", ErrorCode.DUPLICATE_LINK)
        if hello.version != self._hello.version:
            raise HandshakeError(
                f"peer speaks protocol version {hello.version}, this node {self._hello.version}",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        return hello

    def _finish(self, remote: PeerHello) -> None:
        proto = self._conn.noise_protocol
        send, recv = proto.cipher_state_encrypt.k, proto.cipher_state_decrypt.k
        self._result = (bytes(send), bytes(recv), bytes(self._conn.get_handshake_hash()))
        self._conn = None
        self.remote, self.complete, self._step = remote, True, 3

    def session(
        self, *, max_message: int = DEFAULT_MAX_MESSAGE, rekey_policy: RekeyPolicy | None = None
    ) -> SecureSession:
        """The transport session (created on the first call; later calls return it)."""
        if self._session is None:
            if self._result is None or self.remote is None:
                raise HandshakeError("handshake is not complete", ErrorCode.INTERNAL)
            send, recv, h = self._result
            self._result = None  # the keys now live only in the session
            self._session = SecureSession(
                send,
                recv,
                local=self._hello,
                remote=self.remote,
                handshake_hash=h,
                now=self._completed_at,
                max_message=max_message,
                rekey_policy=rekey_policy,
            )
        return self._session
