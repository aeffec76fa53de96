"""Starting the services that need an epoch's keys: checkpoints, the relay, collective work.

A device with the group secret starts them with the node; an invited device once it joined,
and an epoch change starts the relay again on the new keys (`_members`, `_epochs`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..crypto.keys import GroupKeys, work_names_key

if TYPE_CHECKING:
    from . import Node

__all__ = ["start_relay", "start_services"]


async def start_services(node: Node) -> None:
    """Checkpoints, the relay and collective work, on the keys of the node's epoch."""
    assert node._keys is not None and node._members is not None
    node._services_started = True
    cfg, keys, traffic = node.config, node._keys, node._traffic
    ledger, outbox, readers = node._members.startup_names()
    if node._sink is not None and node._checkpoints is None:
        from ._checkpoints import Checkpoints

        node._checkpoints = Checkpoints(
            cfg,
            keys,
            node.device_id,
            node._sink,
            node._replica,
            spawn=node.spawn,
            notify=traffic.notify,
            ledger=ledger,
            readers=readers,
        )
        await node._checkpoints.start()
    await start_relay(node, keys, outbox)
    # Collective work too: its coordination store (NATS KV) is keyed by the epoch's keys.
    await node._work.start(
        device_id=node.device_id,
        keys=keys,
        names=work_names_key(node._members.roster.group_id),
        doc=node._replica.doc,
        has=node._replica.__contains__,
        connected=lambda: {p.device_id for p in node.peers},
        settle=traffic.settle,
        spawn=node.spawn,
    )


async def start_relay(node: Node, keys: GroupKeys, outbox: str) -> None:
    """The relay on `keys`, if one is configured and none runs yet."""
    if not node.config.relay_url or node._relay is not None:
        return
    from ._relay import make_relay

    checkpoints, members = node._checkpoints, node._members
    assert members is not None
    node._relay = make_relay(
        node.config,
        keys,
        node.device_id,
        node._replica,
        node._seen,
        spawn=node.spawn,
        on_notice=node._traffic.on_notice,
        on_gap=checkpoints.pull_everything if checkpoints else None,
        on_members=lambda msg: members.receive(None, msg),
        outbox=outbox,
    )
    if node._relay is not None:
        await node._relay.start()
        # Relay-only members learn of us too (and of what we did while it was down).
        node._relay.send_members(members.own_ops())
