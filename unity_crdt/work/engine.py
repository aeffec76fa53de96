"""The work engine: runs this node's workers, claims tasks, records results, follows jobs.

Driven by the boards' change callbacks (coalesced into one `_fill` per loop turn) and by a
scan every `heartbeat / 4` seconds (expired holders, due retries, renewals, lease deadlines).
Claims go to the NATS key-value store when it is reachable (strict) and are recorded in the
job's doc either way, so every node sees who works on what (see `rules` for the semantics).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import secrets
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pycrdt

from ..errors import ConfigError, CoordinationError, JobFailed, UnityCrdtError
from ..status import JobStatus, Progress
from . import rules
from ._kv import KvStore, task_kv_key
from .board import (
    BEATS_DOC,
    JOB_PREFIX,
    JOBS_DOC,
    BeatBoard,
    JobBoard,
    JobIndex,
    JobSpec,
    check_job_id,
)
from .jobs import Job, Task
from .rules import ERR, LOST, OK, RUN, Claim, State, Verdict

__all__ = ["Handler", "WorkEngine"]

log = logging.getLogger(__name__)

Handler = Callable[[Task], Any]
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]
IDLE_BEATS = 15  # an idle node beats once every this many heartbeats (it stays registered)


@dataclass
class _Worker:
    kind: str
    handler: Handler
    concurrency: int
    running: dict[str, _Run] = field(default_factory=dict)  # claim key -> run
    claiming: int = 0


@dataclass
class _Run:
    job: _JobState
    claim: Claim
    task: Task
    kv_key: str | None = None
    rev: int = 0  # strict: the key's revision now (renewals move it)
    valid_until: float = 0.0  # strict: no later than the server's expiry of our claim
    renewed_at: float = 0.0
    renewing: bool = False
    closing: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # renewals and the close take turns


@dataclass
class _JobState:
    board: JobBoard
    finished: dict[str, Verdict] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    queues: dict[str | None, deque[str]] = field(default_factory=dict)  # owner -> tasks
    queued: dict[str, str | None] = field(default_factory=dict)  # task -> owner, unclaimed
    backlog: dict[str | None, int] = field(default_factory=dict)  # owner -> unclaimed tasks
    running_by: dict[str, str] = field(default_factory=dict)  # running task -> its holder
    watch: set[str] = field(default_factory=set)  # tasks to re-judge over time
    claiming: set[str] = field(default_factory=set)
    blocked_until: dict[str, float] = field(default_factory=dict)  # strict: held elsewhere
    done: asyncio.Event = field(default_factory=asyncio.Event)
    built: bool = False


class WorkEngine:
    """This node's side of collective work (constructed by the node, which owns the tasks)."""

    def __init__(
        self,
        *,
        device_id: str,
        name: str,
        doc: Callable[[str], pycrdt.Doc[Any]],
        has: Callable[[str], bool],
        connected: Callable[[], set[str]],
        spawn: Spawn,
        kv: KvStore | None,
        heartbeat: float,
        now: Callable[[], float],
        clock: Callable[[], float],
    ) -> None:
        self.me = device_id
        self.name = name
        self._doc = doc
        self._has = has
        self._connected = connected
        self._spawn = spawn
        self.kv = kv
        self.heartbeat = heartbeat
        self.now = now
        self.clock = clock  # wall clock: only for display (submitted_at), never for decisions
        self.workers: dict[str, _Worker] = {}
        self.jobs: dict[str, _JobState] = {}
        self._kicked = False
        self._live: dict[str, dict[str, int]] = {}
        self.beats: BeatBoard | None = None
        self._index: JobIndex | None = None
        self._started = False
        self.engaged_by_leases: Callable[[], bool] = lambda: False
        self._peers: tuple[float, set[str]] = (float("-inf"), set())

    def connected(self) -> set[str]:
        """Device ids linked right now (asked of the node at most every 50 ms)."""
        now = self.now()
        if now - self._peers[0] > 0.05:
            self._peers = (now, self._connected())
        return self._peers[1]

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the heartbeat and scan loops; open the work docs if this node has them."""
        self._started = True
        self._spawn(self._beat_loop(), "work heartbeat")
        self._spawn(self._scan_loop(), "work scan")
        self._open_if_present()

    def _open(self) -> JobIndex:
        """Open the jobs index and the heartbeats (a node that never works has neither doc)."""
        if self._index is None:
            self.beats = BeatBoard(self._doc(BEATS_DOC), now=self.now, on_change=self.kick)
            self._index = JobIndex(self._doc(JOBS_DOC), self._on_job)
        return self._index

    def _open_if_present(self) -> None:
        if self._index is None and (self._has(JOBS_DOC) or self._has(BEATS_DOC)):
            self._open()

    def close(self) -> None:
        """Stop observing the docs (the node cancels the tasks)."""
        for st in self.jobs.values():
            st.board.close()
        if self.beats is not None:
            self.beats.close()
        if self._index is not None:
            self._index.close()

    # -- public side --------------------------------------------------------------------------

    def add_worker(self, kind: str, handler: Handler, concurrency: int) -> None:
        """Serve tasks of `kind` with `handler`, at most `concurrency` at once."""
        if not isinstance(kind, str) or not kind or len(kind) > 200:
            raise ConfigError("a task kind is a non-empty string of at most 200 characters")
        if concurrency < 1:
            raise ConfigError("concurrency must be >= 1")
        if kind in self.workers:
            raise ConfigError(f"this node already has a worker for {kind!r}")
        self.workers[kind] = _Worker(kind, handler, concurrency)
        if self._started:
            self._open()
            self._beat()
            self.kick()

    async def submit(
        self, kind: str, inputs: list[Any], lease: float, max_attempts: int, redundancy: int
    ) -> Job:
        """Record a new job; workers anywhere in the group pick it up."""
        if not self._started:
            raise UnityCrdtError("node is not started")
        index = self._open()
        if not isinstance(kind, str) or not kind:
            raise ConfigError("kind must be a non-empty string")
        if lease < 3 * self.heartbeat:
            raise ConfigError(f"lease must be at least 3 heartbeats ({3 * self.heartbeat} s)")
        if max_attempts < 1 or redundancy < 1:
            raise ConfigError("max_attempts and redundancy must be >= 1")
        try:
            inputs = json.loads(json.dumps(list(inputs)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"inputs must be JSON values: {exc}") from None
        spec = JobSpec(
            job_id=_new_job_id(),
            kind=kind,
            inputs=tuple(inputs),
            redundancy=redundancy,
            lease=float(lease),
            max_attempts=max_attempts,
            by=self.me,
            at=self.clock(),
        )
        board = self._board(spec.job_id)
        board.write_spec(spec)
        index.add(spec)
        return Job(self, spec.job_id)

    def job(self, job_id: str) -> Job:
        """A handle on a job by id (its doc may still be on its way to this node)."""
        check_job_id(job_id)
        if not self._started:
            raise UnityCrdtError("node is not started")
        self._open()
        self._board(job_id)
        return Job(self, job_id)

    def spec(self, job_id: str) -> JobSpec | None:
        """The job's spec, once known here."""
        st = self.jobs.get(job_id)
        return st.board.spec if st else None

    def progress(self, job_id: str) -> Progress:
        """Tasks in all, done, failed, running."""
        st = self.jobs.get(job_id)
        if st is None or st.board.spec is None:
            return Progress(0, 0, 0, 0)
        done = sum(1 for v in st.finished.values() if v.state == State.DONE)
        failed = len(st.finished) - done
        running = 0
        for task in st.board.claims:
            if task not in st.finished and self._judge(st, task).state == State.RUNNING:
                running += 1
        return Progress(st.board.spec.total, done, failed, running)

    async def wait(self, job_id: str, timeout: float | None) -> None:
        """Until every task of the job is done or failed."""
        st = self.jobs.get(job_id) or self.jobs[self.job(job_id).id]
        async with asyncio.timeout(timeout):
            await st.done.wait()

    def results(self, job_id: str) -> list[Any]:
        """Results in input order; JobFailed if some task failed for good."""
        st = self.jobs[job_id]
        spec = st.board.spec
        assert spec is not None
        out: list[Any] = []
        failures: dict[int, str] = {}
        for i in range(len(spec.inputs)):
            slots = []
            for s in range(spec.redundancy):
                v = st.finished.get(rules.task_key(i, s, spec.redundancy))
                if v is not None and v.state == State.DONE and v.current is not None:
                    slots.append(st.board.values.get(v.current.key))
                else:
                    slots.append(None)
                    if v is not None and v.current is not None:
                        error = (
                            st.board.values.get(v.current.key) if v.current.state == ERR else None
                        )
                        failures.setdefault(i, str(error or "lease expired: the worker was lost"))
            out.append(slots[0] if spec.redundancy == 1 else slots)
        if failures:
            raise JobFailed(job_id, failures, out)
        return out

    def job_statuses(self) -> list[JobStatus]:
        """Every job known here, for status views."""
        out = []
        for job_id, st in self.jobs.items():
            spec = st.board.spec
            if spec is None:
                continue
            p = self.progress(job_id)
            out.append(
                JobStatus(job_id, spec.kind, p.total, p.done, p.failed, p.running, spec.by, spec.at)
            )
        return sorted(out, key=lambda j: j.submitted_at)

    @property
    def running(self) -> int:
        """Tasks running on this node now."""
        return sum(len(w.running) for w in self.workers.values())

    # -- boards -------------------------------------------------------------------------------

    def _on_job(self, job_id: str, rec: dict[str, Any]) -> None:
        self._board(job_id)

    def _board(self, job_id: str) -> JobBoard:
        st = self.jobs.get(job_id)
        if st is None:
            doc = self._doc(JOB_PREFIX + job_id)
            st = _JobState(
                JobBoard(job_id, doc, now=self.now, on_change=lambda b, t: self._on_change(b, t))
            )
            self.jobs[job_id] = st
            self._on_change(st.board, set(st.board.claims))
        return st.board

    def _on_change(self, board: JobBoard, tasks: set[str]) -> None:
        st = self.jobs.get(board.job_id)
        if st is None or board.spec is None:
            return  # the constructor's first call, or a spec still on its way
        if not st.built:
            st.built = True
            tasks = set(board.spec.task_keys())
            if board.spec.kind in self.workers:
                self._build_queues(st)
        for task in tasks:
            self._rejudge(st, task)
        self._check_done(st)
        self.kick()

    def _rejudge(self, st: _JobState, task: str) -> Verdict:
        v = self._judge(st, task)
        if v.final:
            if task not in st.finished:
                st.finished_at[task] = self.now()
            st.finished[task] = v
            st.watch.discard(task)
        else:
            st.finished.pop(task, None)
            if v.state != State.PENDING:
                st.watch.add(task)
        if v.state in (State.RUNNING, State.DONE, State.FAILED):
            self._dequeue(st, task)
        elif task in st.queued and task in st.board.handoffs and st.board.spec is not None:
            live = sorted(self._live.get(st.board.spec.kind, {}))
            owner = self._owner(st, task, live)
            if owner != st.queued[task]:  # handed off to someone: into their queue
                self._dequeue(st, task)
                self._push(st, task, owner)
        if v.state == State.RUNNING and v.current is not None:
            st.running_by[task] = v.current.device
        else:
            st.running_by.pop(task, None)
        for worker in self.workers.values():
            for run in worker.running.values():
                if run.job is st and run.claim.task == task and not run.task.lost.is_set():
                    done_elsewhere = (
                        v.state == State.DONE and v.current and v.current.key != run.claim.key
                    )
                    if done_elsewhere or (
                        not run.claim.strict
                        and rules.is_lost(run.claim, st.board.task_claims(task))
                    ):
                        run.task.lost.set()
        return v

    def _check_done(self, st: _JobState) -> None:
        spec = st.board.spec
        if spec is not None and len(st.finished) >= spec.total:
            st.done.set()
        else:
            st.done.clear()

    def _judge(self, st: _JobState, task: str) -> Verdict:
        spec = st.board.spec
        assert spec is not None
        now = self.now()
        connected = self.connected()
        beats = self.beats.last_beat if self.beats else {}

        def last_alive(c: Claim) -> float:
            if c.device in connected:
                return now
            return max(beats.get(c.device, float("-inf")), st.board.seen_at.get(c.key, now))

        return rules.judge(
            st.board.task_claims(task),
            me=self.me,
            now=now,
            lease=spec.lease,
            max_attempts=spec.max_attempts,
            last_alive=last_alive,
            seen_at=lambda c: st.board.seen_at.get(c.key, now),
        )

    # -- who works on what --------------------------------------------------------------------

    def _alive(self, device: str) -> bool:
        if device == self.me or device in self.connected():
            return True
        if self.beats is None:
            return False
        seen = self.beats.last_beat.get(device)
        return seen is not None and self.now() - seen <= 3 * self.heartbeat

    def _live_workers(self, kind: str) -> dict[str, int]:
        kinds = dict(self.beats.kinds) if self.beats is not None else {}
        kinds[self.me] = {k: w.concurrency for k, w in self.workers.items()}
        return rules.live_workers(kinds, kind, self._alive)

    def _build_queues(self, st: _JobState) -> None:
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

    def _enqueue(self, st: _JobState, task: str, live: list[str]) -> None:
        self._push(st, task, self._owner(st, task, live))

    def _owner(self, st: _JobState, task: str, live: list[str]) -> str | None:
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
    def _push(st: _JobState, task: str, owner: str | None) -> None:
        if task in st.queued:
            return
        st.queues.setdefault(owner, deque()).append(task)
        st.queued[task] = owner
        st.backlog[owner] = st.backlog.get(owner, 0) + 1

    @staticmethod
    def _dequeue(st: _JobState, task: str, owner: object = ...) -> bool:
        """Forget a queued task (claimed, or taken from `owner`'s queue); False if it was not
        queued (for that owner: a task handed off stays behind in its old deque)."""
        if task not in st.queued or (owner is not ... and st.queued[task] != owner):
            return False
        st.backlog[st.queued.pop(task)] -= 1
        return True

    def kick(self) -> None:
        """Look for work at the end of this loop turn (coalesced)."""
        if not self._kicked:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._fill)

    def _fill(self) -> None:
        self._kicked = False
        for kind, worker in self.workers.items():
            live = self._live_workers(kind)
            if live != self._live.get(kind):
                self._live[kind] = live
                for st in self.jobs.values():
                    if st.board.spec and st.board.spec.kind == kind and not st.done.is_set():
                        self._build_queues(st)
            free = worker.concurrency - len(worker.running) - worker.claiming
            if free <= 0:
                continue
            open_jobs = [
                st
                for st in self.jobs.values()
                if st.board.spec and st.board.spec.kind == kind and not st.done.is_set()
            ]
            open_jobs.sort(key=lambda st: st.board.spec.at if st.board.spec else 0.0)
            for st in open_jobs:
                free = self._take(worker, st, free, live)
                if free <= 0:
                    break
        for st in self.jobs.values():
            st.board.flush()

    def _take(self, worker: _Worker, st: _JobState, free: int, live: dict[str, int]) -> int:
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

    def _hand_off(self, worker: _Worker, st: _JobState, live: dict[str, int]) -> None:
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

    def _try_claim(self, worker: _Worker, st: _JobState, task: str) -> bool | None:
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

    def _eligible(self, st: _JobState, task: str) -> bool:
        spec = st.board.spec
        if spec is None or spec.redundancy == 1:
            return True
        index, slot = rules.task_position(task)
        return all(
            self._slot_holder(st, rules.task_key(index, s, spec.redundancy)) != self.me
            for s in range(spec.redundancy)
            if s != slot
        )

    def _slot_holder(self, st: _JobState, task: str) -> str | None:
        """The device whose claim of `task` counts (its result, or its live claim)."""
        v = st.finished.get(task) or self._judge(st, task)
        if v.current is None or v.state in (State.EXPIRED, State.FAILED):
            return None
        return v.current.device

    async def _claim_strict(self, worker: _Worker, st: _JobState, task: str, attempt: int) -> None:
        assert self.kv is not None and st.board.spec is not None
        lease = st.board.spec.lease
        key = task_kv_key(st.board.job_id, task)
        sent = self.now()
        try:
            rev = await self.kv.create(key, {"d": self.me, "a": attempt}, lease)
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
        run = self._start(worker, st, claim)
        run.kv_key, run.rev = key, rev
        run.valid_until, run.renewed_at = sent + lease, sent
        st.board.flush()

    # -- running ------------------------------------------------------------------------------

    def _start(self, worker: _Worker, st: _JobState, claim: Claim) -> _Run:
        spec = st.board.spec
        assert spec is not None
        index, slot = rules.task_position(claim.task)
        task = Task(
            id=f"{st.board.job_id}/{claim.task}",
            job_id=st.board.job_id,
            kind=spec.kind,
            index=index,
            slot=slot,
            input=spec.inputs[index],
            attempt=claim.attempt,
            token=claim.token,
        )
        run = _Run(st, claim, task)
        worker.running[claim.key] = run
        st.watch.add(claim.task)
        self._spawn(self._run(worker, run), f"work {task.id}")
        return run

    async def _run(self, worker: _Worker, run: _Run) -> None:
        ok = False
        value: Any
        try:
            out = worker.handler(run.task)
            if inspect.isawaitable(out):
                out = await out
            value = json.loads(json.dumps(out))
            ok = True
        except asyncio.CancelledError:
            worker.running.pop(run.claim.key, None)
            raise
        except Exception as exc:
            value = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        try:
            await self._finish(run, ok, value)
        finally:
            worker.running.pop(run.claim.key, None)
            self._rejudge(run.job, run.claim.task)
            self._check_done(run.job)
            self.kick()

    async def _finish(self, run: _Run, ok: bool, value: Any) -> None:
        st, claim = run.job, run.claim
        spec = st.board.spec
        assert spec is not None
        state = OK if ok else ERR
        if not run.task.lost.is_set() and claim.strict:
            state = await self._commit_strict(run, ok, spec)
        elif not run.task.lost.is_set() and rules.is_lost(claim, st.board.task_claims(claim.task)):
            run.task.lost.set()
        if run.task.lost.is_set():
            state = LOST
        final = Claim(claim.task, claim.attempt, claim.device, claim.token, state, claim.strict)
        st.board.write(final, value if state in (OK, ERR) else None)
        st.board.flush()

    async def _commit_strict(self, run: _Run, ok: bool, spec: JobSpec) -> str:
        """Close our claim in the key-value store: the fence. LOST if it had passed on."""
        assert self.kv is not None and run.kv_key is not None
        last_try = ok or run.claim.attempt >= spec.max_attempts
        # A failed attempt's marker lives as long as its backoff, so the server paces retries.
        ttl = max(60.0, 4 * spec.lease) if last_try else rules.backoff(run.claim.attempt)
        payload = {"d": self.me, "a": run.claim.attempt, "s": OK if ok else ERR}
        run.closing = True
        async with run.lock:  # a renewal in flight moves the revision we must close
            rev = await self._close_claim(run, payload, ttl)
        if rev is None:
            run.task.lost.set()
            return LOST
        return OK if ok else ERR

    async def _close_claim(self, run: _Run, payload: dict[str, Any], ttl: float) -> int | None:
        assert self.kv is not None and run.kv_key is not None
        while True:
            try:
                return await self.kv.update(run.kv_key, payload, run.rev, ttl)
            except CoordinationError as exc:
                if self.now() >= run.valid_until:
                    log.warning("task %s: could not close its claim (%s)", run.task.id, exc)
                    return None
                await asyncio.sleep(0.2)

    # -- loops --------------------------------------------------------------------------------

    def _engaged(self) -> bool:
        if self.running or self.engaged_by_leases():
            return True
        kinds = set(self.workers)
        return any(
            st.board.spec and st.board.spec.kind in kinds and not st.done.is_set()
            for st in self.jobs.values()
        )

    def _beat(self) -> None:
        if self.beats is None:
            return
        kinds = {k: w.concurrency for k, w in self.workers.items()}
        self.beats.beat(self.me, self.name, kinds)

    async def _beat_loop(self) -> None:
        idle = IDLE_BEATS
        while True:
            idle += 1
            if self._engaged() or idle >= IDLE_BEATS:
                idle = 0
                self._beat()
            await asyncio.sleep(self.heartbeat)

    async def _scan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat / 4)
            self._open_if_present()
            self.scan()

    def scan(self) -> None:
        """Re-judge what time changes: holders going quiet, retries coming due, renewals."""
        now = self.now()
        for st in self.jobs.values():
            if st.board.spec is None or not st.watch:
                continue
            live = sorted(self._live_workers(st.board.spec.kind))
            for task in list(st.watch):
                v = self._rejudge(st, task)
                due = v.state == State.EXPIRED or (v.state == State.RETRY and v.at <= now)
                if v.state == State.PENDING and task in st.blocked_until:
                    due = st.blocked_until[task] <= now  # strict: ask the server again
                if due and task not in st.claiming:
                    st.blocked_until.pop(task, None)
                    st.watch.discard(task)
                    self._enqueue(st, task, live)
            self._check_done(st)
        for worker in self.workers.values():
            for run in worker.running.values():
                if run.kv_key is None or run.task.lost.is_set() or run.closing:
                    continue
                if now >= run.valid_until:
                    run.task.lost.set()  # we cannot prove we still hold it: assume we do not
                elif not run.renewing and now - run.renewed_at >= run.job.board.spec.lease / 3:  # type: ignore[union-attr]
                    run.renewing = True
                    self._spawn(self._renew(run), "work renew")
        self.kick()

    async def _renew(self, run: _Run) -> None:
        assert self.kv is not None and run.kv_key is not None and run.job.board.spec
        lease = run.job.board.spec.lease
        try:
            async with run.lock:
                if run.closing:
                    return
                sent = self.now()
                rev = await self.kv.update(
                    run.kv_key, {"d": self.me, "a": run.claim.attempt}, run.rev, lease
                )
        except CoordinationError:
            return  # try again next scan; the deadline stays where it was
        finally:
            run.renewing = False
        if rev is None:
            run.task.lost.set()
        else:
            run.rev, run.renewed_at, run.valid_until = rev, sent, sent + lease


def _new_job_id() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
