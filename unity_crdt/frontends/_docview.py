"""A doc as plain JSON-able values, and one-transaction edits of it. Sans-IO (pycrdt only).

The control API (`frontends.control`) serves these projections and applies these edits on the
node's loop. Doc roots received from peers are untyped until someone names their type, and a
client cannot guess it: the projection shows typed roots and lists the others under
"untyped"; a (kind, root) pair types a root (Text -> str, Map -> dict, Array -> list).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pycrdt

from ..errors import ControlError, UnityCrdtError

__all__ = ["KINDS", "Conflict", "Types", "apply_edit", "project"]

KINDS: dict[str, type[Any]] = {"text": pycrdt.Text, "map": pycrdt.Map, "array": pycrdt.Array}
Types = Sequence[tuple[str, str]]  # (kind, root) pairs


class Conflict(UnityCrdtError):
    """A request contradicts the doc (e.g. a Map root edited as Text): HTTP 409."""


def _plain(value: object) -> Any:
    if isinstance(value, pycrdt.Text):
        return str(value)
    if isinstance(value, pycrdt.Map | pycrdt.Array):
        return value.to_py()
    return str(value)  # XML types: their string form


def _typed_root(doc: pycrdt.Doc[Any], root: str, kind: str) -> Any:
    """Root `root` as `kind`, refusing to re-type a root this node already knows otherwise."""
    cls = KINDS.get(kind)
    if cls is None:
        raise ControlError(f"unknown root type {kind!r}: use one of {', '.join(KINDS)}")
    if not isinstance(root, str) or not root:
        raise ControlError("a root name must be a non-empty string")
    known = dict(doc.items()).get(root)
    if known is not None and not isinstance(known, cls):
        raise Conflict(f"root {root!r} is a {type(known).__name__} on this node, not a {kind}")
    return doc.get(root, type=cls)


def project(doc: pycrdt.Doc[Any], types: Types = ()) -> dict[str, Any]:
    """Typed roots as plain values, after typing the (kind, root) pairs; untyped roots listed."""
    for kind, root in types:
        _typed_root(doc, root, kind)
    roots: dict[str, Any] = {}
    untyped: list[str] = []
    for key, value in sorted(doc.items()):
        if value is None:
            untyped.append(key)
        else:
            roots[key] = _plain(value)
    return {"roots": roots, "untyped": untyped}


def apply_edit(doc: pycrdt.Doc[Any], edit: Mapping[str, Any]) -> None:
    """Apply one edit in one transaction.

    {"kind": "text", "root": R, "value": str, "append": bool}   replace (or append to) a Text
    {"kind": "map", "root": R, "key": K, "value": JSON}         set one key of a Map
    {"kind": "map", "root": R, "key": K, "delete": true}        delete one key of a Map
    {"kind": "array", "root": R, "value": JSON}                 append one item to an Array
    """
    kind, root = edit.get("kind"), edit.get("root")
    if not isinstance(kind, str) or not isinstance(root, str):
        raise ControlError("an edit needs a 'kind' and a 'root'")
    target = _typed_root(doc, root, kind)
    with doc.transaction():
        if kind == "text":
            value = edit.get("value")
            if not isinstance(value, str):
                raise ControlError("a text edit needs a string 'value'")
            if not edit.get("append"):
                target.clear()
            target += value
        elif kind == "map":
            key = edit.get("key")
            if not isinstance(key, str) or not key:
                raise ControlError("a map edit needs a non-empty string 'key'")
            if edit.get("delete"):
                if key in target:
                    del target[key]
            else:
                target[key] = edit.get("value")
        else:
            target.append(edit.get("value"))
