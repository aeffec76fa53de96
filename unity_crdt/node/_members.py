"""The node's membership service: the roster on links and the relay, epochs, invite, revoke.

The rules are `members.roster` (sans-IO); this service applies them to the node, with two
parts: `_gate` (who may link: the mesh's hooks around each handshake) and `_epochs` (the epoch
secrets held, their keys, and moving the relay and checkpoints between them).

- Gossip. Each full link starts with the whole roster; new ops go to every full link but a
  revoked device's. Ops made here also go on the relay's stream, where members read them in
  order with the updates.
- Epochs. `revoke()` adds a REVOKE and an EPOCH (a fresh GS sealed to each remaining member),
  cuts the revoked device's links, and moves the node to the new epoch before it returns:
  new PSK for new handshakes, new relay channel (the old one gets the roster ops, then is
  closed), new checkpoint tenant (every doc written again). Every member does the same as soon
  as the roster change reaches it and it can open its sealed secret. When concurrent changes
  leave a revoked device holding the current secret, members rekey (lowest device id first);
  members the current EPOCH does not name get GRANTs.
- State. The ops and the epoch secrets this device holds are in `<cache_dir>/membership.json`
  (0600). The group secret itself is never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..crypto.epochs import invite_keys, invite_psk
from ..crypto.keys import GroupKeys, group_id_of, group_master
from ..crypto.signing import SigningKey
from ..errors import ConfigError, MembershipError, StoreError
from ..members.invites import InviteCode, parse_invite
from ..members.ops import NO_EPOCH, Add, Epoch, Grant, Invite, Join, Op, Revoke, make_op
from ..members.roster import EpochRecord, Roster, RosterView
from ..net.link import Link
from ..status import Member, MembershipStatus
from ..store.files import write_private_file
from ..sync.codec import Members
from ._epochs import EpochKeys, Reader, ledger_name, move_node, new_epoch, outbox_name
from ._gate import LinkGate
from ._services import start_services
from ._state import read_state, state_json, state_parts

if TYPE_CHECKING:
    from . import Node

__all__ = ["MembersService"]

log = logging.getLogger(__name__)

STATE_FILE = "membership.json"
STAGGER = 2.0  # seconds between members' turns to rekey or grant (lowest device id first)
OUTSIDER = (
    "this device is not on the group's roster: since a member was revoked the group secret "
    "admits no new device; join with an invite code (`unity-crdt invite` on a member)"
)


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
        self.epochs = EpochKeys()
        self.gate = LinkGate(self)
        self._invite: InviteCode | None = None
        self._invited = False  # joined with a code: epoch 0's secret must be kept too
        self.keys: GroupKeys | None = None
        self.epoch: EpochRecord | None = None  # the epoch this node works in
        self.state = "member"  # | "joining" | "revoked" | "outsider"
        self.error: str | None = None
        self._lock = asyncio.Lock()
        self._chores: dict[str, asyncio.Task[None]] = {}

    @staticmethod
    def now_ms() -> int:
        """Wall-clock milliseconds (roster ops and invitations are timed by it)."""
        return int(time.time() * 1000)

    @property
    def epoch_number(self) -> int:
        """The number of the epoch this node works in (0 before it holds any)."""
        return self.epoch.number if self.epoch else 0

    @property
    def joined(self) -> bool:
        """Whether this device holds the keys of an epoch of its group (not merely invited)."""
        return self.state in ("member", "outsider") and self.epoch is not None

    def all_ops(self) -> tuple[bytes, ...]:
        """The whole roster, each op after its deps."""
        return tuple(o.raw for o in self.roster.ops)

    def own_ops(self) -> tuple[bytes, ...]:
        """The ops this device made (its JOIN first), for a channel that may lack them."""
        return tuple(o.raw for o in self.roster.ops if o.author == self.me)

    # -- start and state ----------------------------------------------------------------------

    async def open(self, secret: str | bytes) -> GroupKeys:
        """Load the roster and epoch secrets from the cache; derive epoch 0 from the group
        secret, or take an invite code. Returns the keys the node starts with."""
        path = self._node.config.cache_path / STATE_FILE
        saved = await asyncio.to_thread(read_state, path)
        invite = parse_invite(secret)
        if invite is None:
            master0, salted = await asyncio.to_thread(group_master, secret)
            self.epochs = EpochKeys(salted)
            self.epochs.secrets[NO_EPOCH] = master0
            group_id = group_id_of(master0)
        else:
            group_id, self._invited = invite.group_id, True
        if saved is not None and saved.get("group") != group_id.hex():
            log.warning("the membership state in %s is another group's; starting afresh", path)
            saved = None
        self.roster = Roster(group_id)
        if saved is not None:
            self._load(saved)
        if not any(isinstance(o.body, Join) and o.author == self.me for o in self.roster.ops):
            key = self._identity.public_key
            self._make(Join(key, self._signing.public_key, self._node.config.name, invite is None))
        view = self.roster.view()
        self.epochs.open_sealed(view, self._identity, group_id)
        held = self.epochs.held(view)
        if held is None and invite is not None:
            if invite.expires < self.now_ms() and view.state(self.me) is None:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(invite.expires / 1000))
                raise ConfigError(
                    f"this invite code expired at {when}; ask a member for a new one "
                    "(`unity-crdt invite`)"
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

    def _load(self, saved: dict[str, Any]) -> None:
        ops, kept = state_parts(saved)
        _, refused = self.roster.add_many(ops)
        if refused:
            log.warning("membership state: %d stored op(s) refused: %s", len(refused), refused[0])
        self.epochs.secrets.update(kept)

    async def save(self) -> None:
        """Write the roster and the epoch secrets (not epoch 0's when a group secret gives it)."""
        keep = {k: v for k, v in self.epochs.secrets.items() if k != NO_EPOCH or self._invited}
        data = state_json(self.roster.group_id, self.all_ops(), keep)
        path = self._node.config.cache_path / STATE_FILE
        try:
            await asyncio.to_thread(write_private_file, path, data)
        except StoreError as exc:
            log.error("membership state not saved (kept in memory, retried): %s", exc)

    def _enter(self, record: EpochRecord) -> None:
        self.epoch, self.keys = record, self.epochs.keys_of(record)

    def _set_state(self, view: RosterView) -> None:
        st = view.state(self.me)
        self.state = {"active": "member", "revoked": "revoked"}.get(st or "", "outsider")
        if st is None and view.door_open:
            self.state = "member"  # v1: the group secret is membership until a revocation
        if self.state == "outsider":
            self.error = OUTSIDER

    def note_error(self, error: str) -> None:
        """Why this device cannot join or sync (logged once per reason)."""
        if error != self.error:
            log.error("%s", error)
        self.error = error

    def told_revoked(self, why: str) -> None:
        """A member refused this device as revoked."""
        if self.state != "revoked":
            self._become_revoked(why)

    # -- public API -----------------------------------------------------------------------

    def members(self) -> list[Member]:
        """The roster: every admitted device, active or revoked, by name."""
        return sorted(
            (
                Member(m.device_id, m.name, m.state, m.added_by, m.added_at / 1000)
                for m in self.roster.view().members.values()
            ),
            key=lambda m: (m.name, m.device_id),
        )

    def status(self) -> MembershipStatus:
        """Epoch, roster counts and this device's place in the group."""
        view = self.roster.view()
        now = self.now_ms()
        return MembershipStatus(
            epoch=self.epoch_number,
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
            expires = self.now_ms() + int(ttl * 1000)
            self._change([self._make(Invite(nonce, expires, view.epoch.number))])
            master = self.epochs.secrets[view.epoch.op_id]
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
            self.epoch_number,
        )

    def redeem(self, dev: str, nonce: bytes) -> None:
        """Add a device that handshook with an open invitation's PSK and sent its JOIN."""
        view = self.roster.view()
        inv = view.invites.get(nonce)
        joined = any(isinstance(o.body, Join) and o.author == dev for o in self.roster.ops)
        if (
            inv is None
            or inv.used_by is not None
            or inv.expires < self.now_ms()
            or not joined
            or self.state != "member"
            or view.epoch.op_id not in self.epochs
        ):
            return
        new = [self._make(Add(dev, nonce))]
        card = self.roster.view().members.get(dev)
        if card is not None:
            new.append(self._make_grant(self.roster.view().epoch, dev, card.x25519))
        self._change(new)
        log.info("added %r (%s) with an invitation", card.name if card else "?", dev[:8])

    # -- making ops -----------------------------------------------------------------------

    def _make(self, body: Join | Invite | Add | Revoke | Epoch | Grant) -> Op:
        op = make_op(
            body,
            group_id=self.roster.group_id,
            author=self.me,
            at=self.now_ms(),
            deps=self.roster.heads(),
            key=self._signing,
        )
        self.roster.add(op.raw)
        return op

    def _make_epoch(self, view: RosterView) -> Op:
        """A new epoch: a fresh GS sealed to every active member (this device included)."""
        body, gs = new_epoch(view, self.roster.group_id)
        op = self._make(body)
        self.epochs.secrets[op.id] = gs
        return op

    def _make_grant(self, record: EpochRecord, dev: str, x25519: bytes) -> Op:
        return self._make(self.epochs.grant(record, dev, x25519, self.roster.group_id))

    # -- receiving and reacting ---------------------------------------------------------------

    def receive(self, link: Link | None, msg: Members) -> None:
        """Roster ops from a link (or the relay, `link` None): merge, gossip, act on them."""
        ops = msg.ops if link is None else self.gate.admissible(link, msg.ops)
        accepted, refused = self.roster.add_many(ops)
        if refused:
            log.warning("roster: %d op(s) refused; first: %s", len(refused), refused[0])
        if link is not None and msg.want_all and self.gate.full(link):
            link.send([Members(self.all_ops())])
        if self.roster.pending and link is not None and not msg.want_all:
            link.send([Members((), want_all=True)])
        if accepted:
            self._change(accepted, source=link, local=False)
        if link is not None:
            self.gate.settle(link)

    def _change(self, new: list[Op], source: Link | None = None, local: bool = True) -> None:
        """Spread new ops and do what they call for (switch epoch, cut links, rekey, grant)."""
        mesh, relay = self._node._mesh, self._node._relay
        raw = tuple(o.raw for o in new)
        view = self.roster.view()
        if mesh is not None:  # never to a device these ops (or earlier ones) revoked
            for dev, link in list(mesh.links.items()):
                if link is source or not self.gate.full(link) or link.session is None:
                    continue
                if view.state(dev) != "revoked":
                    link.send([Members(raw)])
        if local and relay is not None:
            relay.send_members(raw)
        self.epochs.open_sealed(view, self._identity, self.roster.group_id)
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
        held = self.epochs.held(view)
        moved = held is not None and (self.epoch is None or held.op_id != self.epoch.op_id)
        if moved and held is not None and held.number >= self.epoch_number:
            if relay is not None and self.epoch is not None:
                # At once, before the relay hands us its next message: what the old channel
                # carries after this point may come from a device the new epoch excludes.
                relay.halt()
            self._node.spawn(self._switch_soon(), "switch epoch")
        if self.state == "member":
            if view.needs_rekey:
                self._chore("rekey", self._rekey)
            if view.lacking() and view.epoch.op_id in self.epochs:
                self._chore("grant", self._grant)
        self._node.spawn(self.save(), "save membership")

    def _rebuild_psk(self, view: RosterView) -> None:
        self.gate.psk, self.gate.psk_keys = self.epochs.psk_table(view)

    def _maybe_joined(self, view: RosterView) -> None:
        """An invited device: once added and given the epoch's secret, it is a member."""
        held = self.epochs.held(view)
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
            node._checkpoints.halt()
        if node._relay is not None:
            node._relay.halt()
        if node._mesh is not None:
            node.spawn(node._mesh.close(), "stop linking")
        if node._discovery is not None:
            node.spawn(node._discovery.close(), "stop announcing")
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
        if view.epoch.op_id not in self.epochs or view.state(self.me) != "active":
            return
        new = [self._make_grant(view.epoch, d, view.members[d].x25519) for d in view.lacking()]
        if new:
            self._change(new)

    # -- epochs ---------------------------------------------------------------------------

    async def _switch_soon(self) -> None:
        async with self._lock:
            await self._settle_epoch()

    async def _settle_epoch(self) -> None:
        """Move the node to the newest epoch whose secret it holds (mesh, relay, checkpoints)."""
        node = self._node
        view = self.roster.view()
        held = self.epochs.held(view)
        if held is None or (self.epoch is not None and held.op_id == self.epoch.op_id):
            if self.epoch is not None and not node._services_started:
                await start_services(node)
            return
        self._enter(held)
        keys = self.epochs.keys_of(held)
        node._keys = keys
        if node._mesh is not None:
            node._mesh.set_keys(keys)
        if not node._services_started:
            await start_services(node)
        else:
            await move_node(node, keys, held, self.all_ops(), self._readers(view, held))
        self._rebuild_psk(view)
        log.info("now in epoch %d", held.number)

    def _readers(self, view: RosterView, current: EpochRecord) -> list[Reader]:
        return self.epochs.readers(
            view, current, lambda dev: self.roster.view().state(dev) == "active"
        )

    def startup_names(self) -> tuple[str, str, list[Reader]]:
        """(checkpoint ledger file, relay outbox file, older-epoch readers) of this epoch."""
        assert self.epoch is not None
        view = self.roster.view()
        return ledger_name(self.epoch), outbox_name(self.epoch), self._readers(view, self.epoch)

    def beacons(self, now: float) -> tuple[str, frozenset[str]]:
        """What mDNS announces and accepts now (see `EpochKeys.beacons`)."""
        assert self.keys is not None
        invite = self._invite if self.state == "joining" else None
        return self.epochs.beacons(now, self.roster.view(), self.keys, invite)

    def dial_keys(self) -> list[GroupKeys]:
        """What to dial with: this epoch's keys, then older held epochs' (newest first)."""
        assert self.keys is not None
        if self.state != "member" or self.epoch is None:
            return [self.keys]
        return [self.keys, *self.epochs.older(self.roster.view(), self.epoch)]
