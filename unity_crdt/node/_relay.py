"""Building the node's cloud channel (NATS) from its config; the policy is `net.relay`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ..config import NodeConfig
from ..crypto.envelope import RelaySealer
from ..crypto.keys import GroupKeys
from ..errors import RelayError
from ..net._outbox import RelayOutbox
from ..net.relay import Relay, RelaySettings
from ..sync.codec import Members, Notice
from ..sync.nodewide import SeenFilter
from ..sync.replica import Replica

__all__ = ["make_relay"]

log = logging.getLogger(__name__)


def make_relay(
    config: NodeConfig,
    keys: GroupKeys,
    device_id: str,
    replica: Replica,
    seen: SeenFilter,
    *,
    spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
    on_notice: Callable[[Notice], None],
    on_gap: Callable[[], None] | None,
    on_members: Callable[[Members], None] | None = None,
    outbox: str = "relay.sqlite3",
) -> Relay | None:
    """The relay for `config.relay_url`, not yet started; None (logged) if it cannot be made.

    A relay that cannot even be built never stops the node: the LAN side runs and the log
    (and `status().relay`, once running) says why.
    """
    from ..net.nats import NatsBroker, public_url  # nats-py loads only when it is used

    urls = tuple(config.relay_url or ())
    settings = RelaySettings(
        url=",".join(public_url(u) for u in urls),
        deltas=config.relay_deltas,
        max_age=config.relay_max_age,
        max_bytes=config.relay_max_bytes,
        replicas=3 if len(urls) >= 3 else 1,  # a cluster keeps three copies (Raft)
    )
    try:
        broker = NatsBroker(urls, config.relay_credentials)
    except RelayError as exc:
        log.error("relay off: %s", exc)
        return None
    return Relay(
        broker=broker,
        sealer=RelaySealer(keys, device_id),
        outbox=RelayOutbox(config.cache_path / outbox),
        replica=replica,
        seen=seen,
        settings=settings,
        spawn=spawn,
        on_notice=on_notice,
        on_gap=on_gap,
        on_members=on_members,
    )
