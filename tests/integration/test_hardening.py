"""Issue #11: each weakness found by attacking live nodes, as a test that failed before its fix.

Everything runs on 127.0.0.0/8 with real nodes, sockets, files and processes; the test names
carry the finding's number (F1..F15) so docs/security.md can point at them.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pycrdt
import pytest
from meshkit import SECRET, Attacker, NodeFactory, eventually, string_item

from unity_crdt import Node
from unity_crdt.checkpoint.directory import DirectorySink
from unity_crdt.checkpoint.policy import Checkpointer
from unity_crdt.crypto.keys import derive_group_keys
from unity_crdt.sync import codec
from unity_crdt.sync.yprotocol import encode_awareness


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


# ---------------------------------------------------------------- F4


async def send_made_up_presence(m: Attacker, count: int, tag: str = "") -> None:
    """A member's presence for `count` doc names nobody holds, in batches of 1,000."""
    for start in range(0, count, 1000):
        parts = [
            codec.encode(
                codec.Awareness(f"made-up{tag}-{i}", encode_awareness([(i + 1, 0, b'{"x":1}')]))
            )
            for i in range(start, min(start + 1000, count))
        ]
        await m.send_message(codec.encode_batch(parts))


async def test_f4_presence_for_made_up_docs_grows_no_table_and_goes_nowhere(
    make_node: NodeFactory,
) -> None:
    a = await make_node("alice")
    b = await make_node("bob", peers=(a.url,))
    await b.wait_for_peers(1)
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, "held by both")
    await eventually(lambda: text(b, "notes") == "held by both", 3.0, "notes synced")
    rss0 = psutil.Process(os.getpid()).memory_info().rss
    m = await Attacker.connect(a.url)
    try:
        await m.send_message(codec.encode(codec.Hello(1, {})))
        await send_made_up_presence(m, 20_000)
        # Presence in a doc both hold still crosses the mesh, after all the junk.
        real = encode_awareness([(99, 0, b'{"user":"mallory"}')])
        await m.send_message(codec.encode(codec.Awareness("notes", real)))
        await eventually(lambda: 99 in b.presence("notes"), 5.0, "real presence relayed")
    finally:
        await m.channel.close()
    assert all(b.presence(f"made-up-{i}") == {} for i in range(20_000)), "junk was relayed"
    assert len(b._presence) == 1
    assert len(a._presence) <= 64 + 1  # made-up names kept aside, oldest dropped
    assert psutil.Process(os.getpid()).memory_info().rss - rss0 < 30 * 2**20
