"""Issue #11: each weakness found by attacking live nodes, as a test that failed before its fix.

Everything runs on 127.0.0.0/8 with real nodes, sockets, files and processes; the test names
carry the finding's number (F1..F15) so docs/security.md can point at them.
"""

from __future__ import annotations

from pathlib import Path

import pycrdt
import pytest
from meshkit import SECRET, NodeFactory, string_item

from unity_crdt import Node
from unity_crdt.checkpoint.directory import DirectorySink
from unity_crdt.checkpoint.policy import Checkpointer
from unity_crdt.crypto.keys import derive_group_keys


def text(node: Node, doc: str) -> str:
    return str(node.doc(doc).get("t", type=pycrdt.Text))


async def write_checkpoints(sink: DirectorySink, device: str, states: dict[str, bytes]) -> None:
    """Checkpoint `states` as device `device` of the test group (a member can write anything)."""
    cp = Checkpointer(derive_group_keys(SECRET), device, sink, states.__getitem__)
    for doc in states:
        cp.mark_dirty(doc)
    await cp.checkpoint()


# ---------------------------------------------------------------- F3


async def test_f3_a_poisoned_checkpoint_stops_neither_start_nor_the_other_docs(
    tmp_path: Path, make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    store = DirectorySink(tmp_path / "store")
    await write_checkpoints(
        store,
        "a" * 26,
        {
            "good": string_item(1, "fine", "t"),
            # One state whose item sits under a string item: the guard refuses it.
            "guarded": pycrdt.merge_updates(
                string_item(1, "abc", "t"), string_item(2, "x", (1, 0))
            ),
            "split": string_item(1, "abc", "t"),
        },
    )
    # Another member's state hangs an item under device a's string: only pycrdt sees both.
    await write_checkpoints(store, "m" * 26, {"split": string_item(2, "x", (1, 0))})
    node = await make_node(
        "fresh", checkpoint_url=f"dir://{tmp_path / 'store'}", restore_on_start=True
    )
    assert text(node, "good") == "fine"
    assert text(node, "split") == "abc"
    assert "guarded" not in node.docs
    assert "could not be merged" in caplog.text
    # An explicit restore goes through every doc the same way.
    assert sorted(await node.restore()) == ["good", "guarded", "split"]
    assert text(node, "good") == "fine"
