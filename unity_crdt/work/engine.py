"""The work engine: runs this node's workers, claims tasks, records results, follows jobs.

Driven by the boards' change callbacks (coalesced into one `_fill` per loop turn) and by a
scan every `heartbeat / 4` seconds (expired holders, due retries, renewals, lease deadlines).
Claims go to the NATS key-value store when it is reachable (strict) and are recorded in the
job's doc either way, so every node sees who works on what (see `rules` for the semantics).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

import pycrdt

from ..errors import ConfigError, JobFailed, UnityCrdtError
from ..status import JobStatus, Progress
from . import rules
from ._claims import Claiming
from ._kv import KvStore
from ._runs import Running
from ._state import Handler, JobState, Spawn, Worker
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
from .jobs import Job
from .rules import ERR, Claim, State, Verdict

__all__ = ["WorkEngine"]

log = logging.getLogger(__name__)

IDLE_BEATS = 15  # an idle node beats once every this many heartbeats (it stays registered)


class WorkEngine(Claiming, Running):
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
        self.workers: dict[str, Worker] = {}
        self.jobs: dict[str, JobState] = {}
        self._kicked = False
        self._live: dict[str, dict[str, int]] = {}
        self.beats: BeatBoard | None = None
        self._index: JobIndex | None = None
        self._started = False
        self.engaged_by_leases: Callable[[], bool] = lambda: False
        self.on_use: Callable[[], None] = lambda: None  # the first use (connects strict mode)
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
            self.on_use()
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
        self.workers[kind] = Worker(kind, handler, concurrency)
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
            st = JobState(
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

    def _rejudge(self, st: JobState, task: str) -> Verdict:
        v = self._judge(st, task)
        if v.final:
            if task not in st.finished:
                st.finished_at[task] = self.now()
            st.finished[task] = v
            st.watch.discard(task)
            st.kv_nonces.pop(task, None)
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

    def _check_done(self, st: JobState) -> None:
        spec = st.board.spec
        if spec is not None and len(st.finished) >= spec.total:
            st.done.set()
        else:
            st.done.clear()

    def _judge(self, st: JobState, task: str) -> Verdict:
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
                if v.state == State.PENDING:
                    # Blocked (strict): ask the server again when the time comes. Otherwise
                    # pending again because its claim ended lost (a holder that could not
                    # close it on the server): into a queue, or nobody would ever claim it.
                    due = st.blocked_until.get(task, 0.0) <= now and task not in st.queued
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


def _new_job_id() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
