"""Who may link: the membership hooks the mesh calls around each handshake.

`lookup` picks the handshake PSK by the prelude's PSK id (an epoch this node holds, an open
invitation; a used or expired one is refused with its reason). `screen` runs once the peer is
authenticated: an active member links; a revoked device gets a sealed CLOSE `REVOKED`; anyone
else is on *probation*, a session that hides every doc and carries roster ops only. A
probation link ends when its roster ops are in (`settle`): an invited device is added (ADD +
GRANT) and told to reconnect with the group's keys, a device that turns out to be a member is
told to reconnect, anyone else gets `NOT_MEMBER`. From a probation link only ops that can make
its device a member are taken, so a stranger cannot fill the roster.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..crypto.keys import GroupKeys
from ..errors import ErrorCode, HandshakeError, Refused, SecurityError
from ..members.ops import NO_EPOCH, Add, Join, decode_op
from ..members.roster import Roster
from ..net.link import Link
from ..sync.codec import Members

if TYPE_CHECKING:
    from ._members import MembersService

__all__ = ["NOT_MEMBER_REASON", "LinkGate"]

log = logging.getLogger(__name__)

# A CLOSE reason is at most 120 bytes: the refused side spells out the rest.
NOT_MEMBER_REASON = "not on the roster: since a revocation the group secret admits no new device"


class LinkGate:
    """The mesh's membership hooks for one node (see the module docstring)."""

    def __init__(self, members: MembersService) -> None:
        self._m = members
        self.probation: dict[Link, str] = {}  # link -> "invite:<nonce hex>" | "unknown" | "joining"
        self.psk: dict[bytes, tuple[str, bytes]] = {}  # psk id -> (kind, epoch op id or nonce)
        self.psk_keys: dict[bytes, GroupKeys] = {}

    def lookup(self, psk_id: bytes) -> GroupKeys:
        """Handshake keys for a PSK id: an epoch this node holds, or an open invitation."""
        m = self._m
        entry = self.psk.get(psk_id)
        if entry is None or m.state == "revoked":
            raise HandshakeError(
                "PSK id unknown here: a different sync group, or an epoch of it this node does "
                "not hold (revoked, or not yet told of a rotation)"
            )
        kind, ref = entry
        if kind == "invite":
            inv = m.roster.view().invites.get(ref)
            if inv is not None and inv.used_by is not None:
                raise HandshakeError("invite code already used", ErrorCode.INVITE_USED)
            if inv is None or inv.expires < m.now_ms() or inv.epoch != m.epoch_number:
                raise HandshakeError("invite code expired", ErrorCode.INVITE_EXPIRED)
        return self.psk_keys[psk_id]

    def screen(self, link: Link) -> None:
        """Let an authenticated peer in, refuse it (Refused), or put it on probation."""
        assert link.remote is not None
        dev = link.remote.device_id
        if self._m.state == "joining":
            self.probation[link] = "joining"  # it answered our invite: a member
            return
        view = self._m.roster.view()
        member = view.members.get(dev)
        if member is not None and member.state == "revoked":
            by = view.members.get(member.revoked_by or "")
            raise Refused(
                f"device {dev[:8]} was revoked from this group"
                + (f" by {by.name!r}" if by else "")
                + "; it may no longer sync",
                ErrorCode.REVOKED,
            )
        kind, ref = self.psk.get(link.keys.psk_id, ("", b""))
        if kind == "invite":
            self.probation[link] = "invite:" + ref.hex()
        elif member is not None or (view.door_open and kind == "epoch" and ref == NO_EPOCH):
            return
        else:
            self.probation[link] = "unknown"

    def allow(self, link: Link) -> Callable[[str], bool] | None:
        """The doc filter of a link's session: none on probation, all otherwise."""
        return (lambda doc: False) if link in self.probation else None

    def full(self, link: Link) -> bool:
        """Whether the link carries docs (a member's), not only roster ops."""
        return link not in self.probation

    def on_joined(self, link: Link) -> None:
        """A link is up: a full one gets our whole roster; an invited device sends its JOIN."""
        kind = self.probation.get(link)
        if kind is None or kind == "joining":
            link.send([Members(self._m.all_ops())])

    def on_left(self, link: Link) -> None:
        """A link ended: forget its probation; a member's refusal says what we are."""
        self.probation.pop(link, None)
        closed = link.peer_closed
        if closed is not None and closed[0] is ErrorCode.REVOKED:
            who = link.remote.name if link.remote is not None else "a member"
            self._m.told_revoked(f"{who!r} refused it: revoked")
        elif closed is not None and closed[0] is ErrorCode.NOT_MEMBER:
            self._m.note_error(
                f"a member refused this device: {closed[1]} (revoked, or new with the group "
                "secret alone); join with an invite code (`unity-crdt invite` on a member)"
            )

    def on_failure(self, link: Link, reason: str) -> None:
        """A handshake failed: an invited device keeps the reason (it is why it cannot join)."""
        if self._m.state == "joining" and link.initiator and "invite code" in reason:
            self._m.note_error(reason)

    def admissible(self, link: Link, ops: tuple[bytes, ...]) -> tuple[bytes, ...]:
        """The ops taken from a link: all from a full one, from a probation one only what can
        admit its device (an invited device's own JOIN; ops under which it is a member)."""
        kind = self.probation.get(link)
        if kind in (None, "joining") or link.remote is None:
            return ops
        dev = link.remote.device_id
        decoded = []
        for raw in ops:
            with contextlib.suppress(SecurityError):
                decoded.append(decode_op(raw))
        if kind.startswith("invite:"):
            own = [
                o.raw
                for o in decoded
                if isinstance(o.body, Join) and o.author == dev and not o.body.secret
            ]
            return tuple(own[:1])
        # Only an ADD of this device can make it a member: without one take nothing (and
        # spend no signature checks on a stranger's ops).
        if not any(isinstance(o.body, Add) and o.body.target == dev for o in decoded):
            return ()
        trial = Roster(self._m.roster.group_id)
        trial.add_many(self._m.all_ops())
        trial.add_many(ops)
        return ops if trial.view().state(dev) is not None else ()

    def settle(self, link: Link) -> None:
        """A probation link delivered its roster: add, admit or refuse the device."""
        kind = self.probation.get(link)
        if link.remote is None or kind is None or kind == "joining":
            return
        dev = link.remote.device_id
        m = self._m
        if kind.startswith("invite:") and m.roster.view().state(dev) is None:
            m.redeem(dev, bytes.fromhex(kind[7:]))
        state = m.roster.view().state(dev)
        if state == "active":
            link.send([Members(m.all_ops())])
            link.close_soon(ErrorCode.NORMAL, "welcome: reconnect with the group's keys")
        elif state == "revoked":
            link.close_soon(ErrorCode.REVOKED, f"device {dev[:8]} was revoked from this group")
        elif kind.startswith("invite:"):
            link.close_soon(ErrorCode.INVITE_USED, "invite code already used or expired")
        else:
            link.close_soon(ErrorCode.NOT_MEMBER, NOT_MEMBER_REASON)
