"""The epoch secrets this device holds, the keys each gives, and moving the node between them.

Each epoch's GS derives every key of that epoch (`crypto.keys.keys_from_master`): link PSK and
PSK id, mDNS beacon, relay subjects and key, checkpoint tenant and key. A node works in the
newest epoch whose secret it holds, and keeps the older ones: to answer members still in them
(handshakes, mDNS), and to restore what members wrote in them before they ended.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..checkpoint.format import Header
from ..crypto.epochs import (
    invite_beacon_key,
    invite_keys,
    invite_psk,
    open_epoch_secret,
    seal_epoch_secret,
)
from ..crypto.keys import DeviceIdentity, GroupKeys, keys_from_master
from ..errors import SecurityError
from ..members.invites import InviteCode
from ..members.ops import Epoch, Grant
from ..members.roster import EpochRecord, RosterView
from ._services import start_relay

if TYPE_CHECKING:
    from . import Node

__all__ = ["EpochKeys", "Reader", "ledger_name", "move_node", "new_epoch", "outbox_name"]

log = logging.getLogger(__name__)

RELAY_NOTICE_WAIT = 2.0  # how long a move waits for the old channel to take the roster ops

Reader = tuple[GroupKeys, str, Callable[[Header], bool]]  # keys, ledger file, what to admit


def ledger_name(record: EpochRecord) -> str:
    """The checkpoint ledger file of an epoch (epoch 0 keeps v1's name)."""
    return (
        "checkpoints.json" if record.number == 0 else f"checkpoints-{record.op_id[:6].hex()}.json"
    )


def outbox_name(record: EpochRecord) -> str:
    """The relay outbox file of an epoch (epoch 0 keeps v1's name)."""
    return "relay.sqlite3" if record.number == 0 else f"relay-{record.op_id[:6].hex()}.sqlite3"


def new_epoch(view: RosterView, group_id: bytes) -> tuple[Epoch, bytes]:
    """(an EPOCH body sealing a fresh GS to every active member, that GS)."""
    gs, nonce = secrets.token_bytes(32), secrets.token_bytes(16)
    number = max(r.number for r in view.epochs) + 1
    sealed = tuple(
        (
            dev,
            seal_epoch_secret(
                gs,
                view.members[dev].x25519,
                group_id=group_id,
                number=number,
                nonce=nonce,
                device_id=dev,
            ),
        )
        for dev in view.active()
    )
    return Epoch(number, nonce, sealed), gs


class EpochKeys:
    """GS per epoch (by EPOCH op id; NO_EPOCH for epoch 0) and what they give."""

    def __init__(self, salted: bool = True) -> None:
        self.secrets: dict[bytes, bytes] = {}
        self.salted = salted

    def __contains__(self, op_id: object) -> bool:
        return op_id in self.secrets

    def keys_of(self, record: EpochRecord) -> GroupKeys:
        """Every key of an epoch whose secret is held."""
        return keys_from_master(self.secrets[record.op_id], salted=self.salted)

    def grant(self, record: EpochRecord, dev: str, x25519: bytes, group_id: bytes) -> Grant:
        """A GRANT body sealing a held epoch's GS to one more device."""
        sealed = seal_epoch_secret(
            self.secrets[record.op_id],
            x25519,
            group_id=group_id,
            number=record.number,
            nonce=record.nonce,
            device_id=dev,
        )
        return Grant(record.number, record.op_id, dev, sealed)

    def held(self, view: RosterView) -> EpochRecord | None:
        """The newest epoch whose secret is held: the current one, or an older one."""
        for record in sorted(view.epochs, key=lambda r: r.number, reverse=True):
            current = record.op_id == view.epoch.op_id
            if (current or record.number < view.epoch.number) and record.op_id in self.secrets:
                return record
        return None

    def open_sealed(self, view: RosterView, identity: DeviceIdentity, group_id: bytes) -> None:
        """Open every epoch secret the roster sealed to this device and not yet held."""
        for record in view.epochs:
            sealed = record.sealed.get(identity.device_id)
            if sealed is None or record.op_id in self.secrets:
                continue
            try:
                self.secrets[record.op_id] = open_epoch_secret(
                    sealed, identity, group_id=group_id, number=record.number, nonce=record.nonce
                )
            except SecurityError as exc:
                log.warning("roster: a sealed epoch secret for us does not open: %s", exc)

    def psk_table(
        self, view: RosterView
    ) -> tuple[dict[bytes, tuple[str, bytes]], dict[bytes, GroupKeys]]:
        """PSK id -> ("epoch", op id) or ("invite", nonce), and the keys of each."""
        table: dict[bytes, tuple[str, bytes]] = {}
        keys: dict[bytes, GroupKeys] = {}
        for record in view.epochs:
            if record.op_id in self.secrets:
                k = self.keys_of(record)
                table[k.psk_id], keys[k.psk_id] = ("epoch", record.op_id), k
        for nonce, inv in view.invites.items():
            made_in = next((r for r in view.epochs if r.number == inv.epoch), None)
            if made_in is None or made_in.op_id not in self.secrets:
                continue
            k = invite_keys(invite_psk(self.secrets[made_in.op_id], nonce), b"")
            table[k.psk_id], keys[k.psk_id] = ("invite", nonce), k
        return table, keys

    def readers(
        self, view: RosterView, current: EpochRecord, active: Callable[[str], bool]
    ) -> list[Reader]:
        """Older epochs to restore from: only what active members wrote before each ended."""
        out: list[Reader] = []
        for record in view.epochs:
            if record.op_id == current.op_id or record.op_id not in self.secrets:
                continue
            if record.number > current.number:
                continue

            def admit(head: Header, end: int | None = record.ended_at) -> bool:
                return active(head.device) and (end is None or head.seq < end)

            out.append((self.keys_of(record), ledger_name(record), admit))
        return out

    def beacons(
        self, now: float, view: RosterView, keys: GroupKeys, invite: InviteCode | None
    ) -> tuple[str, frozenset[str]]:
        """mDNS: announce this epoch's beacon; accept those of every epoch held (members still
        in an older one are found, then told the new one). An invited device announces what
        no member accepts: it dials, it is not dialled."""
        if invite is not None:
            mine = invite_keys(invite.psk, invite_beacon_key(invite.psk)).beacons(now)[0]
            return mine, keys.beacons(now)[1]
        accept: set[str] = set()
        for record in view.epochs:
            if record.op_id in self.secrets:
                accept |= self.keys_of(record).beacons(now)[1]
        return keys.beacons(now)[0], frozenset(accept)

    def older(self, view: RosterView, current: EpochRecord) -> list[GroupKeys]:
        """Keys of the held epochs before `current`, newest first (diallers fall back on them)."""
        records = sorted(
            (r for r in view.epochs if r.op_id in self.secrets and r.number < current.number),
            key=lambda r: r.number,
            reverse=True,
        )
        return [self.keys_of(r) for r in records]


async def move_node(
    node: Node,
    keys: GroupKeys,
    record: EpochRecord,
    roster_ops: tuple[bytes, ...],
    readers: list[Reader],
) -> None:
    """Move a running node's relay and checkpoints to a new epoch's keys.

    The old relay channel gets the roster ops first (members that missed the change read them
    there, in order, before anything that follows), then takes nothing more and is closed.
    Checkpoints go to the new epoch's tenant, every doc written again at once. The work
    store seals what it writes with the new key; its bucket and lease names do not move, so
    members of both epochs still contend for the same lease keys.
    """
    old = node._relay
    if old is not None:
        old.send_members(roster_ops)
        old.halt()
        node._relay = None
        await start_relay(node, keys, outbox_name(record))
        with contextlib.suppress(Exception):
            await old.drain(RELAY_NOTICE_WAIT)
        await old.close()
    if node._checkpoints is not None:
        node._checkpoints.rekey(keys, ledger_name(record), readers)
    node._work.rekey(keys)
