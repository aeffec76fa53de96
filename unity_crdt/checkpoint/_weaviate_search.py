"""The passages of searchable docs in Weaviate: listed, upserted, deleted, and searched.

Separate from the checkpoint objects (`_weaviate_objects`): passages are a mutable index kept
beside the immutable objects, with their own ids (`passage_id`) and the app's vectors. Search
runs BM25 over the WORD-tokenised text, an exact near-vector query, or Weaviate's hybrid of
both; vector distances become scores (1 - distance) so that higher is better in every mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from weaviate.classes.data import DataObject
from weaviate.classes.query import Filter, MetadataQuery

from ._weaviate_client import PAGE, Connection
from .format import Passage, SearchHit, SearchQuery, passage_id

__all__ = ["passage_ids", "put_passages", "search"]


async def passage_ids(
    conn: Connection, tenant: str, doc_keys: Sequence[str]
) -> dict[str, set[str]]:
    """doc_key -> pids of its stored passages."""
    _, _, pas = await conn.handles(tenant)
    out: dict[str, set[str]] = {}
    keys = sorted(set(doc_keys))
    for i in range(0, len(keys), 20):
        where = Filter.by_property("doc_key").contains_any(keys[i : i + 20])
        for o in await conn.fetch_all(pas, "passage listing", where, ["doc_key", "pid"]):
            p = o.properties
            out.setdefault(str(p.get("doc_key")), set()).add(str(p.get("pid")))
    return out


async def put_passages(
    conn: Connection, tenant: str, add: Sequence[Passage], remove: Mapping[str, Sequence[str]]
) -> None:
    """Upsert `add` (with their vectors), then delete `remove`."""
    _, _, pas = await conn.handles(tenant, write=True)
    objs = [
        DataObject(
            properties={"doc_key": p.doc_key, "pid": p.pid, "text": p.text},
            uuid=passage_id(p.doc_key, p.pid),
            vector=list(p.vector) if p.vector is not None else None,
        )
        for p in add
    ]
    for i in range(0, len(objs), PAGE):
        result = await conn.call("passage write", pas.data.insert_many(objs[i : i + PAGE]))
        conn.check(result, "passage write")
    ids = sorted(passage_id(k, pid) for k, pids in remove.items() for pid in pids)
    for i in range(0, len(ids), PAGE):
        where = Filter.by_id().contains_any(ids[i : i + PAGE])
        await conn.call("passage delete", pas.data.delete_many(where=where))


async def search(conn: Connection, tenant: str, query: SearchQuery) -> list[SearchHit]:
    """BM25, near-vector or hybrid over the passages (searchable docs only)."""
    _, _, pas = await conn.handles(tenant)
    props = ["doc_key", "text"]
    if query.mode == "keyword":
        call = pas.query.bm25(
            query=query.text,
            query_properties=["text"],
            limit=query.limit,
            return_metadata=MetadataQuery(score=True),
            return_properties=props,
        )
    elif query.mode == "vector":
        call = pas.query.near_vector(
            near_vector=list(query.vector or ()),
            limit=query.limit,
            return_metadata=MetadataQuery(distance=True),
            return_properties=props,
        )
    else:
        call = pas.query.hybrid(
            query=query.text,
            vector=list(query.vector) if query.vector is not None else None,
            alpha=query.alpha,
            query_properties=["text"],
            limit=query.limit,
            return_metadata=MetadataQuery(score=True),
            return_properties=props,
        )
    res = await conn.call("search", call)
    hits = []
    for o in res.objects:
        p, meta = o.properties, o.metadata
        if query.mode == "vector":
            score = 1.0 - float(meta.distance if meta.distance is not None else 1.0)
        else:
            score = float(meta.score or 0.0)
        hits.append(SearchHit(str(p["doc_key"]), str(p.get("text") or ""), score))
    return hits
