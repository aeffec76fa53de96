"""A CheckpointSink on plain files (atomic renames), for unit tests and offline use.

Layout under the root: `<tenant>/chunks/<object id>/<generation>.<index>` holds sealed chunks,
`<tenant>/manifests/<object id>.json` one manifest (written after its chunks, by rename).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ..errors import CheckpointError
from .format import Manifest, SearchHit, SinkRecord, check_tenant, snippet_of

__all__ = ["DirectorySink"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class DirectorySink:
    """CheckpointSink on plain files (atomic renames): unit tests and offline use."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _put(self, tenant: str, records: Sequence[SinkRecord]) -> None:
        base = self.root / check_tenant(tenant)
        for rec in records:
            m = rec.manifest
            for i, blob in enumerate(rec.chunks):
                self._write(base / "chunks" / m.object_id / f"{m.generation}.{i}", blob)
        for rec in records:
            m = rec.manifest
            doc = {
                "object_id": m.object_id,
                "doc_key": m.doc_key,
                "device": m.device,
                "generation": m.generation,
                "parts": m.parts,
                "nbytes": m.nbytes,
                "header": base64.b64encode(m.header).decode("ascii"),
                "text": rec.text,
            }
            self._write(base / "manifests" / f"{m.object_id}.json", json.dumps(doc).encode())
        for rec in records:
            m = rec.manifest
            for old in (base / "chunks" / m.object_id).iterdir():
                if not old.name.startswith(m.generation + "."):
                    old.unlink(missing_ok=True)

    def _load(self, tenant: str) -> list[tuple[Manifest, str | None]]:
        out = []
        folder = self.root / check_tenant(tenant) / "manifests"
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                d = json.loads(path.read_bytes())
                m = Manifest(
                    str(d["object_id"]),
                    str(d["doc_key"]),
                    str(d["device"]),
                    str(d["generation"]),
                    int(d["parts"]),
                    int(d["nbytes"]),
                    base64.b64decode(d["header"]),
                )
            except (ValueError, KeyError, TypeError):
                log.warning("checkpoint: manifest file %s is unreadable; skipped", path.name)
                continue
            out.append((m, d.get("text")))
        return out

    def _chunks(self, tenant: str, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        base = self.root / check_tenant(tenant) / "chunks"
        out: dict[str, list[bytes]] = {}
        for m in manifests:
            parts = []
            for i in range(m.parts):
                path = base / m.object_id / f"{m.generation}.{i}"
                if not path.exists():
                    break
                parts.append(path.read_bytes())
            out[m.object_id] = parts
        return out

    async def _run(self, fn: Callable[[], _T]) -> _T:
        try:
            return await asyncio.to_thread(fn)
        except OSError as exc:
            raise CheckpointError(f"checkpoint directory failed: {exc.strerror or exc}") from exc

    async def put(self, tenant: str, records: Sequence[SinkRecord]) -> None:
        """Store records (chunks, then manifests by atomic rename, then stale chunks removed)."""
        await self._run(lambda: self._put(tenant, records))

    async def manifests(self, tenant: str, doc_keys: Sequence[str] | None = None) -> list[Manifest]:
        """Every manifest of the tenant, or only those of the given doc keys."""
        rows = await self._run(lambda: self._load(tenant))
        keys = None if doc_keys is None else set(doc_keys)
        return [m for m, _ in rows if keys is None or m.doc_key in keys]

    async def chunks(self, tenant: str, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        """object_id -> its chunks in index order."""
        return await self._run(lambda: self._chunks(tenant, manifests))

    async def search(self, tenant: str, query: str, limit: int) -> list[SearchHit]:
        """A naive word-count search (the Weaviate sink uses BM25)."""
        words = [w for w in query.lower().split() if w]
        hits = []
        for m, text in await self._run(lambda: self._load(tenant)):
            if text and words:
                score = float(sum(text.lower().count(w) for w in words))
                if score:
                    hits.append(SearchHit(m.doc_key, m.device, score, snippet_of(text, query)))
        return sorted(hits, key=lambda h: -h.score)[:limit]

    async def close(self) -> None:
        """Nothing to release."""
