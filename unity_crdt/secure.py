"""Sans-IO secure transport: the Noise_XXpsk0 handshake and sealed, counted frames.

Everything here is a pure function of its inputs (no sockets, files or clock reads: time is a
`now` argument), so the security rules are unit-testable byte for byte. Secrets never appear in
reprs or errors. Key derivation lives in `unity_crdt.keys` and is re-exported from here.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from noise.connection import Keypair, NoiseConnection

from .errors import ConfigError, ErrorCode, FrameError, HandshakeError
from .keys import (
    LABEL_BEACON,
    LABEL_CHECKPOINT,
    LABEL_DEVICE_ID,
    LABEL_NOISE_PSK,
    LABEL_OBJECT_ID,
    LABEL_PSK_ID,
    LABEL_TENANT,
    MIN_SECRET_BYTES,
    DeviceIdentity,
    GroupKeys,
    derive_group_keys,
    device_id_for,
    open_blob,
    seal_blob,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "LABEL_BEACON",
    "LABEL_CHECKPOINT",
    "LABEL_DEVICE_ID",
    "LABEL_NOISE_PSK",
    "LABEL_OBJECT_ID",
    "LABEL_PSK_ID",
    "LABEL_TENANT",
    "MAX_FRAME_PLAINTEXT",
    "MIN_SECRET_BYTES",
    "DeviceIdentity",
    "GroupKeys",
    "Handshake",
    "PeerHello",
    "RekeyPolicy",
    "SecureSession",
    "derive_group_keys",
    "device_id_for",
    "open_blob",
    "seal_blob",
]

_TAG = 16

PROTOCOL_NAME = b"Noise_XXpsk0_25519_ChaChaPoly_SHA256"
SECURE_VERSION = 1
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

MAX_FRAME_PLAINTEXT = 2**20
MIN_FRAME_PLAINTEXT = 2**10
FRAME_HEADER_LEN = 4
FRAME_OVERHEAD = FRAME_HEADER_LEN + _TAG
DEFAULT_MAX_MESSAGE = 64 * 2**20
FRAME_DATA, FRAME_CLOSE, FRAME_REKEY = 1, 2, 3
FLAG_MORE = 0x01
# Noise reserves nonce 2^64-1 for Rekey(); a direction that reaches it is finished for good.
_NONCE_LIMIT = 2**64 - 1
_REKEY_NONCE = b"\x00" * 4 + b"\xff" * 8
_MAX_REASON = 120


@dataclass(frozen=True)
class RekeyPolicy:
    """When a sending direction must switch to a new key (whichever limit comes first)."""

    frames: int = 2**20
    bytes: int = 2**30
    seconds: float = 3600.0


@dataclass(frozen=True)
class PeerHello:
    """What each side tells the other inside handshake messages 2 and 3 (encrypted)."""

    name: str
    device_id: str
    version: int
    max_frame: int


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
    ) -> None:
        problem = _hello_problem(hello)
        if problem is not None:
            raise ConfigError(f"local hello: {problem}")
        if hello.device_id != identity.device_id:
            raise ConfigError("local hello must carry this identity's device id")
        if not deadline > 0:
            raise ConfigError("handshake deadline must be positive")
        self._keys, self._identity, self._hello = keys, identity, hello
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
        if not hmac.compare_digest(psk_id, self._keys.psk_id):
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


class _Direction:
    """One direction's ChaCha20-Poly1305 key with its implicit Noise nonce counter."""

    __slots__ = ("_key", "aead", "epoch_bytes", "epoch_frames", "nonce")

    def __init__(self, key: bytes) -> None:
        self._key, self.aead = key, ChaCha20Poly1305(key)
        self.nonce = self.epoch_frames = self.epoch_bytes = 0

    def __repr__(self) -> str:
        return f"_Direction(nonce={self.nonce}, key=<redacted>)"

    def nonce_bytes(self) -> bytes:
        return b"\x00" * 4 + self.nonce.to_bytes(8, "little")

    def advance(self, size: int) -> None:
        self.nonce += 1
        self.epoch_frames += 1
        self.epoch_bytes += size

    def rekey(self) -> None:
        # Noise Rekey(k): the first 32 bytes of ENCRYPT(k, 2^64-1, "", zeros(32)).
        self._key = self.aead.encrypt(_REKEY_NONCE, b"\x00" * 32, b"")[:32]
        self.aead = ChaCha20Poly1305(self._key)
        self.epoch_frames = self.epoch_bytes = 0


class SecureSession:
    """Sealed frames over one completed handshake: seal() to send, open() to receive."""

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        *,
        local: PeerHello,
        remote: PeerHello,
        handshake_hash: bytes,
        now: float,
        max_message: int = DEFAULT_MAX_MESSAGE,
        rekey_policy: RekeyPolicy | None = None,
    ) -> None:
        self.local, self.remote, self.handshake_hash = local, remote, handshake_hash
        self.max_message = max_message
        self.rekey_policy = rekey_policy or RekeyPolicy()
        self._tx, self._rx = _Direction(send_key), _Direction(recv_key)
        self._tx_epoch_start = now
        self._send_cap = min(MAX_FRAME_PLAINTEXT, remote.max_frame)  # what the peer accepts
        self._recv_cap = local.max_frame
        self._partial = bytearray()
        self.frames_sent = self.frames_received = self.bytes_sent = self.bytes_received = 0
        self.rekeys_sent = self.rekeys_received = 0
        self.closed_by_peer: tuple[ErrorCode, str] | None = None
        self.close_sent = False
        self.failed = False

    def __repr__(self) -> str:
        return (
            f"SecureSession(remote={self.remote.name!r}/{self.remote.device_id[:8]}, "
            f"sent={self.frames_sent}, received={self.frames_received}, failed={self.failed})"
        )

    @property
    def send_nonce(self) -> int:
        """Frames sealed so far in this direction (the next implicit nonce)."""
        return self._tx.nonce

    @property
    def recv_nonce(self) -> int:
        """Frames accepted so far in this direction (the next expected nonce)."""
        return self._rx.nonce

    def _check_send(self, frames: int) -> None:
        if self.failed or self.close_sent:
            raise FrameError("session is closed or failed", ErrorCode.INTERNAL)
        if self._tx.nonce + frames > _NONCE_LIMIT:
            raise FrameError("send nonce exhausted; a new handshake is needed", ErrorCode.INTERNAL)

    def _seal_frame(self, ftype: int, flags: int, payload: bytes | memoryview) -> bytes:
        header = bytes((SECURE_VERSION, ftype, flags, 0))
        frame = header + self._tx.aead.encrypt(self._tx.nonce_bytes(), payload, header)
        self._tx.advance(len(frame))
        self.frames_sent += 1
        self.bytes_sent += len(frame)
        return frame

    def _tx_due(self) -> bool:
        p = self.rekey_policy
        return self._tx.epoch_frames >= p.frames or self._tx.epoch_bytes >= p.bytes

    def seal(self, message: bytes) -> list[bytes]:
        """Encrypt one message into BINARY frames (fragments of at most the peer's max_frame)."""
        if len(message) > self.max_message:
            raise FrameError(
                f"message of {len(message)} bytes is over the limit", ErrorCode.TOO_LARGE
            )
        view, cap = memoryview(message), self._send_cap
        chunks = [view[i : i + cap] for i in range(0, len(view), cap)] or [view]
        self._check_send(2 * len(chunks))  # room for a REKEY before each chunk, at worst
        frames: list[bytes] = []
        for i, chunk in enumerate(chunks):
            if self._tx_due():  # count limits hold even if the driver never calls rekey()
                frames.append(self._seal_frame(FRAME_REKEY, 0, b""))
                self._tx.rekey()
                self.rekeys_sent += 1
            frames.append(
                self._seal_frame(FRAME_DATA, FLAG_MORE if i < len(chunks) - 1 else 0, chunk)
            )
        return frames

    def needs_rekey(self, now: float) -> bool:
        """True once the sending key has carried 2^20 frames, 1 GiB or 60 minutes."""
        return self._tx_due() or now - self._tx_epoch_start >= self.rekey_policy.seconds

    def rekey(self, now: float) -> bytes:
        """A REKEY frame (sent under the old key); our sending key moves on right after it."""
        self._check_send(1)
        frame = self._seal_frame(FRAME_REKEY, 0, b"")
        self._tx.rekey()
        self._tx_epoch_start = now
        self.rekeys_sent += 1
        return frame

    def close_frame(self, code: ErrorCode, reason: str = "") -> bytes:
        """An authenticated CLOSE frame; nothing can be sealed after it."""
        if self.close_sent or self._tx.nonce >= _NONCE_LIMIT:
            raise FrameError("CLOSE already sent or send nonce exhausted", ErrorCode.INTERNAL)
        raw = reason.encode("utf-8")[:_MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
        frame = self._seal_frame(FRAME_CLOSE, 0, struct.pack(">H", int(code)) + raw)
        self.close_sent = True
        return frame

    def open(self, frame: bytes) -> bytes | None:
        """Authenticate one frame: a whole message, or None (fragment pending / control frame)."""
        if self.failed:
            raise FrameError("session already failed")
        try:
            if self.closed_by_peer is not None:
                raise FrameError("frame after the peer's CLOSE", ErrorCode.MALFORMED)
            return self._open(frame)
        except FrameError:
            self.failed, self._partial = True, bytearray()
            raise

    def _open(self, frame: bytes) -> bytes | None:
        size, rx, policy = len(frame), self._rx, self.rekey_policy
        if size < FRAME_OVERHEAD:
            raise FrameError("frame is truncated", ErrorCode.MALFORMED)
        if size > FRAME_OVERHEAD + self._recv_cap:
            raise FrameError(f"frame of {size} bytes is over the cap", ErrorCode.TOO_LARGE)
        if rx.nonce >= _NONCE_LIMIT:
            raise FrameError("receive nonce exhausted")
        if rx.epoch_frames >= 2 * policy.frames or rx.epoch_bytes >= 2 * policy.bytes:
            raise FrameError("peer did not rekey in time")
        header = bytes(frame[:FRAME_HEADER_LEN])
        try:
            plain = rx.aead.decrypt(rx.nonce_bytes(), memoryview(frame)[FRAME_HEADER_LEN:], header)
        except InvalidTag:
            raise FrameError(
                "frame failed authentication (tampered, replayed, reordered, dropped or reflected)"
            ) from None
        version, ftype, flags, reserved = header
        if version != SECURE_VERSION or reserved:
            raise FrameError("frame header has an unknown version", ErrorCode.UNSUPPORTED_VERSION)
        if ftype == FRAME_DATA:
            if flags & ~FLAG_MORE:
                raise FrameError(f"unknown DATA frame flags {flags:#x}", ErrorCode.MALFORMED)
            if len(self._partial) + len(plain) > self.max_message:
                raise FrameError("reassembled message is over the limit", ErrorCode.TOO_LARGE)
            self._accept(size)
            if flags & FLAG_MORE:
                self._partial += plain
                return None
            if not self._partial:
                return plain
            self._partial += plain
            message, self._partial = bytes(self._partial), bytearray()
            return message
        if flags:
            raise FrameError("control frame with flags set", ErrorCode.MALFORMED)
        if ftype == FRAME_REKEY:
            if plain:
                raise FrameError("REKEY frame carries a payload", ErrorCode.MALFORMED)
            self._accept(size)
            rx.rekey()
            self.rekeys_received += 1
            return None
        if ftype == FRAME_CLOSE:
            if not 2 <= len(plain) <= 2 + _MAX_REASON:
                raise FrameError("CLOSE frame is malformed", ErrorCode.MALFORMED)
            self._accept(size)
            text = plain[2:].decode("utf-8", "replace")
            reason = "".join(c if c.isprintable() else "?" for c in text)
            self.closed_by_peer = (ErrorCode.parse(int.from_bytes(plain[:2], "big")), reason)
            self._partial = bytearray()  # an abrupt close discards a half-received message
            return None
        raise FrameError(f"unknown frame type {ftype}", ErrorCode.MALFORMED)

    def _accept(self, size: int) -> None:
        # Only a fully valid frame moves the counters, so a rejected one leaves no trace.
        self._rx.advance(size)
        self.frames_received += 1
        self.bytes_received += size
