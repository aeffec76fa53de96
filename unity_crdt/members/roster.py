"""The roster: a grow-only set of signed ops, and the one view every member computes from it.

Theory of operation
===================

State and merge. A roster is the set of its ops (`members.ops`). Merging two rosters is set
union, so it is commutative, associative and idempotent: a state-based CRDT. An op is accepted
only once every op it names in `deps` is present (causal delivery) and its signature verifies
with the Ed25519 key of its author's JOIN, which must lie in the op's past. `view()` is a pure
function of the set: two members holding the same ops see the same members, epoch and
invitations, whatever order the ops arrived in.

Who is a member. A device is admitted by an ADD (a member redeems an invitation for it) or, in
a group nobody was ever revoked from, by its own JOIN made with the group secret (holding the
secret was membership in v1, so a v1 group's roster is built from the devices seen; such a JOIN
enters the roster only over links keyed by the group's PSK). Once a revocation takes effect,
the group secret admits no one new: a JOIN counts only if it happened before (lies in the past
of) an effective revocation.

An op is valid when its author was an active member in the op's past (admitted by an op in
its past, not revoked by one) and no effective revocation of its author fails to follow it:

    revocation wins: a REVOKE of device D voids every op of D that the REVOKE does not
    causally follow (whatever D did concurrently, or claims to have done "before" by naming
    old deps): its invitations, additions, grants, epochs and revocations.

A device whose JOINs name two different signing keys signs nothing valid: its own key never
changes (it is derived from its device key), so a second one means someone else registered a
key for it, and honouring either would let that someone act in its name.

Two devices revoking each other concurrently (a cycle) are both revoked: a device cannot
escape its revocation by revoking the revoker, and which of the two wins is not something a
forger could grind for. Validity is computed as the fixpoint of these rules (revocations void
ops, voided ops admit no one), iterated to a stable set.

Invitations are single use: the first valid ADD redeeming a nonce (in the deterministic order
below) uses it; it must follow the INVITE, come before its expiry (the adder's clock), and
happen in the epoch the invitation was made in.

Epochs. EPOCH ops carry a fresh secret sealed to each member; the current epoch is the valid
EPOCH with the highest number, ties broken by the smaller op id. A rekey is needed whenever
some effective revocation does not precede the current epoch (its target may hold the key):
any active member then issues a new EPOCH. GRANT ops seal an epoch's secret to members its
EPOCH did not name (added later, or concurrently).

Order. Where an order matters (first JOIN of a device, first ADD of a nonce) ops are taken by
(depth in the DAG, op id): a linear extension of the causal order that every member computes
alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..errors import SecurityError
from .ops import NO_EPOCH, Add, Epoch, Grant, Invite, Join, Op, OpKind, decode_op

__all__ = [
    "EpochRecord",
    "InviteRecord",
    "MemberRecord",
    "Roster",
    "RosterView",
]

MAX_OPS = 4096
MAX_PENDING = 1024
_ZERO_NONCE = b"\x00" * 16


@dataclass(frozen=True)
class MemberRecord:
    """A device the roster admitted: its keys and name, who added it, and its state."""

    device_id: str
    name: str
    x25519: bytes
    ed25519: bytes
    state: str  # "active" | "revoked"
    added_by: str  # a device id (the device itself when it joined with the group secret)
    added_at: int  # ms since the Unix epoch (the adder's clock)
    via: str  # "secret" | "invite"
    revoked_by: str | None = None
    revoked_at: int | None = None


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: its number, its EPOCH op (NO_EPOCH for epoch 0), who holds its secret."""

    number: int
    op_id: bytes
    nonce: bytes
    at: int
    sealed: dict[str, bytes] = field(default_factory=dict)  # device -> sealed secret
    ended_at: int | None = None  # when a later epoch began (ms), None while current


@dataclass(frozen=True)
class InviteRecord:
    """One invitation: by whom, for which epoch, until when, and who used it."""

    nonce: bytes
    author: str
    expires: int
    epoch: int
    used_by: str | None


@dataclass(frozen=True)
class RosterView:
    """Everything the ops say, computed once per change of the op set."""

    members: dict[str, MemberRecord]
    epoch: EpochRecord
    epochs: tuple[EpochRecord, ...]  # every valid epoch, by number, epoch 0 first
    invites: dict[bytes, InviteRecord]
    door_open: bool  # no revocation yet: the group secret still admits devices
    needs_rekey: bool  # a revoked device may hold the current epoch's secret
    valid: frozenset[bytes]

    def state(self, device_id: str) -> str | None:
        """ "active", "revoked", or None for a device the roster never admitted."""
        m = self.members.get(device_id)
        return None if m is None else m.state

    def active(self) -> list[str]:
        """Device ids of the active members, sorted."""
        return sorted(d for d, m in self.members.items() if m.state == "active")

    def lacking(self) -> list[str]:
        """Active members who were never given the current epoch's secret."""
        e = self.epoch
        out = []
        for dev in self.active():
            if dev in e.sealed:
                continue
            if e.number == 0 and self.members[dev].via == "secret":
                continue  # it derives epoch 0 from the group secret it holds
            out.append(dev)
        return out


class Roster:
    """The op set of one group, its causal index and its view (see the module docstring)."""

    def __init__(self, group_id: bytes) -> None:
        self.group_id = group_id
        self._ops: dict[bytes, Op] = {}
        self._order: list[bytes] = []  # insertion order (always causal)
        self._index: dict[bytes, int] = {}
        self._anc: dict[bytes, int] = {}  # op id -> bitset of its strict past (by index)
        self._depth: dict[bytes, int] = {}
        self._children: dict[bytes, int] = {}
        self._pending: dict[bytes, Op] = {}
        self._view: RosterView | None = None

    def __len__(self) -> int:
        return len(self._ops)

    def __contains__(self, op_id: object) -> bool:
        return op_id in self._ops

    def get(self, op_id: bytes) -> Op | None:
        """The op with this id, if held."""
        return self._ops.get(op_id)

    @property
    def ops(self) -> list[Op]:
        """Every op, in an order where each op comes after its deps."""
        return [self._ops[i] for i in self._order]

    @property
    def pending(self) -> int:
        """Ops held back until their deps arrive."""
        return len(self._pending)

    def heads(self) -> tuple[bytes, ...]:
        """The ops nothing else depends on: the deps of the next op made here."""
        return tuple(sorted(i for i in self._order if not self._children.get(i)))

    def before(self, a: bytes, b: bytes) -> bool:
        """Whether op `a` lies in the strict past of op `b`."""
        return bool(self._anc[b] >> self._index[a] & 1)

    def add(self, raw: bytes) -> list[Op]:
        """Take one op's bytes; return the ops newly accepted (it, and any it released).

        Raises SecurityError for a malformed op, another group's, or a bad signature. An op
        whose deps are missing is held (bounded) until they arrive.
        """
        op = decode_op(raw)
        if op.group_id != self.group_id:
            raise SecurityError("roster op belongs to another group")
        if op.id in self._ops or op.id in self._pending:
            return []
        if len(self._ops) >= MAX_OPS:
            raise SecurityError(f"roster is full ({MAX_OPS} ops)")
        if not all(d in self._ops for d in op.deps):
            if len(self._pending) >= MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            self._pending[op.id] = op
            return []
        self._insert(op)
        accepted = [op]
        progress = True
        while progress and self._pending:
            progress = False
            for pid, p in list(self._pending.items()):
                if all(d in self._ops for d in p.deps):
                    del self._pending[pid]
                    try:
                        self._insert(p)
                    except SecurityError:
                        continue
                    accepted.append(p)
                    progress = True
        return accepted

    def add_many(self, blobs: Iterable[bytes]) -> tuple[list[Op], list[str]]:
        """Take many ops: (the ops accepted, one line per op refused)."""
        accepted: list[Op] = []
        refused: list[str] = []
        for raw in blobs:
            try:
                accepted += self.add(raw)
            except SecurityError as exc:
                refused.append(str(exc))
        return accepted, refused

    def _insert(self, op: Op) -> None:
        anc = 0
        for d in op.deps:
            anc |= self._anc[d] | (1 << self._index[d])
        if isinstance(op.body, Join):
            key_ok = op.signed_by(op.body.ed25519)
        else:
            key_ok = any(
                o.author == op.author
                and isinstance(o.body, Join)
                and anc >> self._index[o.id] & 1
                and op.signed_by(o.body.ed25519)
                for o in self._ops.values()
                if o.kind is OpKind.JOIN
            )
        if not key_ok:
            raise SecurityError(
                f"roster {op.kind.name} op refused: its signature does not verify with the "
                "key its author joined with"
            )
        self._index[op.id] = len(self._order)
        self._order.append(op.id)
        self._ops[op.id] = op
        self._anc[op.id] = anc
        self._depth[op.id] = 1 + max((self._depth[d] for d in op.deps), default=0)
        for d in op.deps:
            self._children[d] = self._children.get(d, 0) + 1
        self._view = None

    # -- the view ---------------------------------------------------------------------------

    def view(self) -> RosterView:
        """The members, epochs and invitations these ops say (cached until the set changes)."""
        if self._view is None:
            self._view = self._compute()
        return self._view

    def _sorted(self) -> list[Op]:
        return sorted(self._ops.values(), key=lambda o: (self._depth[o.id], o.id))

    def _compute(self) -> RosterView:
        ops = self._sorted()
        valid = {o.id for o in ops}
        for _ in range(len(ops) + 2):
            nxt, _ = self._evaluate(ops, valid)
            if nxt == valid:
                break
            valid = nxt
        _, ctx = self._evaluate(ops, valid)
        return self._build(ops, valid, ctx)

    def _evaluate(self, ops: list[Op], valid: set[bytes]) -> tuple[set[bytes], _Context]:
        """The ops valid if `valid` were the valid set (one step of the fixpoint)."""
        past = self.before
        revokes = [o for o in ops if o.id in valid and o.kind is OpKind.REVOKE]

        revoked_in: dict[str, list[Op]] = {}
        for r in revokes:
            revoked_in.setdefault(r.target, []).append(r)
        contested = self._contested()

        def admit(closers: list[Op]) -> dict[str, list[Op]]:
            # A JOIN admits only while no revocation closed the door, or before one did.
            out: dict[str, list[Op]] = {}
            for o in ops:
                if o.id not in valid:
                    continue
                if (
                    isinstance(o.body, Join)
                    and o.body.secret
                    and (not closers or any(past(o.id, r.id) for r in closers))
                ):
                    out.setdefault(o.author, []).append(o)
                elif isinstance(o.body, Add):
                    out.setdefault(o.body.target, []).append(o)
            return out

        def author_ok(o: Op) -> bool:
            if o.kind is OpKind.JOIN:
                return True
            if o.author in contested:
                return False
            if not any(past(a.id, o.id) for a in admissions.get(o.author, ())):
                return False
            return not any(past(r.id, o.id) for r in revoked_in.get(o.author, ()))

        # Revocations first (they decide the door): one threatened by an effective
        # revocation is void; those threatening each other in cycles all take effect.
        admissions = admit(revokes)
        effective = _effective_revokes([r for r in revokes if author_ok(r)], past)
        admissions = admit(effective)

        def threatened(o: Op) -> bool:
            return any(
                r.target == o.author and r.id != o.id and not past(o.id, r.id) for r in effective
            )

        def epoch_in_past(o: Op) -> int:
            return max(
                (
                    e.body.number
                    for e in ops
                    if e.id in valid and isinstance(e.body, Epoch) and past(e.id, o.id)
                ),
                default=0,
            )

        out: set[bytes] = set()
        used: dict[bytes, Op] = {}
        chosen = {r.id for r in effective}
        for o in ops:
            if o.kind is OpKind.REVOKE:
                if o.id in chosen:  # the cycle rule decided it (threats included)
                    out.add(o.id)
                continue
            if not author_ok(o) or threatened(o):
                continue
            b = o.body
            if isinstance(b, Invite) and b.epoch != epoch_in_past(o):
                continue
            if isinstance(b, Add):
                invite = next(
                    (
                        i
                        for i in ops
                        if i.id in valid
                        and isinstance(i.body, Invite)
                        and i.body.nonce == b.nonce
                        and past(i.id, o.id)
                    ),
                    None,
                )
                joined = any(
                    j.kind is OpKind.JOIN and j.author == b.target and past(j.id, o.id) for j in ops
                )
                if (
                    invite is None
                    or not joined
                    or b.nonce in used
                    or not isinstance(invite.body, Invite)
                    or o.at > invite.body.expires
                    or invite.body.epoch != epoch_in_past(o)
                ):
                    continue
                used[b.nonce] = o
            if isinstance(b, Epoch) and b.number <= epoch_in_past(o):
                continue
            if isinstance(b, Grant) and not self._grant_ok(o, b, ops, valid):
                continue
            out.add(o.id)
        return out, _Context(effective, admissions, used)

    def _contested(self) -> set[str]:
        """Devices whose JOINs name two signing keys: someone registered a key for a device
        it does not hold, so no op signed under that device id counts (its links and data
        are unaffected: they rest on its X25519 key)."""
        keys: dict[str, set[bytes]] = {}
        for o in self._ops.values():
            if isinstance(o.body, Join):
                keys.setdefault(o.author, set()).add(o.body.ed25519)
        return {dev for dev, found in keys.items() if len(found) > 1}

    def _grant_ok(self, o: Op, b: Grant, ops: list[Op], valid: set[bytes]) -> bool:
        if b.epoch == NO_EPOCH:
            return b.number == 0
        e = self._ops.get(b.epoch)
        return (
            e is not None
            and e.id in valid
            and isinstance(e.body, Epoch)
            and e.body.number == b.number
            and self.before(e.id, o.id)
        )

    def _build(self, ops: list[Op], valid: set[bytes], ctx: _Context) -> RosterView:
        joins: dict[str, Op] = {}
        for o in ops:
            if isinstance(o.body, Join) and o.author not in joins:
                joins[o.author] = o
        revoked: dict[str, Op] = {}
        for r in ctx.effective:
            revoked.setdefault(r.target, r)
        members: dict[str, MemberRecord] = {}
        for dev, adms in ctx.admissions.items():
            adms = [a for a in adms if a.id in valid]
            card = joins.get(dev)
            if not adms or card is None or not isinstance(card.body, Join):
                continue
            first = adms[0]
            rev = revoked.get(dev)
            members[dev] = MemberRecord(
                device_id=dev,
                name=card.body.name,
                x25519=card.body.x25519,
                ed25519=card.body.ed25519,
                state="revoked" if rev is not None else "active",
                added_by=first.author,
                added_at=first.at,
                via="secret" if first.kind is OpKind.JOIN else "invite",
                revoked_by=rev.author if rev else None,
                revoked_at=rev.at if rev else None,
            )
        epochs = [(o, o.body) for o in ops if o.id in valid and isinstance(o.body, Epoch)]
        epochs.sort(key=lambda pair: (pair[1].number, pair[0].id))
        grants: dict[bytes, dict[str, bytes]] = {}
        for o in ops:
            if o.id in valid and isinstance(o.body, Grant):
                grants.setdefault(o.body.epoch, {}).setdefault(o.body.device, o.body.sealed)
        starts = sorted(o.at for o, _ in epochs)
        records = [
            EpochRecord(
                0,
                NO_EPOCH,
                _ZERO_NONCE,
                0,
                dict(grants.get(NO_EPOCH, {})),
                starts[0] if starts else None,
            )
        ]
        for o, e in epochs:
            later = [x.at for x, y in epochs if y.number > e.number]
            records.append(
                EpochRecord(
                    e.number,
                    o.id,
                    e.nonce,
                    o.at,
                    {**dict(e.sealed), **grants.get(o.id, {})},
                    min(later) if later else None,
                )
            )
        best = max(records, key=lambda r: (r.number, -int.from_bytes(r.op_id, "big")))
        current = EpochRecord(best.number, best.op_id, best.nonce, best.at, best.sealed, None)
        records = [current if r.op_id == current.op_id else r for r in records]
        needs_rekey = any(
            current.number == 0 or not self.before(r.id, current.op_id) for r in ctx.effective
        )
        invites: dict[bytes, InviteRecord] = {}
        for o in ops:
            if o.id in valid and isinstance(o.body, Invite):
                user = ctx.used.get(o.body.nonce)
                invites[o.body.nonce] = InviteRecord(
                    o.body.nonce,
                    o.author,
                    o.body.expires,
                    o.body.epoch,
                    user.body.target if user is not None and isinstance(user.body, Add) else None,
                )
        return RosterView(
            members=members,
            epoch=current,
            epochs=tuple(records),
            invites=invites,
            door_open=not ctx.effective,
            needs_rekey=needs_rekey,
            valid=frozenset(valid),
        )


@dataclass
class _Context:
    effective: list[Op]
    admissions: dict[str, list[Op]]
    used: dict[bytes, Op]


def _effective_revokes(candidates: list[Op], before: Callable[[bytes, bytes], bool]) -> list[Op]:
    """Which revocations take effect. A revocation threatened by an effective one is void
    (its author was revoked by an op it does not follow); one threatened only by void ones
    takes effect. When every undecided revocation is threatened by another undecided one,
    the cycles nothing else threatens (devices revoking each other) all take effect.
    `before(a, b)`: op a lies in op b's past."""

    def threatens(q: Op, r: Op) -> bool:
        return q.target == r.author and q.id != r.id and not before(r.id, q.id)

    by_id = {r.id: r for r in candidates}
    threats = {r.id: {q.id for q in candidates if threatens(q, r)} for r in candidates}
    effective: set[bytes] = set()
    void: set[bytes] = set()
    undecided = set(by_id)
    while undecided:
        progress = False
        for rid in sorted(undecided):
            if threats[rid] & effective:
                void.add(rid)
            elif threats[rid] <= void:
                effective.add(rid)
            else:
                continue
            undecided.discard(rid)
            progress = True
        if progress:
            continue
        # Stuck: every undecided one is threatened by another. Take the strongly connected
        # groups that no other undecided revocation threatens: all their members take effect.
        reach = {r: _reachable(r, threats, undecided) for r in undecided}
        for rid in sorted(undecided):
            group = {s for s in reach[rid] if rid in reach[s]} | {rid}
            outside = set().union(*(threats[s] for s in group)) & undecided
            if outside <= group:
                effective |= group
        undecided -= effective
    return [r for r in candidates if r.id in effective]


def _reachable(start: bytes, threats: dict[bytes, set[bytes]], within: set[bytes]) -> set[bytes]:
    """Revocations that threaten `start`, directly or through others (within `within`)."""
    seen: set[bytes] = set()
    todo = [start]
    while todo:
        for q in threats[todo.pop()] & within:
            if q not in seen:
                seen.add(q)
                todo.append(q)
    return seen
