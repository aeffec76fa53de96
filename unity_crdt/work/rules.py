"""The rules of collective work, sans-IO: who holds a task or a lease, when a claim has expired,
which worker a task prefers, how retries back off, and whether a fencing token is current.

Theory of operation
===================

A job is `n` inputs run `k` times each (redundancy): `n * k` tasks, each keyed "i" (k = 1) or
"i.s" (slot s). Working on a task means *claiming* it: a record (task, attempt, device, token,
state) in the job's CRDT doc. States: "run" (working), "ok" (result), "err" (the handler
failed), "lost" (the claimant learnt it no longer held the task and dropped its result).

Claims are ranked by (attempt, token, device), the smaller device id winning a tie. The
*current* claim of a task is the highest-ranked claim that is not "lost". From the claims and
the clock of the node judging (`now`, monotonic, local) a task is:

- DONE: some claim is "ok" (the accepted result is the highest-ranked "ok" claim);
- FAILED: the current claim is "err", or "run" and expired, with `attempts >= max_attempts`;
- RETRY: the current claim is "err" with attempts left; claimable after `backoff(attempts)`;
- EXPIRED: the current claim is "run" but its holder showed no sign of life for `lease`
  seconds (by this node's clock: no wall clocks are ever compared between machines);
- RUNNING: the current claim is "run" and its holder is alive;
- PENDING: nobody claimed it (or every claim was dropped).

In LAN mode two workers may claim the same attempt concurrently (a partition, or the instant a
claim is in flight): every node ranks the same set of claims the same way, so all agree on the
winner once they have the same claims; the loser's `task.lost` fires and its result is dropped.
In strict mode the NATS key-value store decides (compare-and-set); the records here then only
mirror what the server decided, for progress and results.

Workers prefer tasks by rendezvous hashing: every node orders the live workers of a kind by a
hash of (job, input, device) and the first `k` of that order own the input's `k` slots. With the
same view of the workers, nobody claims what another owns, so without faults no two workers
claim the same task. Nobody takes a task from a live owner either: an owner with a long
backlog *hands off* tasks from its tail to an idle peer (`handoff`, recorded in the job's
doc), and never claims them afterwards, so a hand-off cannot race the owner's claims. Tasks of
an owner that is no longer live go to the next worker in their rendezvous order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "ERR",
    "LOST",
    "OK",
    "RUN",
    "Claim",
    "Fence",
    "LeaseClaim",
    "State",
    "Verdict",
    "backoff",
    "given_up",
    "handoff",
    "is_lost",
    "judge",
    "lease_holder",
    "live_workers",
    "next_lease_token",
    "owners",
    "task_key",
    "task_position",
]

RUN, OK, ERR, LOST = "run", "ok", "err", "lost"
STATES = (RUN, OK, ERR, LOST)
BACKOFF_BASE = 0.5  # seconds before the second attempt; doubled for each further one
BACKOFF_MAX = 30.0
HANDOFF_KEEP = 4  # tasks an owner keeps beyond twice its concurrency before it gives any away

_TASK_KEY = re.compile(r"(0|[1-9][0-9]{0,8})(?:\.(0|[1-9][0-9]{0,3}))?")
_INVERT = str.maketrans(
    {chr(c): chr(0x10FFFF - c) for c in range(ord("0"), ord("z") + 1)}
)  # device ids are lower-case base32: inverting them makes "smaller id wins" a max()


def task_key(index: int, slot: int, redundancy: int) -> str:
    """The key of input `index`, slot `slot` within its job: "7", or "7.1" with redundancy."""
    return str(index) if redundancy == 1 else f"{index}.{slot}"


def task_position(key: str) -> tuple[int, int]:
    """(input index, slot) of a task key; ValueError if it is not one."""
    m = _TASK_KEY.fullmatch(key)
    if m is None:
        raise ValueError(f"not a task key: {key!r}")
    return int(m[1]), int(m[2] or 0)


@dataclass(frozen=True, slots=True)
class Claim:
    """One claim of a task, as recorded in the job's doc."""

    task: str
    attempt: int
    device: str
    token: int  # LAN: the attempt; strict: the key-value revision (the fencing token)
    state: str  # RUN, OK, ERR or LOST
    strict: bool = False

    @property
    def key(self) -> str:
        """The claim's key in the doc: one per (task, attempt, device)."""
        return f"{self.task}|{self.attempt}|{self.device}"

    @property
    def rank(self) -> tuple[int, int, str]:
        """Higher wins: attempt, then token, then the smaller device id."""
        return (self.attempt, self.token, self.device.translate(_INVERT))


class State(Enum):
    """What a task is, as one node judges it now."""

    PENDING = "pending"
    RUNNING = "running"
    EXPIRED = "expired"
    RETRY = "retry"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A task's state, the claim that decided it, and how many attempts were made."""

    state: State
    current: Claim | None
    attempts: int
    at: float = 0.0  # RETRY: when the next attempt may start; EXPIRED/RUNNING: holder's last life

    @property
    def final(self) -> bool:
        """Whether the task is finished (done or failed for good)."""
        return self.state in (State.DONE, State.FAILED)


def backoff(attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failed attempt before the next one."""
    return min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** max(0, attempts - 1))


def judge(
    claims: Iterable[Claim],
    *,
    me: str,
    now: float,
    lease: float,
    max_attempts: int,
    last_alive: Callable[[Claim], float],
    seen_at: Callable[[Claim], float],
) -> Verdict:
    """The state of one task from its claims. `last_alive(claim)` is when this node last saw a
    sign of life of the claim's holder (a heartbeat, a link, the claim itself arriving);
    `seen_at(claim)` is when this node first saw the claim in its present state."""
    best_ok: Claim | None = None
    current: Claim | None = None
    attempts = 0
    for c in claims:
        attempts = max(attempts, c.attempt)
        if c.state == OK:
            if best_ok is None or c.rank > best_ok.rank:
                best_ok = c
        elif c.state != LOST and (current is None or c.rank > current.rank):
            current = c
    if best_ok is not None:
        return Verdict(State.DONE, best_ok, attempts)
    if current is None:
        return Verdict(State.PENDING, None, attempts)
    if current.state == ERR:
        if attempts >= max_attempts:
            return Verdict(State.FAILED, current, attempts)
        return Verdict(State.RETRY, current, attempts, seen_at(current) + backoff(attempts))
    seen = last_alive(current)
    if current.device == me or now - seen <= lease:
        return Verdict(State.RUNNING, current, attempts, seen)
    if attempts >= max_attempts:
        return Verdict(State.FAILED, current, attempts, seen)
    return Verdict(State.EXPIRED, current, attempts, seen)


def given_up(entry: Mapping[str, object], claims: Iterable[Claim]) -> bool:
    """Whether a strict claim's key-value entry may be replaced before the server lets it go:
    it is closed (its holder finished: it holds nothing now), and that holder then recorded
    the claim as LOST in the doc (the close was never confirmed to it, so it dropped the
    result). Waiting out the closed entry's TTL would only delay the task's next run. A live
    entry (not closed) is never replaced: the server alone decides when it passes on."""
    if "s" not in entry:
        return False
    return any(
        c.strict and c.state == LOST and c.device == entry.get("d") and c.attempt == entry.get("a")
        for c in claims
    )


def is_lost(mine: Claim, claims: Iterable[Claim]) -> bool:
    """Whether `mine` no longer holds its task: another live claim outranks it, or another
    claim already produced the result."""
    for c in claims:
        if c.key == mine.key or c.state == LOST:
            continue
        if c.state == OK or c.rank > mine.rank:
            return True
    return False


def owners(job_id: str, index: int, workers: Iterable[str]) -> list[str]:
    """The live workers in the preference order of input `index` (rendezvous hashing): slot s
    of the input is owned by the s-th."""
    salt = f"{job_id}/{index}/".encode()
    return sorted(workers, key=lambda d: hashlib.blake2b(salt + d.encode(), digest_size=8).digest())


def handoff(
    backlog: int, concurrency: int, peer_backlog: int, peer_running: int, peer_concurrency: int
) -> int:
    """How many of its unclaimed tasks an owner hands to an idle peer (0 if none).

    Only the owner of a task ever gives it away (it writes the hand-off, then never claims
    it), so a hand-off can never race the owner's own claims. A peer gets work when it has
    none queued and free slots; the owner keeps twice its concurrency plus `HANDOFF_KEEP`, and
    gives at most half of the rest."""
    if peer_backlog > 0 or peer_running >= peer_concurrency:
        return 0
    spare = backlog - 2 * concurrency - HANDOFF_KEEP
    return max(0, min(2 * peer_concurrency, spare // 2))


# -- leases ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseClaim:
    """One device's entry for a lease in the group's leases doc."""

    name: str
    device: str
    token: int
    held: bool
    ttl: float
    strict: bool = False

    @property
    def rank(self) -> tuple[int, str]:
        """Higher wins: the token, then the smaller device id."""
        return (self.token, self.device.translate(_INVERT))


def lease_holder(
    claims: Iterable[LeaseClaim],
    *,
    me: str,
    now: float,
    last_alive: Callable[[LeaseClaim], float],
) -> LeaseClaim | None:
    """Who holds the lease among held entries whose holder is alive (this node's clock)."""
    best: LeaseClaim | None = None
    for c in claims:
        if not c.held or (c.device != me and now - last_alive(c) > c.ttl):
            continue
        if best is None or c.rank > best.rank:
            best = c
    return best


def next_lease_token(claims: Iterable[LeaseClaim]) -> int:
    """The token of the next acquisition: above every token ever seen for the name."""
    return max((c.token for c in claims), default=0) + 1


class Fence:
    """A resource's side of fencing: accept a write only with the newest token seen for a name.

    `check(name, token)` is True (and remembers the token) unless an equal-or-newer token was
    already used by someone else, i.e. the writer's lease has since passed on.
    """

    def __init__(self, seen: Mapping[str, int] | None = None) -> None:
        self._seen: dict[str, int] = dict(seen or {})

    def check(self, name: str, token: int) -> bool:
        """Whether a write carrying `token` for `name` is current (then it becomes the newest)."""
        newest = self._seen.get(name, 0)
        if token < newest:
            return False
        self._seen[name] = token
        return True

    def newest(self, name: str) -> int:
        """The newest token accepted for `name` (0 if none)."""
        return self._seen.get(name, 0)


def live_workers(
    kinds: Mapping[str, Mapping[str, int]], kind: str, alive: Callable[[str], bool]
) -> dict[str, int]:
    """Devices serving `kind` that are alive, with their concurrency."""
    return {d: k[kind] for d, k in kinds.items() if kind in k and alive(d)}
