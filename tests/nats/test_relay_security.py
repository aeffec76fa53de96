"""What the NATS operator sees, and commit notices that refresh caches.

A subscriber on `>` holding the server's credentials records every byte the server routes
(subjects, reply subjects, headers, payloads, JetStream API traffic): none of it may contain
edited text, a doc name, a device name or a device id.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest
from relaykit import NodeFactory, append, eventually, load_script, relay_up, text

pytestmark = pytest.mark.nats

DOC = "quarterly-plan-secret-doc"
WORDS = "TOPSECRETWORD acquisition-of-initech"


async def test_a_wildcard_subscriber_sees_no_text_doc_or_device_name(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    with load_script().NatsServer(user="op", password="op-pass") as server:
        captured: list[bytes] = []
        spy = await nats.connect(server.url, user="op", password="op-pass")

        async def record(msg: Any) -> None:
            headers = "".join(f"{k}:{v}" for k, v in (msg.headers or {}).items())
            captured.append(f"{msg.subject} {msg.reply} {headers} ".encode() + msg.data)

        await spy.subscribe(">", cb=record)
        await spy.flush()
        sink = f"dir://{tmp_path / 'sink'}"
        common = dict(relay_credentials="op:op-pass", checkpoint_url=sink, pull_interval=None)
        a = await make_node("alice-laptop-device", server.url, **common)
        b = await make_node("bob-desktop-device", server.url, **common)
        await relay_up(a, b)
        for word in WORDS.split():
            append(a, word + " ", doc=DOC)
            await asyncio.sleep(0.01)
        append(b, "reply-from-bob-9931", doc=DOC)
        await eventually(lambda: "reply-from-bob-9931" in text(a, DOC), 10.0)
        await eventually(lambda: "TOPSECRETWORD" in text(b, DOC), 10.0)
        await a.checkpoint()  # sends a commit notice over NATS too
        await asyncio.sleep(0.5)
        await spy.close()

    blob = b"\n".join(captured)
    assert len(captured) > 10 and blob  # the spy saw the traffic
    secrets = [
        DOC,
        "TOPSECRETWORD",
        "initech",
        "reply-from-bob",
        "alice-laptop-device",
        "bob-desktop-device",
        a.device_id,
        b.device_id,
    ]
    for secret in secrets:
        assert secret.encode() not in blob, f"{secret!r} visible to the NATS operator"
        assert secret.encode("utf-16-le") not in blob


async def test_a_commit_notice_makes_a_node_pull_the_doc_at_once(
    make_node: NodeFactory, nats_server: Any, tmp_path: Path
) -> None:
    """B gets no deltas over NATS (relay_deltas=False) and never polls (pull_interval=None):
    only A's commit notice can bring it A's checkpointed content."""
    sink = f"dir://{tmp_path / 'sink'}"
    common = dict(
        checkpoint_url=sink, pull_interval=None, checkpoint_interval=3600.0, relay_deltas=False
    )
    a = await make_node("a", nats_server, **common)
    b = await make_node("b", nats_server, **common)
    await relay_up(a, b)
    append(a, "checkpointed content")
    await asyncio.sleep(1.0)
    assert text(b) == ""  # nothing else carries it
    loop = asyncio.get_running_loop()
    await a.checkpoint()
    started = loop.time()
    took = await eventually(lambda: text(b) == "checkpointed content", 5.0, "b to pull")
    print(f"commit notice -> content at b: {took * 1000:.0f} ms after checkpoint() returned")
    assert loop.time() - started < 5.0
