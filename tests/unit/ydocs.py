"""Real pycrdt material shared by the codec and Yjs tests: lib0 varuints and edit sessions."""

from __future__ import annotations

import random

from pycrdt import Array, Doc, Map, Text, XmlElement, XmlFragment, XmlText


def uv(n: int) -> bytes:
    """Minimal unsigned LEB128, written independently of the codec."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def vs(s: str) -> bytes:
    raw = s.encode()
    return uv(len(raw)) + raw


def edit_session(seed: int, steps: int = 60) -> tuple[Doc, list[bytes]]:
    """Random edits of every content kind, with deletions; returns the doc and its updates."""
    rng = random.Random(seed)
    doc = Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    text, arr, mp = doc.get("t", type=Text), doc.get("a", type=Array), doc.get("m", type=Map)
    frag = doc.get("x", type=XmlFragment)
    values = [
        1,
        -7,
        2**40,
        1.5,
        "s",
        "ünï😀",
        True,
        False,
        None,
        b"\x00\xff",
        [1, [2]],
        {"k": {"n": 1}},
    ]
    rich = doc.get("r", type=Text)

    def offset(chars: int) -> int:
        # pycrdt Text indices count UTF-8 bytes; cut only on character boundaries.
        return len(str(text)[:chars].encode())

    for step in range(steps):
        op = rng.randrange(9)
        chars = len(str(text))
        with doc.transaction():
            if op == 0:
                where = offset(rng.randint(0, chars))
                text.insert(where, rng.choice(["ab", "é", "日本", "x😀y"]))
            elif op == 1 and chars > 2:
                start = rng.randrange(chars - 1)
                del text[offset(start) : offset(start + 1)]
            elif op == 2 and chars > 2:
                text.format(0, offset(1), {"bold": True})
            elif op == 3:
                rich.insert_embed(0, {"img": "a.png"})
                rich.insert(0, "ü", {"italic": True})
            elif op == 4:
                arr.append(rng.choice(values))
            elif op == 5 and len(arr):
                del arr[rng.randrange(len(arr))]
            elif op == 6:
                mp[f"k{step % 5}"] = rng.choice(values)
            elif op == 7 and len(mp):
                del mp[rng.choice(list(mp.keys()))]
            else:
                frag.children.append(XmlElement("p", {"class": "c"}, [XmlText("hi")]))
    with doc.transaction():
        mp["sub"] = Doc()
        arr.append(Map({"nested": "type"}))
        arr.append(Array(["nested", "array"]))
        mp["txt"] = Text("nested text")
    return doc, updates


def string_item(client: int, text: str, parent: tuple[int, int] | str, clock: int = 0) -> bytes:
    """A one-item Yjs update: `text` at (client, clock) under a root name or an item id."""
    by_id = not isinstance(parent, str)
    where = uv(0) + uv(parent[0]) + uv(parent[1]) if by_id else uv(1) + vs(str(parent))
    struct = b"\x04" + where + vs(text)  # String content, no origins
    return uv(1) + uv(1) + uv(client) + uv(clock) + struct + uv(0)
