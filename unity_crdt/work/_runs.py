"""Running claimed tasks: the handler, the result, and in strict mode renewing and closing the
claim in the key-value store (the fence). A mixin of `WorkEngine`."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import CoordinationError
from . import rules
from ._kv import KvStore
from ._state import JobState, Run, Spawn, Worker
from .board import JobSpec
from .jobs import Task
from .rules import ERR, LOST, OK, Claim, Verdict

__all__ = ["Running"]

log = logging.getLogger(__name__)


class Running:
    """The running half of the work engine."""

    me: str
    kv: KvStore | None
    now: Callable[[], float]
    _spawn: Spawn

    if TYPE_CHECKING:

        def _rejudge(self, st: JobState, task: str) -> Verdict:
            raise NotImplementedError

        def _check_done(self, st: JobState) -> None:
            raise NotImplementedError

        def kick(self) -> None:
            raise NotImplementedError

    def _start(self, worker: Worker, st: JobState, claim: Claim, *, spawn: bool = True) -> Run:
        """Register a run of a claimed task and start it (or let the caller await `_run`)."""
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
        run = Run(st, claim, task)
        worker.running[claim.key] = run
        st.watch.add(claim.task)
        if spawn:
            self._spawn(self._run(worker, run), f"work {task.id}")
        return run

    async def _run(self, worker: Worker, run: Run) -> None:
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

    async def _finish(self, run: Run, ok: bool, value: Any) -> None:
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
        self.kick()  # committed with the other writes of this loop turn

    async def _commit_strict(self, run: Run, ok: bool, spec: JobSpec) -> str:
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

    async def _close_claim(self, run: Run, payload: dict[str, Any], ttl: float) -> int | None:
        assert self.kv is not None and run.kv_key is not None
        while True:
            try:
                return await self.kv.update(run.kv_key, payload, run.rev, ttl, run.nonces)
            except CoordinationError as exc:
                if self.now() >= run.valid_until:
                    log.warning("task %s: could not close its claim (%s)", run.task.id, exc)
                    return None
                await asyncio.sleep(0.2)

    async def _renew(self, run: Run) -> None:
        assert self.kv is not None and run.kv_key is not None and run.job.board.spec
        lease = run.job.board.spec.lease
        try:
            async with run.lock:
                if run.closing:
                    return
                sent = self.now()
                rev = await self.kv.update(
                    run.kv_key, {"d": self.me, "a": run.claim.attempt}, run.rev, lease, run.nonces
                )
        except CoordinationError:
            return  # try again next scan; the deadline stays where it was
        finally:
            run.renewing = False
        if rev is None:
            run.task.lost.set()
        else:
            run.rev, run.renewed_at, run.valid_until = rev, sent, sent + lease
