"""Checkpoint objects sealed and opened: ids, chunks, AEAD, and every check on a manifest.

Separate from the policy (`checkpoint.policy`) because it is the object *format*: what any
device of the group must produce and accept, whatever it decides to write, keep or read.

Every write is a new, immutable *object* named by (group, doc, device, random *generation*),
so concurrent checkpoints never overwrite each other (stores like Weaviate have no
compare-and-swap). An object is a *manifest* plus its *chunks*: the state is split into
`chunk_size` parts, each sealed with ChaCha20-Poly1305 under the group's checkpoint key, and the
manifest carries a sealed header (doc name, device id, size, SHA-256, the state vector and
delete set saying exactly which items the state holds, the device's rising write counter for
the doc, and the chunk size). Chunks are stored first and the
manifest LAST, so a reader never sees a half-written object. The AEAD associated data binds
tenant, doc key, device tag, generation and chunk index, so swapping chunks or objects is
detected.

What a store sees in clear: the tenant (a keyed hash of the group), the object id (keyed hash
of doc name + device + generation), the doc key (keyed hash of the doc name), a device tag
(keyed hash of the device id), the generation, counts and sizes, and - only for docs the app
marks searchable - their passages (paragraphs) in clear with their vectors. Doc names never
leave the sealed header.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Sequence

from ..crypto.keys import SEAL_OVERHEAD, GroupKeys, open_blob, seal_blob
from ..errors import CheckpointError, SecurityError
from ._ledger import Ledger
from .format import (
    Header,
    Manifest,
    SinkRecord,
    check_tenant,
    decode_header,
    encode_header,
    record_aad,
)

__all__ = ["MAX_HEADER_BYTES", "Sealer"]

MAX_HEADER_BYTES = 4096  # a sealed header is well under 1 KiB plus the doc name (<= 255)


class Sealer:
    """Seals doc states as objects of `device_id` and opens any object of the group.

    The write counter sealed into each header comes from `clock` and the `ledger` of writes
    seen, so it rises even across restarts.
    """

    def __init__(
        self,
        keys: GroupKeys,
        device_id: str,
        ledger: Ledger,
        *,
        chunk_size: int,
        clock: Callable[[], float],
    ) -> None:
        self._keys = keys
        self.device_id = device_id
        self.tenant = check_tenant(keys.tenant)
        self.chunk_size = chunk_size
        self._ledger = ledger
        self._clock = clock

    # ---- ids -------------------------------------------------------------------------------
    def doc_key(self, doc: str) -> str:
        """The keyed hash that stands for `doc` in the store."""
        return self._keys.object_key(doc).hex()

    def device_tag(self, device_id: str) -> str:
        """The keyed tag that stands for a device in the store."""
        # "\x01" cannot start a doc name, so a tag never equals a doc key or object id.
        return self._keys.object_key("\x01device", device_id).hex()[:32]

    def object_id(self, doc: str, device_id: str | None = None, generation: str = "") -> str:
        """The store id of one write of (doc, device): a UUID made of the keyed hash."""
        key = self._keys.object_key(doc, device_id or self.device_id, generation)
        return str(uuid.UUID(bytes=key[:16], version=4))

    def _aad(self, kind: bytes, doc_key: str, device: str, gen: str, index: int, n: int) -> bytes:
        return record_aad(self.tenant, kind, doc_key, device, gen, index, n)

    # ---- sealing and opening ---------------------------------------------------------------
    def seal(
        self, doc: str, state: bytes, sv: bytes | None = None, ds: bytes | None = None
    ) -> SinkRecord:
        """Encrypt one doc state as a new object of this device (chunked)."""
        key = self._keys.checkpoint_key
        doc_key, device, gen = self.doc_key(doc), self.device_tag(self.device_id), os.urandom(8)
        generation = gen.hex()
        pieces = [state[i : i + self.chunk_size] for i in range(0, len(state), self.chunk_size)]
        pieces = pieces or [b""]
        n = len(pieces)
        chunks = tuple(
            seal_blob(key, p, self._aad(b"C", doc_key, device, generation, i, n))
            for i, p in enumerate(pieces)
        )
        # Above every write seen and above the clock in ms: it rises even if the ledger is lost.
        seq = max(int(self._clock() * 1000), self._ledger.newest(doc_key, device) + 1)
        header = encode_header(doc, self.device_id, state, sv, ds, seq=seq, chunk=self.chunk_size)
        sealed = seal_blob(key, header, self._aad(b"H", doc_key, device, generation, -1, n))
        oid = self.object_id(doc, self.device_id, generation)
        manifest = Manifest(oid, doc_key, device, generation, n, sum(map(len, chunks)), sealed)
        return SinkRecord(manifest, chunks)

    def header(self, m: Manifest) -> Header:
        """Open and check a manifest's sealed header, and the clear fields sinks fetch by
        against it; SecurityError if it was tampered with or is not this object's."""
        if len(m.header) > MAX_HEADER_BYTES:
            raise SecurityError("sealed header is implausibly large")
        aad = self._aad(b"H", m.doc_key, m.device, m.generation, -1, m.parts)
        head = decode_header(open_blob(self._keys.checkpoint_key, m.header, aad))
        if (
            self.doc_key(head.doc) != m.doc_key
            or self.device_tag(head.device) != m.device
            or self.object_id(head.doc, head.device, m.generation) != m.object_id
        ):
            raise SecurityError("header does not belong to this object (swapped)")
        expected = head.expected_parts()
        if (expected is not None and m.parts != expected) or not 1 <= m.parts <= max(1, head.size):
            raise SecurityError(f"{m.parts} parts do not fit a state of {head.size} bytes")
        if expected is not None and m.nbytes != head.size + m.parts * SEAL_OVERHEAD:
            raise SecurityError("the sealed size does not match the header")
        return head

    def open(self, m: Manifest, chunks: Sequence[bytes]) -> tuple[str, bytes]:
        """Verify and decrypt one object -> (doc name, state); SecurityError if tampered."""
        key = self._keys.checkpoint_key
        head = self.header(m)
        if len(chunks) != m.parts:
            raise CheckpointError(f"incomplete: {len(chunks)} of {m.parts} chunks present")
        state = b"".join(
            open_blob(key, c, self._aad(b"C", m.doc_key, m.device, m.generation, i, m.parts))
            for i, c in enumerate(chunks)
        )
        if len(state) != head.size or hashlib.sha256(state).hexdigest() != head.sha256:
            raise SecurityError("state does not match its header digest")
        return head.doc, state
