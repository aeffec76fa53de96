"""Who works on what: queues of tasks by owner (rendezvous), claiming, hand-offs.

A mixin of `WorkEngine`: each job keeps one queue per owner among the live workers of its
kind; this node claims from its own queue, takes tasks of owners that are no longer live, and
hands some of its backlog to idle peers (never taking from a live owner: see `rules`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import CoordinationError
from . import rules
from ._kv import KvStore, task_kv_key
from ._state import JobState, Run, Spawn, Worker
from .rules import RUN, Claim, State, Verdict

__all__ = ["Claiming"]

log = logging.getLogger(__name__)


class Claiming:
    """The claiming half of the work engine."""

    me: str
    kv: KvStore | None
    now: Callable[[], float]
    _spawn: Spawn

    if TYPE_CHECKING:

        def _judge(self, st: JobState, task: str) -> Verdict:
            raise NotImplementedError

        def _live_workers(self, kind: str) -> dict[str, int]:
            raise NotImplementedError

        def _start(self, worker: Worker, st: JobState, claim: Claim, *, spawn: bool = True) -> Run:
            raise NotImplementedError

        async def _run(self, worker: Worker, run: Run) -> None:
            raise NotImplementedError

        def kick(self) -> None:
            raise NotImplementedError

    def _build_queues(self, st: JobState) -> None:
        spec = st.board.spec
        if spec is None:
            return
        live = sorted(self._live_workers(spec.kind))
        st.queues, st.queued, st.backlog = {}, {}, {}
        for task in spec.task_keys():
            if task in st.finished or task in st.claiming:
                continue
            v = self._judge(st, task)
            if v.state == State.RUNNING or v.final:
                continue
            self._enqueue(st, task, live)

    def _enqueue(self, st: JobState, task: str, live: list[str]) -> None:
        self._push(st, task, self._owner(st, task, live))

    def _owner(self, st: JobState, task: str, live: list[str]) -> str | None:
        """The worker that should claim `task`: by rendezvous order; with redundancy, the
        j-th of the workers holding no other slot of the input, for the j-th open slot."""
        spec = st.board.spec
        assert spec is not None
        index, slot = rules.task_position(task)
        given = st.board.handoffs.get(task)
        if given is not None and given in live:
            return given
        order = rules.owners(st.board.job_id, index, live)
        k = spec.redundancy
        if k == 1:
            return order[0] if order else None
        busy: set[str] = set()
        open_slots = []
        for s in range(k):
            holder = self._slot_holder(st, rules.task_key(index, s, k))
            if s == slot or holder is None:
                open_slots.append(s)
            elif holder is not None:
                busy.add(holder)
        free = [d for d in order if d not in busy]
        j = open_slots.index(slot)
        return free[j] if j < len(free) else None

    @staticmethod
    def _push(st: JobState, task: str, owner: str | None) -> None:
        if task in st.queued:
            return
        st.queues.setdefault(owner, deque()).append(task)
        st.queued[task] = owner
        st.backlog[owner] = st.backlog.get(owner, 0) + 1

    @staticmethod
    def _dequeue(st: JobState, task: str, owner: object = ...) -> bool:
        """Forget a queued task (claimed, or taken from `owner`'s queue); False if it was not
        queued (for that owner: a task handed off stays behind in its old deque)."""
        if task not in st.queued or (owner is not ... and st.queued[task] != owner):
            return False
        st.backlog[st.queued.pop(task)] -= 1
        return True

    def _take(self, worker: Worker, st: JobState, free: int, live: dict[str, int]) -> int:
        skipped: list[tuple[str, str | None]] = []  # not for us: back in their queue after
        mine = st.queues.get(self.me)
        while free > 0 and mine:
            task = mine.popleft()
            if self._dequeue(st, task, self.me):
                got = self._try_claim(worker, st, task)
                free -= got is True
                if got is None:
                    skipped.append((task, None))  # a sibling slot is ours: anyone else's
        for owner, queue in st.queues.items():
            if owner == self.me or (owner is not None and owner in live):
                continue  # a live owner's tasks are its own until it hands them off
            while free > 0 and queue:
                task = queue.pop()
                if not self._dequeue(st, task, owner):
                    continue
                got = self._try_claim(worker, st, task)
                free -= got is True
                if got is None:
                    skipped.append((task, owner))
            if free <= 0:
                break
        for task, owner in skipped:
            self._push(st, task, owner)
        self._hand_off(worker, st, live)
        return free

    def _hand_off(self, worker: Worker, st: JobState, live: dict[str, int]) -> None:
        """Give idle live peers some of our backlog (only an owner gives its tasks away)."""
        mine = st.queues.get(self.me)
        if not mine or st.board.spec is None or st.board.spec.redundancy > 1:
            return
        running: dict[str, int] = {}
        for device in st.running_by.values():
            running[device] = running.get(device, 0) + 1
        for peer, concurrency in live.items():
            if peer == self.me:
                continue
            n = rules.handoff(
                st.backlog.get(self.me, 0),
                worker.concurrency,
                st.backlog.get(peer, 0),
                running.get(peer, 0),
                concurrency,
            )
            while n > 0 and mine:
                task = mine.pop()
                if self._dequeue(st, task, self.me):
                    st.board.hand_off(task, peer)
                    self._push(st, task, peer)
                    n -= 1

    def _try_claim(self, worker: Worker, st: JobState, task: str) -> bool | None:
        """Claim `task` if it is claimable: True if claimed, None if only a sibling slot
        of ours stands in the way, False if it is not to be claimed now."""
        if task in st.claiming or st.blocked_until.get(task, 0.0) > self.now():
            return False
        v = self._judge(st, task)
        if v.state == State.RETRY and v.at > self.now():
            return False
        if v.state not in (State.PENDING, State.EXPIRED, State.RETRY):
            if not v.final:
                st.watch.add(task)  # someone holds it: notice when they stop
            return False
        if not self._eligible(st, task):
            return None
        attempt = v.attempts + 1
        if self.kv is not None and self.kv.ready:
            st.claiming.add(task)
            worker.claiming += 1
            self._spawn(self._claim_strict(worker, st, task, attempt), "work claim")
        else:
            claim = Claim(task, attempt, self.me, attempt, RUN)
            st.board.write(claim)
            self._start(worker, st, claim)
        return True

    def _eligible(self, st: JobState, task: str) -> bool:
        spec = st.board.spec
        if spec is None or spec.redundancy == 1:
            return True
        index, slot = rules.task_position(task)
        return all(
            self._slot_holder(st, rules.task_key(index, s, spec.redundancy)) != self.me
            for s in range(spec.redundancy)
            if s != slot
        )

    def _slot_holder(self, st: JobState, task: str) -> str | None:
        """The device whose claim of `task` counts (its result, or its live claim)."""
        v = st.finished.get(task) or self._judge(st, task)
        if v.current is None or v.state in (State.EXPIRED, State.FAILED):
            return None
        return v.current.device

    async def _claim_strict(self, worker: Worker, st: JobState, task: str, attempt: int) -> None:
        assert self.kv is not None and st.board.spec is not None
        lease = st.board.spec.lease
        key = task_kv_key(st.board.job_id, task)
        sent = self.now()
        ours = st.kv_nonces.setdefault(task, set())  # a claim whose answer was lost may be ours
        try:
            rev = await self.kv.create(
                key,
                {"d": self.me, "a": attempt},
                lease,
                ours,
                lambda entry: rules.given_up(entry, st.board.task_claims(task)),
            )
        except CoordinationError as exc:
            log.warning("claim of %s/%s: %s; trying again later", st.board.job_id, task, exc)
            rev = None
        finally:
            st.claiming.discard(task)
            worker.claiming -= 1
        if rev is None:
            # Someone holds it (or held it and the server has not let go yet): look again
            # after a while, or as soon as its doc says it finished.
            st.blocked_until[task] = self.now() + min(lease / 4, 2.0)
            st.watch.add(task)
            self.kick()
            return
        claim = Claim(task, attempt, self.me, rev, RUN, strict=True)
        st.board.write(claim)
        run = self._start(worker, st, claim, spawn=False)
        run.kv_key, run.rev, run.nonces = key, rev, st.kv_nonces.pop(task)
        run.valid_until, run.renewed_at = sent + lease, sent
        self.kick()  # the write is committed with others at the end of this loop turn
        await self._run(worker, run)  # in this task: one task per claimed task, not two
