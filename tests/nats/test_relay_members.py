"""Membership over the cloud channel alone: roster ops travel on the stream, a revocation
moves the group to a new channel, a member that was offline reads the old channel up to the
revocation and no further, and the revoked device reads and injects nothing new."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest
from relaykit import SECRET, NodeFactory, append, eventually, load_script, relay_up, text

from unity_crdt.crypto.envelope import RelaySealer
from unity_crdt.crypto.keys import derive_group_keys
from unity_crdt.errors import SecurityError
from unity_crdt.sync import codec
from unity_crdt.sync.codec import Update

pytestmark = [pytest.mark.nats, pytest.mark.slow]

T = 20.0


def epoch(node: Any) -> int:
    return int(node.status().membership.epoch)


async def test_revocation_over_the_relay_alone(make_node: NodeFactory, tmp_path: Path) -> None:
    with load_script().NatsServer(user="op", password="op-pass") as server:
        captured: list[bytes] = []
        spy = await nats.connect(server.url, user="op", password="op-pass")

        async def record(msg: Any) -> None:
            headers = "".join(f"{k}:{v}" for k, v in (msg.headers or {}).items())
            captured.append(f"{msg.subject} {msg.reply} {headers} ".encode() + msg.data)

        await spy.subscribe(">", cb=record)
        await spy.flush()
        common = dict(relay_credentials="op:op-pass", pull_interval=None)
        a = await make_node("alice-laptop", server.url, **common)
        b = await make_node("bob-desktop", server.url, **common)
        c = await make_node("carol-phone", server.url, **common)
        d = await make_node("dave-tablet", server.url, **common)
        nodes = (a, b, c, d)
        await relay_up(*nodes)
        # No mesh at all: the devices learn of each other from the stream.
        await eventually(lambda: all(len(n.members) == 4 for n in nodes), T, "rosters")
        append(c, "c-before ")
        await eventually(lambda: all("c-before" in text(n) for n in nodes), T, "sync before")
        await d.close()  # dave goes offline

        await a.revoke(c.device_id)
        assert epoch(a) == 1
        await eventually(lambda: epoch(b) == 1, T, "bob moves to epoch 1 from the stream")
        await relay_up(a, b)
        await eventually(
            lambda: c.status().membership.state == "revoked",  # type: ignore[union-attr]
            T,
            "carol learns it from the old channel",
        )
        append(a, "a-after ")
        append(b, "b-after ")
        append(c, "c-after ")  # the revoked device's later edit: nobody may get it
        await eventually(lambda: "a-after" in text(b) and "b-after" in text(a), T, "new channel")

        # The thief, with the old keys, injects into the old channel and reads all it can.
        old = RelaySealer(derive_group_keys(SECRET), c.device_id)
        thief = await nats.connect(server.url, user="op", password="op-pass")
        body = codec.encode(Update("notes", _update("thief-injected ")))
        for part in old.seal(old.updates_subject, body, b"f" * 8, 2**16):
            await thief.jetstream().publish(old.updates_subject, part)
        await thief.close()

        # Dave returns: reads the old channel up to the revocation, then the new one.
        d = await make_node("dave-tablet", server.url, **common)
        await eventually(lambda: epoch(d) == 1, T, "dave moves to epoch 1")
        await eventually(lambda: "a-after" in text(d) and "b-after" in text(d), T, "dave")
        append(d, "d-after ")
        await eventually(lambda: "d-after" in text(a) and "d-after" in text(b), T, "dave's edit")
        await asyncio.sleep(2.0)
        for n in (a, b, d):
            assert "c-after" not in text(n) and "thief-injected" not in text(n), n.config.name
        assert "a-after" not in text(c)
        await spy.close()

    # Everything the server routed: the old keys open only what was sealed before the move.
    opened = []
    for raw in captured:
        subject, _, rest = raw.partition(b" ")
        payload = rest.split(b" ", 2)[-1]
        try:
            opened.append(old.open(subject.decode(), payload).chunk)
        except (SecurityError, UnicodeDecodeError, ValueError):
            continue
    seen = b"".join(opened)
    assert b"c-before" in seen  # the thief's keys do open the old channel...
    for word in (b"a-after", b"b-after", b"d-after"):
        assert word not in seen  # ... and nothing written after the revocation
    assert b"c-after" not in seen  # the revoked device itself sends nothing more
    blob = b"\n".join(captured)
    assert len(captured) > 20
    for n in (a, b, c, d):
        for secret in (n.config.name, n.device_id):
            assert secret.encode() not in blob, f"{secret!r} visible to the NATS operator"
    for word in (b"epoch", b"revoke", b"a-after", b"c-before"):
        assert word not in blob


def _update(value: str) -> bytes:
    import pycrdt

    doc = pycrdt.Doc()
    doc.get("t", type=pycrdt.Text).insert(0, value)
    return doc.get_update()


async def test_a_lease_stays_exclusive_across_a_revocation(make_node: NodeFactory) -> None:
    """Lease keys do not move with the epoch: a member started in the new epoch and one that
    moved into it contend for the same key (strict mode, on the relay's NATS server)."""
    with load_script().NatsServer(user="op", password="op-pass") as server:
        common = dict(relay_credentials="op:op-pass", pull_interval=None)
        a = await make_node("alice-laptop", server.url, **common)
        b = await make_node("bob-desktop", server.url, **common)
        c = await make_node("carol-phone", server.url, **common)
        await relay_up(a, b, c)
        await eventually(lambda: all(len(n.members) == 3 for n in (a, b, c)), T, "rosters")
        await a.revoke(c.device_id)
        await eventually(lambda: epoch(b) == 1, T, "bob moves to epoch 1")
        await b.close()
        b = await make_node("bob-desktop", server.url, **common)  # starts in epoch 1
        assert epoch(b) == 1
        async with a.lease("queue/main", ttl=3.0) as held:  # a moved into epoch 1 while running
            with pytest.raises(TimeoutError):
                async with b.lease("queue/main", ttl=3.0, timeout=2.0):
                    pass
            info = b.lease_holder("queue/main")
            assert info is not None and info.device_id == a.device_id
        async with b.lease("queue/main", ttl=3.0, timeout=5.0) as then:
            assert then.token > held.token
