"""A CheckpointSink on plain files (atomic renames), for unit tests and offline use.

Layout under the root, per tenant: `chunks/<object id>/<generation>.<index>` holds sealed
chunks, `manifests/<object id>.json` one manifest (written after its chunks, by rename), and
`passages/<doc key>/<pid>.json` the passages of searchable docs (text and vector).
Search is naive: word counts for keywords, cosine similarity for vectors, and for hybrid both
scaled to 0..1 and mixed by `alpha` (the way Weaviate's relative-score fusion does).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from ..errors import CheckpointError
from .format import Manifest, Passage, SearchHit, SearchQuery, SinkRecord, check_tenant

__all__ = ["DirectorySink"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _scaled(scores: dict[str, float]) -> dict[str, float]:
    if not scores:
        return {}
    low, high = min(scores.values()), max(scores.values())
    return {k: (v - low) / (high - low) if high > low else 1.0 for k, v in scores.items()}


class DirectorySink:
    """CheckpointSink on plain files (atomic renames): unit tests and offline use."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data)}.tmp")
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
            }
            self._write(base / "manifests" / f"{m.object_id}.json", json.dumps(doc).encode())

    def _load(self, tenant: str) -> list[Manifest]:
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
            except FileNotFoundError:
                continue  # deleted while we listed
            except (ValueError, KeyError, TypeError):
                log.warning("checkpoint: manifest file %s is unreadable; skipped", path.name)
                continue
            out.append(m)
        return out

    def _chunks(self, tenant: str, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        base = self.root / check_tenant(tenant) / "chunks"
        out: dict[str, list[bytes]] = {}
        for m in manifests:
            parts = []
            for i in range(m.parts):
                try:
                    parts.append((base / m.object_id / f"{m.generation}.{i}").read_bytes())
                except FileNotFoundError:
                    break
            out[m.object_id] = parts
        return out

    def _delete(self, tenant: str, manifests: Sequence[Manifest]) -> None:
        base = self.root / check_tenant(tenant)
        for m in manifests:
            (base / "manifests" / f"{m.object_id}.json").unlink(missing_ok=True)
            shutil.rmtree(base / "chunks" / m.object_id, ignore_errors=True)

    def _passages(self, tenant: str, doc_keys: Sequence[str] | None) -> list[Passage]:
        base = self.root / check_tenant(tenant) / "passages"
        folders = (
            [base / k for k in doc_keys]
            if doc_keys is not None
            else (sorted(base.iterdir()) if base.is_dir() else [])
        )
        out = []
        for folder in folders:
            for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                try:
                    d = json.loads(path.read_bytes())
                    vec = d.get("vector")
                    out.append(
                        Passage(
                            folder.name,
                            path.stem,
                            str(d["text"]),
                            None if vec is None else tuple(float(x) for x in vec),
                        )
                    )
                except FileNotFoundError:
                    continue
                except (ValueError, KeyError, TypeError):
                    log.warning("checkpoint: passage file %s is unreadable; skipped", path.name)
        return out

    def _put_passages(
        self, tenant: str, add: Sequence[Passage], remove: Mapping[str, Sequence[str]]
    ) -> None:
        base = self.root / check_tenant(tenant) / "passages"
        for p in add:
            body = {"text": p.text, "vector": None if p.vector is None else list(p.vector)}
            self._write(base / p.doc_key / f"{p.pid}.json", json.dumps(body).encode())
        for doc_key, pids in remove.items():
            for pid in pids:
                (base / doc_key / f"{pid}.json").unlink(missing_ok=True)

    def _search(self, tenant: str, q: SearchQuery) -> list[SearchHit]:
        passages = {f"{p.doc_key}/{p.pid}": p for p in self._passages(tenant, None)}
        words = [w for w in q.text.lower().split() if w]
        keyword = {
            k: float(sum(p.text.lower().count(w) for w in words)) for k, p in passages.items()
        }
        keyword = {k: v for k, v in keyword.items() if v > 0}
        vector = {}
        if q.vector is not None:
            vector = {
                k: _cosine(q.vector, p.vector)
                for k, p in passages.items()
                if p.vector is not None and len(p.vector) == len(q.vector)
            }
        if q.mode == "keyword":
            scores = keyword
        elif q.mode == "vector":
            scores = vector
        else:
            kw, vec = _scaled(keyword), _scaled(vector)
            scores = {
                k: (1 - q.alpha) * kw.get(k, 0.0) + q.alpha * vec.get(k, 0.0)
                for k in kw.keys() | vec.keys()
            }
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[: q.limit]
        return [SearchHit(passages[k].doc_key, passages[k].text, score) for k, score in best]

    async def _run(self, fn: Callable[[], _T]) -> _T:
        try:
            return await asyncio.to_thread(fn)
        except OSError as exc:
            raise CheckpointError(f"checkpoint directory failed: {exc.strerror or exc}") from exc

    async def put(self, tenant: str, records: Sequence[SinkRecord]) -> None:
        """Store new objects (chunks, then manifests by atomic rename)."""
        await self._run(lambda: self._put(tenant, records))

    async def manifests(self, tenant: str, doc_keys: Sequence[str] | None = None) -> list[Manifest]:
        """Every manifest of the tenant, or only those of the given doc keys."""
        rows = await self._run(lambda: self._load(tenant))
        keys = None if doc_keys is None else set(doc_keys)
        return [m for m in rows if keys is None or m.doc_key in keys]

    async def chunks(self, tenant: str, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        """object_id -> its chunks in index order."""
        return await self._run(lambda: self._chunks(tenant, manifests))

    async def confirm(self, tenant: str, manifests: Sequence[Manifest]) -> set[str]:
        """The object ids whose manifest file exists now."""
        base = self.root / check_tenant(tenant) / "manifests"
        ids = [m.object_id for m in manifests]
        return await self._run(lambda: {i for i in ids if (base / f"{i}.json").exists()})

    async def delete(self, tenant: str, manifests: Sequence[Manifest]) -> None:
        """Remove objects: the manifest file first, then the chunk folder."""
        await self._run(lambda: self._delete(tenant, manifests))

    async def passage_ids(self, tenant: str, doc_keys: Sequence[str]) -> dict[str, set[str]]:
        """doc_key -> pids of its stored passages."""
        out: dict[str, set[str]] = {}
        for p in await self._run(lambda: self._passages(tenant, doc_keys)):
            out.setdefault(p.doc_key, set()).add(p.pid)
        return out

    async def put_passages(
        self, tenant: str, add: Sequence[Passage], remove: Mapping[str, Sequence[str]]
    ) -> None:
        """Write `add`, then unlink `remove`."""
        await self._run(lambda: self._put_passages(tenant, add, remove))

    async def search(self, tenant: str, query: SearchQuery) -> list[SearchHit]:
        """Naive keyword, cosine or mixed scores over every passage (Weaviate does it right)."""
        return await self._run(lambda: self._search(tenant, query))

    async def close(self) -> None:
        """Nothing to release."""
