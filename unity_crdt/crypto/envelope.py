"""Sealed relay envelopes: what a group member puts on a message broker (NATS), sans-IO.

A broker operator sees subjects, message ids, sizes and timing, so all of those are chosen to
say nothing: subjects and the stream name carry a keyed hash of the group (`group_tag`), message
ids are keyed hashes of (sender, fragment id, part index), and everything else is inside a
ChaCha20-Poly1305 blob under the group's relay key. A body (one encoded sync message) larger
than the broker's payload limit is split into parts; `Reassembler` puts them back together.

Part plaintext (the AEAD's associated data is the subject, so a part cannot be moved to
another subject or another group's stream):

    version u8 (= 1) | frag_id 8 | index u16 | count u16 | sender 26 | chunk

`sender` is the device id of the member that sealed it: inside the blob, so the operator can
count messages but not tell devices apart. No I/O, no clock.
"""

from __future__ import annotations

import base64
import hmac
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import ConfigError, SecurityError
from .keys import GroupKeys, open_blob, seal_blob

__all__ = ["ENVELOPE_OVERHEAD", "Reassembler", "RelaySealer", "SealedPart"]

_VERSION = 1
_SENDER = 26
_FRAG = 8
# version + frag id + index + count + sender, plus seal_blob's version, nonce and tag.
ENVELOPE_OVERHEAD = 1 + _FRAG + 2 + 2 + _SENDER + 1 + 12 + 16
_MAX_PARTS = 2**16 - 1


@dataclass(frozen=True, slots=True)
class SealedPart:
    """One opened part: who sealed it, which body it belongs to, where it goes."""

    sender: str
    frag_id: bytes
    index: int
    count: int
    chunk: bytes


class RelaySealer:
    """Subjects, stream name, message ids and sealing for one group (and one device)."""

    def __init__(self, keys: GroupKeys, device_id: str) -> None:
        if len(device_id.encode()) != _SENDER:
            raise ConfigError("device id must be 26 characters")
        self._key = keys.relay_key
        self._names = keys.relay_name_key
        self.device_id = device_id
        tag = hmac.digest(self._names, b"group", "sha256")[:10]
        self.group_tag = base64.b32encode(tag).decode("ascii").rstrip("=").lower()
        prefix = f"ucrdt.{self.group_tag}"
        self.updates_subject = f"{prefix}.u"  # live deltas; the stream keeps them
        self.notices_subject = f"{prefix}.n"  # commit notices (not kept)
        self.sync_subject = f"{prefix}.a"  # anti-entropy requests (not kept)
        self.stream = f"UCRDT_{self.group_tag.upper()}"

    def __repr__(self) -> str:
        return f"RelaySealer(group_tag={self.group_tag!r})"

    def frag_id(self, incarnation: bytes, seq: int) -> bytes:
        """The fragment id of this device's `seq`-th body (keyed, unlinkable to the device)."""
        msg = self.device_id.encode() + incarnation + seq.to_bytes(8, "big")
        return hmac.digest(self._names, b"frag\x00" + msg, "sha256")[:_FRAG]

    def msg_id(self, frag_id: bytes, index: int) -> str:
        """The broker's deduplication id of one part (`Nats-Msg-Id`)."""
        msg = b"msgid\x00" + frag_id + index.to_bytes(4, "big")
        return hmac.digest(self._names, msg, "sha256")[:16].hex()

    def seal(self, subject: str, body: bytes, frag_id: bytes, max_part: int) -> list[bytes]:
        """Seal one body as one or more parts, each at most `max_part` bytes on the wire."""
        room = max_part - ENVELOPE_OVERHEAD
        if room < 64:
            raise ConfigError(f"broker payload limit {max_part} is too small")
        chunks = [body[i : i + room] for i in range(0, len(body), room)] or [b""]
        if len(chunks) > _MAX_PARTS:
            raise ConfigError(f"a body of {len(body)} bytes needs too many parts")
        aad = subject.encode()
        head = bytes((_VERSION,)) + frag_id
        tail = len(chunks).to_bytes(2, "big") + self.device_id.encode()
        return [
            seal_blob(self._key, head + i.to_bytes(2, "big") + tail + chunk, aad)
            for i, chunk in enumerate(chunks)
        ]

    def open(self, subject: str, data: bytes) -> SealedPart:
        """Authenticate and parse one part; SecurityError for anything else."""
        raw = open_blob(self._key, data, subject.encode())
        pos = 1 + _FRAG + 4
        if len(raw) < pos + _SENDER or raw[0] != _VERSION:
            raise SecurityError("relay envelope of an unknown version or truncated")
        frag_id = raw[1 : 1 + _FRAG]
        index = int.from_bytes(raw[1 + _FRAG : 3 + _FRAG], "big")
        count = int.from_bytes(raw[3 + _FRAG : pos], "big")
        if not index < count:
            raise SecurityError("relay envelope part index out of range")
        sender = raw[pos : pos + _SENDER]
        if len(sender) != _SENDER or not sender.isascii():
            raise SecurityError("relay envelope sender is malformed")
        return SealedPart(sender.decode("ascii"), frag_id, index, count, raw[pos + _SENDER :])


class Reassembler:
    """Joins the parts of split bodies; bounded (the oldest partial bodies are dropped first)."""

    def __init__(self, max_bytes: int = 64 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._partial: OrderedDict[tuple[str, bytes], dict[int, bytes]] = OrderedDict()
        self._counts: dict[tuple[str, bytes], int] = {}
        self._size = 0
        self.dropped = 0

    def add(self, part: SealedPart) -> bytes | None:
        """The whole body once its last part arrived, else None."""
        if part.count == 1:
            return part.chunk
        key = (part.sender, part.frag_id)
        if self._counts.setdefault(key, part.count) != part.count:
            raise SecurityError("relay envelope parts disagree on their count")
        parts = self._partial.setdefault(key, {})
        if part.index not in parts:
            parts[part.index] = part.chunk
            self._size += len(part.chunk)
        if len(parts) == part.count:
            self._forget(key)
            return b"".join(parts[i] for i in range(part.count))
        while self._size > self.max_bytes and self._partial:
            self._forget(next(iter(self._partial)))
            self.dropped += 1
        return None

    def _forget(self, key: tuple[str, bytes]) -> None:
        parts = self._partial.pop(key, {})
        self._counts.pop(key, None)
        self._size -= sum(len(c) for c in parts.values())
