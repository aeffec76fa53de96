"""Commit notices over the mesh: a checkpoint tells linked peers, and a peer whose copy is
behind pulls that doc from the sink at once (pull_interval=None: nothing else would)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pycrdt
from meshkit import Attacker, NodeFactory, eventually

from unity_crdt.sync import codec
from unity_crdt.sync.codec import PROTOCOL_VERSION, Hello, Notice


async def test_checkpoint_sends_a_notice_and_a_notice_makes_a_behind_peer_pull(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    sink = f"dir://{tmp_path / 'sink'}"
    kw = dict(checkpoint_url=sink, pull_interval=None, checkpoint_interval=3600.0)
    a = await make_node("a", **kw)
    c = await make_node("c", **kw)  # never linked to a: only a notice can bring a's content
    member = await Attacker.connect(a.url)  # a raw member of the group, linked to a
    await member.send_message(codec.encode(Hello(PROTOCOL_VERSION, {})))
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, "checkpointed at a")
    await a.checkpoint()

    notice = None
    async with asyncio.timeout(5.0):
        while notice is None:
            data = member.session.open(await member.channel.recv())
            for msg in codec.flatten([codec.decode(data)] if data else []):
                if isinstance(msg, Notice):
                    notice = msg
    assert notice.doc == "notes" and notice.device == a.device_id
    assert notice.state_vector == a.doc("notes").get_state()

    relay = await Attacker.connect(c.url)  # the member passes the notice on to c
    await relay.send_message(codec.encode(Hello(PROTOCOL_VERSION, {})))
    await relay.send_message(codec.encode(notice))
    text = c.doc("notes").get("t", type=pycrdt.Text)
    await eventually(lambda: str(text) == "checkpointed at a", 5.0, "c to pull on the notice")
    await member.channel.close()
    await relay.channel.close()
