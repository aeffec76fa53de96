"""Passage embeddings: calling the app's embedder, and the local passage-hash -> vector map.

The embedder is the app's (`NodeConfig.embedder`): a sync or async callable
`list[str] -> list[list[float]]`. Sync ones run in a worker thread so the loop never blocks.
Vectors are remembered by passage hash in a file in the cache dir, so a passage is embedded
once, and again only when its text changes. The file starts with the vector of a fixed probe
text: when the embedder answers the probe differently (another model), the map is dropped.

File format: records of `sha256(text)[:16]` (16 bytes), `dim` (u32 LE), `dim` float32 LE.
A torn or damaged tail (a crash mid-append) is cut off at the last whole record.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import struct
from array import array
from collections.abc import Sequence
from pathlib import Path

from ..config import Embedder
from ..errors import CheckpointError

__all__ = ["VectorCache", "embed"]

log = logging.getLogger(__name__)

PROBE = "unity-crdt embedder probe: the quick brown fox jumps over the lazy dog"
_BATCH = 64
_HEAD = struct.Struct("<16sI")


def _key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


async def embed(embedder: Embedder, texts: Sequence[str]) -> list[tuple[float, ...]]:
    """Vectors for `texts` from the app's embedder, in batches, checked for shape."""
    out: list[tuple[float, ...]] = []
    for i in range(0, len(texts), _BATCH):
        batch = list(texts[i : i + _BATCH])
        try:
            if inspect.iscoroutinefunction(embedder) or inspect.iscoroutinefunction(
                getattr(embedder, "__call__", None)  # noqa: B004 - async callable objects
            ):
                result = await embedder(batch)  # type: ignore[misc]
            else:
                result = await asyncio.to_thread(embedder, batch)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            raise CheckpointError(f"the embedder failed: {exc or type(exc).__name__}") from exc
        out += _checked(result, len(batch), len(out[0]) if out else None)
    return out


def _checked(result: object, n: int, dim: int | None) -> list[tuple[float, ...]]:
    if not isinstance(result, Sequence) or len(result) != n:
        raise CheckpointError(f"the embedder must return {n} vectors for {n} texts")
    vectors = []
    for v in result:
        try:
            vec = tuple(float(x) for x in v)
        except (TypeError, ValueError):
            raise CheckpointError("the embedder returned a vector that is not numbers") from None
        if not vec or (dim is not None and len(vec) != dim):
            raise CheckpointError("the embedder returned vectors of different sizes")
        if not all(math.isfinite(x) for x in vec):
            raise CheckpointError("the embedder returned a vector with NaN or infinity")
        dim = len(vec)
        vectors.append(vec)
    return vectors


class VectorCache:
    """Passage vectors by text hash, kept in one append-only file (or only in memory)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._vectors: dict[bytes, tuple[float, ...]] = {}
        self._probe: tuple[float, ...] | None = None
        self._checked = False
        self._loaded = False
        self.embedded = 0  # texts sent to the embedder by this cache (for tests and stats)

    def __len__(self) -> int:
        return len(self._vectors)

    def _load(self) -> None:
        self._loaded = True
        if self.path is None or not self.path.exists():
            return
        data = self.path.read_bytes()
        pos, good = 0, 0
        while pos + _HEAD.size <= len(data):
            key, dim = _HEAD.unpack_from(data, pos)
            end = pos + _HEAD.size + 4 * dim
            if dim == 0 or end > len(data):
                break
            vec = tuple(array("f", data[pos + _HEAD.size : end]))
            if self._probe is None:
                self._probe = vec  # the first record is always the probe
            else:
                self._vectors[key] = vec
            pos = good = end
        if good != len(data):
            log.warning("passage vector cache %s had a damaged tail; cut it off", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def _append(self, records: list[tuple[bytes, tuple[float, ...]]], reset: bool) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blob = b"".join(
            _HEAD.pack(key, len(vec)) + array("f", vec).tobytes() for key, vec in records
        )
        with open(self.path, "wb" if reset else "ab") as f:
            f.write(blob)

    async def vectors(self, embedder: Embedder, texts: Sequence[str]) -> list[tuple[float, ...]]:
        """A vector per text: remembered ones from the map, the others from the embedder."""
        if not self._loaded:
            await asyncio.to_thread(self._load)
        records: list[tuple[bytes, tuple[float, ...]]] = []
        reset = False
        if not self._checked:  # once per run: is this still the embedder that filled the map?
            (probe,) = await embed(embedder, [PROBE])
            if self._probe is None or not _same(self._probe, probe):
                if self._vectors:
                    log.info("the embedder changed: forgetting %d vectors", len(self._vectors))
                self._vectors.clear()
                self._probe, reset = probe, True
                records.append((_key(PROBE), probe))
            self._checked = True
        missing = sorted({t for t in texts if _key(t) not in self._vectors})
        fresh = await embed(embedder, missing) if missing else []
        self.embedded += len(missing)
        new = [(_key(t), v) for t, v in zip(missing, fresh, strict=True)]
        self._vectors.update(new)
        records += new
        if records:
            try:
                await asyncio.to_thread(self._append, records, reset)
            except OSError as exc:  # a cache, not a record: embedding again later is fine
                log.warning("could not save passage vectors to %s: %s", self.path, exc)
        return [self._vectors[_key(t)] for t in texts]


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(
        abs(x - y) <= 1e-4 * (1 + abs(x)) for x, y in zip(a, b, strict=True)
    )
