"""Plain-text edits for GUI widgets: diffs, rebasing a widget's edit over peers' edits, and
applying an edit to a pycrdt Text with Python character indices. Sans-IO.

pycrdt Text offsets count UTF-8 bytes while widgets count characters; every function here
takes character indices and converts at the last moment.
"""

from __future__ import annotations

import pycrdt


def text_diff(old: str, new: str) -> tuple[int, int, str]:
    """The single edit turning `old` into `new`: (index, chars removed, text inserted)."""
    limit = min(len(old), len(new))
    start = 0
    while start < limit and old[start] == new[start]:
        start += 1
    end = 0
    while end < limit - start and old[-1 - end] == new[-1 - end]:
        end += 1
    return start, len(old) - start - end, new[start : len(new) - end]


def rebase_edit(before: str, after: str, current: str) -> list[tuple[int, int, str]]:
    """The edit `before` -> `after` moved onto `current` (changed by peers since `before`).

    Returns edits (index, chars removed, text inserted) to apply in order. Both changes are
    reduced to one edited region each; positions past the peers' region shift by its growth,
    and the local edit never removes what peers inserted (it did not see it): that matches how
    the CRDT merges a delete with a concurrent insert. Only texts are compared, so an edit in
    a run of repeated characters is taken where a minimal diff puts it (both sides deleting an
    "a" of "aaa" may look like the same "a"); a widget that reports its edits avoids that.
    """
    index, removed, inserted = text_diff(before, after)
    r_index, r_removed, r_inserted = text_diff(before, current)
    r_end, grown, p_end = (
        r_index + r_removed,
        len(r_inserted) - r_removed,
        r_index + len(r_inserted),
    )

    def moved(pos: int, inside: int) -> int:
        if pos <= r_index:
            return pos
        return pos + grown if pos >= r_end else inside

    start = moved(index, p_end)
    end = max(start, moved(index + removed, r_index))
    if start <= r_index < p_end <= end:  # spare the text the peers inserted in the range
        return [(p_end, end - p_end, ""), (start, r_index - start, inserted)]
    return [(start, end - start, inserted)]


def apply_edit(text: pycrdt.Text, current: str, index: int, removed: int, inserted: str) -> None:
    """One transaction: remove `removed` characters at `index`, then insert `inserted`."""
    if not removed and not inserted:
        return
    offset = utf8_offset(current, index)
    with text.doc.transaction():
        if removed:
            del text[offset : offset + len(current[index : index + removed].encode())]
        if inserted:
            text.insert(offset, inserted)


def utf8_offset(text: str, index: int) -> int:
    """pycrdt Text offsets count UTF-8 bytes; convert a Python character index."""
    return len(text[:index].encode())
