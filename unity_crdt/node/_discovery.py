"""Starting the node's mDNS discovery: announced and found addresses go to the mesh as hints."""

from __future__ import annotations

import logging

from ..config import NodeConfig
from ..ids import PeerAddress
from ..net.mdns import BeaconSchedule, Discovery, Found
from ..net.mesh import Mesh

__all__ = ["start_discovery"]

log = logging.getLogger(__name__)


async def start_discovery(
    config: NodeConfig, beacons: BeaconSchedule, listening: PeerAddress, mesh: Mesh
) -> Discovery | None:
    """Announce `listening` and hand every member found to `mesh`; None for a non-ws node.
    `beacons(now)` says what to announce and accept (it follows the group's epochs)."""
    if listening.scheme != "ws":
        log.warning(
            "mDNS announces websocket peers only; this node listens with %s://", listening.scheme
        )
        return None

    def found(peer: Found) -> None:
        # mDNS is only a hint: the handshake decides whether it is one of us.
        mesh.add_address(PeerAddress(peer.host, peer.port, "ws"), persistent=False)

    discovery = Discovery(
        beacon=beacons,
        port=listening.port,
        on_found=found,
        interfaces=config.mdns_interfaces,
        requery_interval=config.mdns_requery_interval,
        allow=config.mdns_allow or None,
    )
    await discovery.start()
    return discovery
