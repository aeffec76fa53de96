"""Sans-IO transport frames: sealed, counted, rekeyed frames over one completed handshake.

Everything here is a pure function of its inputs (no sockets, files or clock reads: time is a
`now` argument), so the frame rules are unit-testable byte for byte. Secrets never appear in
reprs or errors. The handshake that produces a `SecureSession` lives in `crypto.handshake`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import ErrorCode, FrameError

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "FLAG_MORE",
    "FRAME_CLOSE",
    "FRAME_DATA",
    "FRAME_HEADER_LEN",
    "FRAME_OVERHEAD",
    "FRAME_REKEY",
    "MAX_FRAME_PLAINTEXT",
    "MIN_FRAME_PLAINTEXT",
    "SECURE_VERSION",
    "PeerHello",
    "RekeyPolicy",
    "SecureSession",
]

_TAG = 16

# The handshake prelude and every frame header carry this same version byte.
SECURE_VERSION = 1

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


# Defined here rather than beside the handshake that sends it: every SecureSession holds both
# sides' hellos, and this module must not import `handshake`.
@dataclass(frozen=True)
class PeerHello:
    """What each side tells the other inside handshake messages 2 and 3 (encrypted)."""

    name: str
    device_id: str
    version: int
    max_frame: int


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
