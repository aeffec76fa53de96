"""Checkpoint objects in Weaviate: manifests and chunks written, listed, read, confirmed, deleted.

Separate from the connection (`_weaviate_client`) and the passages (`_weaviate_search`): this
is where the CheckpointSink's object rules meet Weaviate's limits. Chunks are written before
their manifest and deleted after it, so no reader sees half an object; every request stays
under the ~100 MiB gRPC cap (`PUT_BUDGET` of sealed bytes, base64 included) and every query
passes a limit or pages. The tenant's handles are (manifests, chunks, passages), in the order
`checkpoint.weaviate` names its collections.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from weaviate.classes.data import DataObject
from weaviate.classes.query import Filter

from ..errors import CheckpointError
from ._weaviate_client import PAGE, Connection
from .format import PUT_BUDGET, Manifest, SinkRecord, chunk_id

__all__ = ["chunks", "confirm", "delete", "manifests", "put"]

_MANIFEST_PROPS = ["doc_key", "device", "gen", "parts", "nbytes", "blob"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return base64.b64decode(str(value), validate=True)


async def put(conn: Connection, tenant: str, records: Sequence[SinkRecord]) -> None:
    """Store new objects: all chunks first (size-bounded batches), then the manifests."""
    man, chk, _ = await conn.handles(tenant, write=True)
    batch: list[DataObject[Any, Any]] = []
    size = 0

    async def flush() -> None:
        nonlocal size
        result = await conn.call("chunk write", chk.data.insert_many(list(batch)))
        conn.check(result, "chunk write")
        batch.clear()
        size = 0

    for rec in records:
        m = rec.manifest
        for i, blob in enumerate(rec.chunks):
            if batch and size + len(blob) > PUT_BUDGET:
                await flush()
            props = {"owner": m.object_id, "gen": m.generation, "idx": i, "blob": _b64(blob)}
            batch.append(DataObject(properties=props, uuid=chunk_id(m.object_id, m.generation, i)))
            size += len(blob)
    if batch:
        await flush()
    objects = []
    for rec in records:
        m = rec.manifest
        fields: dict[str, Any] = {
            "doc_key": m.doc_key,
            "device": m.device,
            "gen": m.generation,
            "parts": m.parts,
            "nbytes": m.nbytes,
            "blob": _b64(m.header),
        }
        objects.append(DataObject(properties=fields, uuid=m.object_id))
    result = await conn.call("manifest write", man.data.insert_many(objects))
    conn.check(result, "manifest write")


async def manifests(
    conn: Connection, tenant: str, doc_keys: Sequence[str] | None = None
) -> list[Manifest]:
    """Every manifest of the tenant (cursor-paged), or only those of the given doc keys."""
    # Listing starts every checkpoint and restore: probe first, as before a write.
    man, _, _ = await conn.handles(tenant, write=True)
    objects: list[Any] = []
    if doc_keys is None:
        after = None
        while True:
            res = await conn.call(
                "manifest listing",
                man.query.fetch_objects(
                    limit=PAGE,
                    after=after,
                    return_properties=_MANIFEST_PROPS,
                ),
            )
            objects.extend(res.objects)
            if len(res.objects) < PAGE:
                break
            after = res.objects[-1].uuid
    else:
        keys = sorted(set(doc_keys))
        for i in range(0, len(keys), 100):
            where = Filter.by_property("doc_key").contains_any(keys[i : i + 100])
            objects += await conn.fetch_all(man, "manifest listing", where, _MANIFEST_PROPS)
    out = []
    for o in objects:
        p = o.properties
        try:
            out.append(
                Manifest(
                    str(o.uuid),
                    str(p["doc_key"]),
                    str(p["device"]),
                    str(p["gen"]),
                    int(p["parts"]),
                    int(p["nbytes"]),
                    _unb64(p["blob"]),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue  # an object we did not write; Checkpointer never sees it
    return out


async def chunks(
    conn: Connection, tenant: str, manifests: Sequence[Manifest]
) -> dict[str, list[bytes]]:
    """object_id -> its chunks in index order, fetched by id in size-bounded batches."""
    _, chk, _ = await conn.handles(tenant)
    wanted: list[tuple[str, int, str]] = []  # (chunk uuid, approx size, owner)
    for m in manifests:
        each = m.nbytes // max(m.parts, 1) + 64
        wanted += [
            (chunk_id(m.object_id, m.generation, i), each, m.object_id) for i in range(m.parts)
        ]
    found: dict[str, dict[int, bytes]] = {m.object_id: {} for m in manifests}
    gens = {m.object_id: m.generation for m in manifests}
    i = 0
    while i < len(wanted):
        ids: list[str] = []
        size = 0
        while i < len(wanted) and (not ids or size + wanted[i][1] <= PUT_BUDGET):
            ids.append(wanted[i][0])
            size += wanted[i][1]
            i += 1
        res = await conn.call(
            "chunk read",
            chk.query.fetch_objects(
                filters=Filter.by_id().contains_any(ids),
                limit=len(ids),
                return_properties=["owner", "gen", "idx", "blob"],
            ),
        )
        for o in res.objects:
            p = o.properties
            owner = str(p.get("owner"))
            if owner in found and p.get("gen") == gens[owner]:
                try:
                    found[owner][int(p["idx"])] = _unb64(p["blob"])
                except (KeyError, TypeError, ValueError):
                    continue
    out: dict[str, list[bytes]] = {}
    for owner, parts in found.items():
        seq: list[bytes] = []
        while len(seq) in parts:
            seq.append(parts[len(seq)])
        out[owner] = seq
    return out


async def confirm(conn: Connection, tenant: str, manifests: Sequence[Manifest]) -> set[str]:
    """The object ids among `manifests` whose manifest a QUORUM read finds now."""
    man, _, _ = await conn.handles(tenant)
    ids = sorted({m.object_id for m in manifests})
    found: set[str] = set()
    for i in range(0, len(ids), PAGE):
        part = ids[i : i + PAGE]
        res = await conn.call(
            "confirm",
            man.query.fetch_objects(
                filters=Filter.by_id().contains_any(part),
                limit=len(part),
                return_properties=["gen"],
            ),
        )
        found |= {str(o.uuid) for o in res.objects}
    return found


async def delete(conn: Connection, tenant: str, manifests: Sequence[Manifest]) -> None:
    """Delete objects: their manifests first (readers stop seeing them), then chunks."""
    if not manifests:
        return
    man, chk, _ = await conn.handles(tenant, write=True)
    objects = sorted({m.object_id for m in manifests})
    ids_of_chunks = sorted(
        {chunk_id(m.object_id, m.generation, i) for m in manifests for i in range(m.parts)}
    )
    for col, ids, what in ((man, objects, "manifest delete"), (chk, ids_of_chunks, "chunk delete")):
        for i in range(0, len(ids), PAGE):
            where = Filter.by_id().contains_any(ids[i : i + PAGE])
            result = await conn.call(what, col.data.delete_many(where=where))
            if getattr(result, "failed", 0):
                raise CheckpointError(f"Weaviate {what}: {result.failed} object(s) failed")
