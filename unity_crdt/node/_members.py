"""The node's membership service: the roster on links and the relay, epochs, invites, revocation.

The rules are `members.roster` (sans-IO); this module applies them to the node:

- Admission. After a handshake, `screen` lets an active member in, refuses a revoked one
  (`Refused`, REVOKED: a sealed CLOSE tells it why), and puts everyone else on *probation*: a
  link that carries roster ops only (no doc, presence or notice). A probation link ends once the
  peer's roster ops are in: an invited device is added (ADD + GRANT) and told to reconnect, a
  device that turns out to be a member reconnects with full rights, anyone else is refused
  (NOT_MEMBER). While nobody was ever revoked, the group secret admits any device (v1).
- Gossip. Each full link starts with the whole roster; new ops go to every full link. Ops made
  here also go on the relay's stream, where members read them in order with the updates.
- Epochs. `revoke()` adds a REVOKE and an EPOCH (a fresh GS sealed to each remaining member),
  cuts the revoked device's links, and moves the node to the new epoch before it returns:
  new PSK for new handshakes, new relay channel (the old one gets the roster ops, then is
  closed), new checkpoint tenant (every doc written again). Every member does the same as soon
  as the roster change reaches it and it can open its sealed secret. Older epochs' keys stay:
  to answer members still in them (they then learn the new epoch), and to restore what
  members wrote in them before they ended.
- State. The ops and the epoch secrets this device holds are in `<cache_dir>/membership.json`
  (0600). The group secret itself is never stored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..checkpoint.format import Header
from ..crypto.epochs import (
    invite_beacon_key,
    invite_keys,
    invite_psk,
    open_epoch_secret,
    seal_epoch_secret,
)
from ..crypto.keys import GroupKeys, group_id_of, group_master, keys_from_master
from ..crypto.signing import SigningKey
from ..errors import (
    ConfigError,
    ErrorCode,
    HandshakeError,
    MembershipError,
    Refused,
    SecurityError,
    StoreError,
)
from ..members.invites import InviteCode, parse_invite
from ..members.ops import NO_EPOCH, Add, Epoch, Grant, Invite, Join, Op, Revoke, decode_op, make_op
from ..members.roster import EpochRecord, Roster, RosterView
from ..net.link import Link
from ..status import Member, MembershipStatus
from ..store.files import write_private_file
from ..sync.codec import Members

if TYPE_CHECKING:
    from . import Node

__all__ = ["MembersService"]

log = logging.getLogger(__name__)

STATE_FILE = "membership.json"
STAGGER = 2.0  # seconds between members' turns to rekey or grant (lowest device id first)
RELAY_NOTICE_WAIT = 2.0  # how long revoke() waits for the old channel to take the roster ops
NOT_MEMBER_REASON = "not on the roster: since a revocation the group secret admits no new device"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class MembersService:
    """Membership of one node (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        identity = node._identity
        assert identity is not None
        self._identity = identity
        self._signing = SigningKey(identity.signing_seed())
        self.me = identity.device_id
        self.roster = Roster(b"\x00" * 16)
        self._secrets: dict[bytes, bytes] = {}  # epoch op id (NO_EPOCH: 0) -> its GS
        self._salted = True
        self._invite: InviteCode | None = None
        self._code_hash: str | None = None
        self.keys: GroupKeys | None = None
        self.epoch: EpochRecord | None = None  # the epoch this node works in
        self.state = "member"
        self.error: str | None = None
        self._probation: dict[Link, str] = {}  # link -> "invite:<nonce hex>", "unknown", "joining"
        self._psk: dict[bytes, tuple[str, bytes]] = {}  # psk id -> (kind, epoch op id or nonce)
        self._psk_keys: dict[bytes, GroupKeys] = {}
        self._lock = asyncio.Lock()
        self._chores: dict[str, asyncio.Task[None]] = {}

    # -- start and state ----------------------------------------------------------------------

    @property
    def joined(self) -> bool:
        """Whether this device holds the keys of an epoch of its group (not merely invited)."""
        return self.state in ("member", "outsider") and self.epoch is not None

    async def open(self, secret: str | bytes) -> GroupKeys:
        """Load the roster and epoch secrets from the cache; derive epoch 0 from the group
        secret, or take an invite code. Returns the keys the node starts with."""
        path = self._node.config.cache_path / STATE_FILE
        saved = await asyncio.to_thread(_read_state, path)
        invite = parse_invite(secret)
        if invite is None:
            master0, self._salted = await asyncio.to_thread(group_master, secret)
            group_id = group_id_of(master0)
            self._secrets[NO_EPOCH] = master0
        else:
            group_id = invite.group_id
            self._code_hash = hashlib.sha256(invite.encode().encode()).hexdigest()
        if saved is not None and saved.get("group") != group_id.hex():
            log.warning(
                "the membership state in %s belongs to another group; starting afresh", path
            )
            saved = None
        self.roster = Roster(group_id)
        if saved is not None:
            self._load(saved)
        if not any(isinstance(o.body, Join) and o.author == self.me for o in self.roster.ops):
            self._make(
                Join(
                    self._identity.public_key,
                    self._signing.public_key,
                    self._name(),
                    secret=invite is None,
                )
            )
        view = self.roster.view()
        self._open_sealed(view)
        held = self._held_current(view)
        if held is None and invite is not None:
            if invite.expires < _now_ms() and view.state(self.me) is None:
                raise ConfigError(
                    "this invite code expired at "
                    + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(invite.expires / 1000))
                    + "; ask a member for a new one (`unity-crdt invite`)"
                )
            self._invite, self.state = invite, "joining"
            self.keys = invite_keys(invite.psk, invite.beacon_key)
        else:
            assert held is not None
            self._enter(held)
            self._set_state(view)
        self._rebuild_psk(view)
        await self.save()
        assert self.keys is not None
        return self.keys

    def _name(self) -> str:
        return self._node.config.name

    def _load(self, saved: dict[str, Any]) -> None:
        _, refused = self.roster.add_many(base64.b64decode(b) for b in saved.get("ops", ()))
        if refused:
            log.warning("membership state: %d stored op(s) refused: %s", len(refused), refused[0])
        for op_hex, master in saved.get("secrets", {}).items():
            self._secrets[bytes.fromhex(op_hex)] = base64.b64decode(master)

    async def save(self) -> None:
        """Write the roster and the epoch secrets (not epoch 0's when a group secret gives it)."""
        keep = {
            op.hex(): _b64(gs)
            for op, gs in self._secrets.items()
            if op != NO_EPOCH or self._code_hash is not None
        }
        data = {
            "version": 1,
            "group": self.roster.group_id.hex(),
            "ops": [_b64(o.raw) for o in self.roster.ops],
            "secrets": keep,
        }
        path = self._node.config.cache_path / STATE_FILE
        blob = json.dumps(data, indent=1).encode()
        try:
            await asyncio.to_thread(write_private_file, path, blob)
        except StoreError as exc:
            log.error("membership state not saved (kept in memory, retried): %s", exc)

    def _held_current(self, view: RosterView) -> EpochRecord | None:
        """The newest epoch whose secret this device holds (the current one, if it has it)."""
        for record in sorted(view.epochs, key=lambda r: r.number, reverse=True):
            current = record.op_id == view.epoch.op_id
            if (current or record.number < view.epoch.number) and record.op_id in self._secrets:
                return record
        return None

    def _keys_of(self, record: EpochRecord) -> GroupKeys:
        return keys_from_master(self._secrets[record.op_id], salted=self._salted)

    def _enter(self, record: EpochRecord) -> None:
        self.epoch, self.keys = record, self._keys_of(record)

    def _set_state(self, view: RosterView) -> None:
        st = view.state(self.me)
        self.state = {"active": "member", "revoked": "revoked"}.get(st or "", "outsider")
        if st is None and view.door_open:
            self.state = "member"  # v1: the group secret is membership until a revocation
        if self.state == "outsider":
            self.error = (
                "this device is not on the group's roster: since a member was revoked the group "
                "secret admits no new device; join with an invite code (`unity-crdt invite` on a "
                "member)"
            )

    # -- public API -----------------------------------------------------------------------

    def members(self) -> list[Member]:
        """The roster: every admitted device, active or revoked, by name."""
        view = self.roster.view()
        return sorted(
            (
                Member(m.device_id, m.name, m.state, m.added_by, m.added_at / 1000)
                for m in view.members.values()
            ),
            key=lambda m: (m.name, m.device_id),
        )

    def status(self) -> MembershipStatus:
        """Epoch, roster counts and this device's place in the group."""
        view = self.roster.view()
        now = _now_ms()
        return MembershipStatus(
            epoch=self.epoch.number if self.epoch else 0,
            state=self.state,
            members=sum(1 for m in view.members.values() if m.state == "active"),
            revoked=sum(1 for m in view.members.values() if m.state == "revoked"),
            invites=sum(
                1
                for i in view.invites.values()
                if i.used_by is None and i.expires > now and i.epoch == view.epoch.number
            ),
            error=self.error,
        )

    def _require_member(self) -> RosterView:
        view = self.roster.view()
        if self.state != "member" or view.state(self.me) not in ("active", None):
            raise MembershipError(f"this device is not an active member ({self.state})")
        if self.epoch is None or self.epoch.op_id != view.epoch.op_id:
            raise MembershipError("this device does not hold the current epoch's keys yet")
        return view

    async def invite(self, ttl: float) -> str:
        """A single-use invite code for one new device, valid `ttl` seconds in this epoch."""
        if not 0 < ttl <= 30 * 86400:
            raise ConfigError("an invitation lasts more than 0 s and at most 30 days")
        async with self._lock:
            view = self._require_member()
            nonce = secrets.token_bytes(16)
            expires = _now_ms() + int(ttl * 1000)
            self._change([self._make(Invite(nonce, expires, view.epoch.number))])
            master = self._secrets[view.epoch.op_id]
            assert self.keys is not None
            code = InviteCode(
                self.roster.group_id, invite_psk(master, nonce), self.keys.beacon_key, expires
            )
            await self.save()
        log.info("invitation made (valid %g s, single use)", ttl)
        return code.encode()

    async def revoke(self, device_id: str) -> None:
        """Revoke a member: rotate to a new epoch sealed to the others, cut its links, and
        move relay and checkpoints to the new keys before returning."""
        async with self._lock:
            view = self._require_member()
            target = view.members.get(device_id)
            if target is None:
                raise MembershipError(f"no member has the device id {device_id!r}")
            if device_id == self.me:
                raise MembershipError("a device cannot revoke itself (ask another member)")
            if target.state == "revoked":
                raise MembershipError(f"{target.name!r} ({device_id[:8]}) is already revoked")
            new = [self._make(Revoke(device_id))]
            new.append(self._make_epoch(self.roster.view()))
            await self._cut(device_id)
            self._change(new)
            await self._settle_epoch()
            await self.save()
        log.warning(
            "revoked %r (%s); the group moved to epoch %d",
            target.name,
            device_id[:8],
            self.epoch.number if self.epoch else 0,
        )

    def own_ops(self) -> tuple[bytes, ...]:
        """The ops this device made (its JOIN first), for a channel that may lack them."""
        return tuple(o.raw for o in self.roster.ops if o.author == self.me)

    def _make(self, body: Join | Invite | Add | Revoke | Epoch | Grant) -> Op:
        op = make_op(
            body,
            group_id=self.roster.group_id,
            author=self.me,
            at=_now_ms(),
            deps=self.roster.heads(),
            key=self._signing,
        )
        self.roster.add(op.raw)
        return op

    def _make_epoch(self, view: RosterView) -> Op:
        """A new epoch: a fresh GS sealed to every active member (this device included)."""
        gs, nonce = secrets.token_bytes(32), secrets.token_bytes(16)
        number = max(r.number for r in view.epochs) + 1
        sealed = tuple(
            (
                dev,
                seal_epoch_secret(
                    gs,
                    view.members[dev].x25519,
                    group_id=self.roster.group_id,
                    number=number,
                    nonce=nonce,
                    device_id=dev,
                ),
            )
            for dev in view.active()
        )
        op = self._make(Epoch(number, nonce, sealed))
        self._secrets[op.id] = gs
        return op

    # -- the mesh's hooks -------------------------------------------------------------------

    def lookup(self, psk_id: bytes) -> GroupKeys:
        """Handshake keys for a PSK id: an epoch this node holds, or an open invitation."""
        entry = self._psk.get(psk_id)
        if entry is None or self.state == "revoked":
            raise HandshakeError(
                "PSK id unknown here: a different sync group, or an epoch of it this node does "
                "not hold (revoked, or not yet told of a rotation)"
            )
        kind, ref = entry
        if kind == "invite":
            inv = self.roster.view().invites.get(ref)
            if inv is not None and inv.used_by is not None:
                raise HandshakeError("invite code already used", ErrorCode.INVITE_USED)
            if inv is None or inv.expires < _now_ms() or inv.epoch != self._epoch_number():
                raise HandshakeError("invite code expired", ErrorCode.INVITE_EXPIRED)
        return self._psk_keys[psk_id]

    def _epoch_number(self) -> int:
        return self.epoch.number if self.epoch else 0

    def screen(self, link: Link) -> None:
        """Let an authenticated peer in, refuse it (Refused), or put it on probation."""
        assert link.remote is not None
        dev = link.remote.device_id
        if self.state == "joining":
            self._probation[link] = "joining"  # it answered our invite: a member
            return
        view = self.roster.view()
        member = view.members.get(dev)
        if member is not None and member.state == "revoked":
            by = view.members.get(member.revoked_by or "")
            raise Refused(
                f"device {dev[:8]} was revoked from this group"
                + (f" by {by.name!r}" if by else "")
                + "; it may no longer sync",
                ErrorCode.REVOKED,
            )
        kind, ref = self._psk.get(link.keys.psk_id, ("", b""))
        if kind == "invite":
            self._probation[link] = "invite:" + ref.hex()
        elif member is not None or (view.door_open and kind == "epoch" and ref == NO_EPOCH):
            return
        else:
            self._probation[link] = "unknown"

    def allow(self, link: Link) -> Callable[[str], bool] | None:
        """The doc filter of a link's session: none on probation, all otherwise."""
        return (lambda doc: False) if link in self._probation else None

    def on_joined(self, link: Link) -> None:
        """A link is up: a full one gets our whole roster; an invited device sends its JOIN."""
        kind = self._probation.get(link)
        if kind is None or kind == "joining":
            link.send([Members(tuple(o.raw for o in self.roster.ops))])

    def on_left(self, link: Link) -> None:
        """A link ended: forget its probation; a member's REVOKED refusal marks us revoked."""
        self._probation.pop(link, None)
        closed = link.peer_closed
        if closed is not None and closed[0] is ErrorCode.REVOKED and self.state != "revoked":
            who = link.remote.name if link.remote is not None else "a member"
            self._become_revoked(f"{who!r} refused it: revoked")
        elif closed is not None and closed[0] is ErrorCode.NOT_MEMBER:
            error = (
                f"a member refused this device: {closed[1]} (revoked, or new with the group "
                "secret alone); join with an invite code (`unity-crdt invite` on a member)"
            )
            if error != self.error:
                log.error("%s", error)
            self.error = error

    def on_failure(self, link: Link, reason: str) -> None:
        """A handshake failed: an invited device keeps the reason (it is why it cannot join)."""
        if self.state == "joining" and link.initiator and "invite code" in reason:
            if reason != self.error:  # once per reason: the dialler keeps trying, backing off
                log.error("%s", reason)
            self.error = reason

    def receive(self, link: Link | None, msg: Members) -> None:
        """Roster ops from a link (or the relay, `link` None): merge, gossip, act on them.

        From a probation link only what can admit its device is taken: an invited device's
        own JOIN, or ops under which the device turns out to be a member (a stranger cannot
        fill the roster with ops of its own making)."""
        ops = msg.ops
        kind = self._probation.get(link) if link is not None else None
        if link is not None and link.remote is not None and kind not in (None, "joining"):
            ops = self._admissible(link.remote.device_id, kind, ops)
        accepted, refused = self.roster.add_many(ops)
        if refused:
            log.warning("roster: %d op(s) refused; first: %s", len(refused), refused[0])
        full = link is not None and link not in self._probation
        if msg.want_all and full and link is not None:
            link.send([Members(tuple(o.raw for o in self.roster.ops))])
        if self.roster.pending and link is not None and not msg.want_all:
            link.send([Members((), want_all=True)])
        if accepted:
            self._change(accepted, source=link, local=False)
        if link is not None and link in self._probation:
            self._settle(link)

    def _admissible(self, dev: str, kind: str, ops: tuple[bytes, ...]) -> tuple[bytes, ...]:
        if kind.startswith("invite:"):
            own = []
            for raw in ops:
                with contextlib.suppress(SecurityError):
                    op = decode_op(raw)
                    if isinstance(op.body, Join) and op.author == dev and not op.body.secret:
                        own.append(raw)
            return tuple(own[:1])
        # Only an ADD of this device can make it a member: without one, take nothing (and
        # spend no signature checks on a stranger's ops).
        names = False
        for raw in ops:
            with contextlib.suppress(SecurityError):
                op = decode_op(raw)
                names = names or (isinstance(op.body, Add) and op.body.target == dev)
        if not names:
            return ()
        trial = Roster(self.roster.group_id)
        trial.add_many(o.raw for o in self.roster.ops)
        trial.add_many(ops)
        return ops if trial.view().state(dev) is not None else ()

    # -- reacting to roster changes ---------------------------------------------------------

    def _change(self, new: list[Op], source: Link | None = None, local: bool = True) -> None:
        """Spread new ops and do what they call for (switch epoch, cut links, rekey, grant)."""
        mesh = self._node._mesh
        raw = tuple(o.raw for o in new)
        view = self.roster.view()
        if mesh is not None:  # never to a device these ops (or earlier ones) revoked
            for dev, link in list(mesh.links.items()):
                if link is source or link in self._probation or link.session is None:
                    continue
                if view.state(dev) != "revoked":
                    link.send([Members(raw)])
        relay = self._node._relay
        if local and relay is not None:
            relay.send_members(raw)
        self._open_sealed(view)
        self._rebuild_psk(view)
        if self.state == "joining":
            self._maybe_joined(view)
            return
        if view.state(self.me) == "revoked":
            if self.state != "revoked":
                by = view.members.get(view.members[self.me].revoked_by or "")
                self._become_revoked(f"by {by.name!r}" if by else "by a member")
            return
        self._set_state(view)
        for dev, m in view.members.items():
            if m.state == "revoked" and mesh is not None and dev in mesh.links:
                self._node.spawn(self._cut(dev), "cut a revoked device")
        held = self._held_current(view)
        moved = held is not None and (self.epoch is None or held.op_id != self.epoch.op_id)
        if moved and held is not None and held.number >= self._epoch_number():
            if relay is not None and self.epoch is not None:
                # At once, before the relay hands us its next message: what the old channel
                # carries after this point may come from a device the new epoch excludes.
                relay.halt()
            self._node.spawn(self._switch_soon(), "switch epoch")
        if self.state == "member":
            if view.needs_rekey:
                self._chore("rekey", self._rekey)
            if view.lacking() and view.epoch.op_id in self._secrets:
                self._chore("grant", self._grant)
        self._node.spawn(self.save(), "save membership")

    def _open_sealed(self, view: RosterView) -> None:
        for record in view.epochs:
            sealed = record.sealed.get(self.me)
            if sealed is None or record.op_id in self._secrets:
                continue
            try:
                self._secrets[record.op_id] = open_epoch_secret(
                    sealed,
                    self._identity,
                    group_id=self.roster.group_id,
                    number=record.number,
                    nonce=record.nonce,
                )
            except SecurityError as exc:
                log.warning("roster: a sealed epoch secret for us does not open: %s", exc)

    def _rebuild_psk(self, view: RosterView) -> None:
        table: dict[bytes, tuple[str, bytes]] = {}
        keys: dict[bytes, GroupKeys] = {}
        for record in view.epochs:
            if record.op_id in self._secrets:
                k = self._keys_of(record)
                table[k.psk_id], keys[k.psk_id] = ("epoch", record.op_id), k
        for nonce, inv in view.invites.items():
            made_in = next((r for r in view.epochs if r.number == inv.epoch), None)
            if made_in is None or made_in.op_id not in self._secrets or self.keys is None:
                continue
            k = invite_keys(invite_psk(self._secrets[made_in.op_id], nonce), b"")
            table[k.psk_id], keys[k.psk_id] = ("invite", nonce), k
        self._psk, self._psk_keys = table, keys

    def _settle(self, link: Link) -> None:
        """A probation link delivered its roster: add, admit or refuse the device."""
        kind = self._probation.get(link)
        if link.remote is None or kind is None or kind == "joining":
            return
        dev = link.remote.device_id
        view = self.roster.view()
        if kind.startswith("invite:") and view.state(dev) is None:
            self._redeem(link, bytes.fromhex(kind[7:]))
            view = self.roster.view()
        state = view.state(dev)
        if state == "active":
            link.send([Members(tuple(o.raw for o in self.roster.ops))])
            link.close_soon(ErrorCode.NORMAL, "welcome: reconnect with the group's keys")
        elif state == "revoked":
            link.close_soon(ErrorCode.REVOKED, f"device {dev[:8]} was revoked from this group")
        elif kind.startswith("invite:"):
            link.close_soon(ErrorCode.INVITE_USED, "invite code already used or expired")
        else:  # a CLOSE reason is at most 120 bytes: the refused side says the rest
            link.close_soon(ErrorCode.NOT_MEMBER, NOT_MEMBER_REASON)

    def _redeem(self, link: Link, nonce: bytes) -> None:
        assert link.remote is not None
        dev = link.remote.device_id
        view = self.roster.view()
        inv = view.invites.get(nonce)
        joined = any(isinstance(o.body, Join) and o.author == dev for o in self.roster.ops)
        if (
            inv is None
            or inv.used_by is not None
            or inv.expires < _now_ms()
            or not joined
            or self.state != "member"
            or view.epoch.op_id not in self._secrets
        ):
            return
        new = [self._make(Add(dev, nonce))]
        card = self.roster.view().members.get(dev)
        if card is not None:
            new.append(self._make_grant(self.roster.view().epoch, dev, card.x25519))
        self._change(new)
        log.info("added %r (%s) with an invitation", card.name if card else "?", dev[:8])

    def _make_grant(self, record: EpochRecord, dev: str, x25519: bytes) -> Op:
        sealed = seal_epoch_secret(
            self._secrets[record.op_id],
            x25519,
            group_id=self.roster.group_id,
            number=record.number,
            nonce=record.nonce,
            device_id=dev,
        )
        return self._make(Grant(record.number, record.op_id, dev, sealed))

    def _maybe_joined(self, view: RosterView) -> None:
        """An invited device: once added and given the epoch's secret, it is a member."""
        held = self._held_current(view)
        if view.state(self.me) != "active" or held is None:
            return
        self.state, self._invite, self.error = "member", None, None
        log.info("joined the group (epoch %d)", held.number)
        self._node.spawn(self._switch_soon(), "join the group")

    def _become_revoked(self, why: str) -> None:
        self.state = "revoked"
        self.error = f"this device was revoked from the group ({why}); it syncs with no one"
        log.error("%s", self.error)
        node = self._node
        if node._checkpoints is not None:
            node._checkpoints.stop()
        if node._relay is not None:
            node._relay.halt()
        if node._mesh is not None:
            node.spawn(node._mesh.close(), "stop linking")
        node.spawn(self.save(), "save membership")

    async def _cut(self, dev: str) -> None:
        """End the link to `dev` now, without flushing what was queued for it."""
        mesh = self._node._mesh
        link = mesh.links.get(dev) if mesh is not None else None
        if mesh is None or link is None:
            return
        await link.channel.close(1008, "")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(mesh.wait_until(lambda: mesh.links.get(dev) is not link), 5.0)

    def _chore(self, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if name not in self._chores or self._chores[name].done():
            self._chores[name] = self._node.spawn(self._staggered(work), f"roster {name}")

    async def _staggered(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Members take turns (lowest device id first) so one of them does it, usually."""
        active = self.roster.view().active()
        rank = active.index(self.me) if self.me in active else len(active)
        await asyncio.sleep(rank * STAGGER)
        async with self._lock:
            await work()

    async def _rekey(self) -> None:
        view = self.roster.view()
        if not view.needs_rekey or view.state(self.me) != "active":
            return
        self._change([self._make_epoch(view)])
        await self._settle_epoch()

    async def _grant(self) -> None:
        view = self.roster.view()
        if view.epoch.op_id not in self._secrets or view.state(self.me) != "active":
            return
        new = [self._make_grant(view.epoch, d, view.members[d].x25519) for d in view.lacking()]
        if new:
            self._change(new)

    async def _switch_soon(self) -> None:
        async with self._lock:
            await self._settle_epoch()

    async def _settle_epoch(self) -> None:
        """Move the node to the newest epoch whose secret it holds (relay, checkpoints, mesh)."""
        view = self.roster.view()
        held = self._held_current(view)
        if held is None or (self.epoch is not None and held.op_id == self.epoch.op_id):
            if self.epoch is not None and not self._node._services_started:
                await self._node._start_services()
            return
        first = self.epoch is None
        self._enter(held)
        node, keys = self._node, self._keys_of(held)
        node._keys = keys
        if node._mesh is not None:
            node._mesh.set_keys(keys)
        if first or not node._services_started:
            await node._start_services()
        else:
            await self._move_relay(keys, held)
            if node._checkpoints is not None:
                node._checkpoints.rekey(keys, _ledger(held), self._readers(view, held))
        self._rebuild_psk(view)
        log.info("now in epoch %d", held.number)

    async def _move_relay(self, keys: GroupKeys, record: EpochRecord) -> None:
        node = self._node
        old = node._relay
        if old is None:
            return
        old.send_members(tuple(o.raw for o in self.roster.ops))
        old.halt()
        node._relay = None
        await node._start_relay(keys, outbox=_outbox(record))
        with contextlib.suppress(Exception):
            await old.drain(RELAY_NOTICE_WAIT)
        await old.close()

    def _readers(
        self, view: RosterView, current: EpochRecord
    ) -> list[tuple[GroupKeys, str, Callable[[Header], bool]]]:
        """Older epochs to restore from: only what active members wrote before each ended."""
        out: list[tuple[GroupKeys, str, Callable[[Header], bool]]] = []
        for record in view.epochs:
            if record.op_id == current.op_id or record.op_id not in self._secrets:
                continue
            if record.number > current.number:
                continue
            end = record.ended_at

            def admit(head: Header, end: int | None = end) -> bool:
                if self.roster.view().state(head.device) != "active":
                    return False
                return end is None or head.seq < end

            out.append((self._keys_of(record), _ledger(record), admit))
        return out

    def startup_names(
        self,
    ) -> tuple[str, str, list[tuple[GroupKeys, str, Callable[[Header], bool]]]]:
        """(checkpoint ledger file, relay outbox file, older-epoch readers) of this epoch."""
        assert self.epoch is not None
        return (
            _ledger(self.epoch),
            _outbox(self.epoch),
            self._readers(self.roster.view(), self.epoch),
        )

    def beacons(self, now: float) -> tuple[str, frozenset[str]]:
        """mDNS: announce this epoch's beacon; accept those of every epoch held (members still
        in an older one are found, then told the new one)."""
        assert self.keys is not None
        if self.state == "joining" and self._invite is not None:
            psk = self._invite.psk  # announce what no member accepts: we dial, not they
            mine = invite_keys(psk, invite_beacon_key(psk)).beacons(now)[0]
            return mine, self.keys.beacons(now)[1]
        accept: set[str] = set()
        view = self.roster.view()
        for record in view.epochs:
            if record.op_id in self._secrets:
                accept |= self._keys_of(record).beacons(now)[1]
        return self.keys.beacons(now)[0], frozenset(accept)

    def dial_keys(self) -> list[GroupKeys]:
        """What to dial with: this epoch's keys, then older held epochs' (newest first)."""
        assert self.keys is not None
        if self.state != "member" or self.epoch is None:
            return [self.keys]
        view = self.roster.view()
        older = sorted(
            (r for r in view.epochs if r.op_id in self._secrets and r.number < self.epoch.number),
            key=lambda r: r.number,
            reverse=True,
        )
        return [self.keys] + [self._keys_of(r) for r in older]


def _ledger(record: EpochRecord) -> str:
    return (
        "checkpoints.json" if record.number == 0 else f"checkpoints-{record.op_id[:6].hex()}.json"
    )


def _outbox(record: EpochRecord) -> str:
    return "relay.sqlite3" if record.number == 0 else f"relay-{record.op_id[:6].hex()}.sqlite3"


def _read_state(path: Any) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("membership state %s unreadable (%s); starting from the group secret", path, exc)
        return None
    return data if isinstance(data, dict) else None
