"""Membership with mDNS only (no static peers): an invited device finds the group by the code,
and a member offline for a revocation is found and moved to the new epoch."""

from __future__ import annotations

import asyncio

import pycrdt
import pytest
from meshkit import NodeFactory, eventually

pytestmark = pytest.mark.slow

T = 30.0


def text(node: object) -> str:
    return str(node.doc("notes").get("t", type=pycrdt.Text))  # type: ignore[attr-defined]


def status(node: object) -> object:
    return node.status().membership  # type: ignore[attr-defined]


async def test_invite_and_revocation_with_mdns_only(make_node: NodeFactory) -> None:
    fast = {"mdns": True, "mdns_requery_interval": 1.0, "reconnect_max": 0.5}
    a = await make_node("alice", **fast)
    b = await make_node("bob", **fast)
    c = await make_node("carol", **fast)
    await eventually(lambda: all(len(n.members) == 3 for n in (a, b, c)), T, "rosters by mDNS")
    # The tablet has only the code: it recognises the members' announcements with it.
    code = await a.invite(ttl=120)
    tablet = await make_node("tablet", group_secret=code, **fast)
    await eventually(lambda: status(tablet).state == "member", T, "tablet joins")  # type: ignore[attr-defined]
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, "hello tablet")
    await eventually(lambda: "hello tablet" in text(tablet), T, "tablet syncs")
    # Bob is away while carol is revoked; back, he is found by an older epoch's beacon.
    await b.close()
    await a.revoke(c.device_id)
    await eventually(lambda: status(tablet).epoch == 1, T, "tablet moves")  # type: ignore[attr-defined]
    await asyncio.sleep(3.0)  # every member now announces epoch 1's beacon, none epoch 0's
    b = await make_node("bob", **fast)
    await eventually(lambda: status(b).epoch == 1, T, "bob moves to epoch 1 by mDNS")  # type: ignore[attr-defined]
    a.doc("notes").get("t", type=pycrdt.Text).insert(0, "after ")
    await eventually(lambda: "after" in text(b) and "after" in text(tablet), T, "sync after")
    assert "after" not in text(c) and not c.peers
