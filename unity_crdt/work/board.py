"""The group's work docs as indexes: jobs, their claims, heartbeats and leases.

Everything collective work records lives in ordinary CRDT docs under the reserved prefix
`_work/` (apps must not write there), so it travels like any doc: mesh, relay, checkpoints.

    _work/jobs        Map "jobs": job id -> {kind, n, k, by, at}          (the index of jobs)
    _work/job/<id>    Map "spec": "spec" -> {kind, n, k, lease, max, by, at}, "inputs" -> [...]
                      Map "claims": "<task>|<attempt>|<device>" -> {t, s, v | e, x}
                      Map "handoff": "<task>" -> device (its owner gave it away)
    _work/beats       Map "beats": device -> {n (name), k ({kind: concurrency}), b (counter)}
    _work/leases      Map "leases": JSON [name, device] -> {t, h (held), ttl, x (strict)}

Values are JSON text (exact numbers, no nested shared types). Each board observes its doc and
keeps an index current, for local and remote changes alike; writes are buffered and committed
in one transaction per doc and loop turn (`flush`). No asyncio here: the engine drives it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pycrdt

from ..errors import ConfigError
from .rules import STATES, Claim, task_key, task_position

__all__ = [
    "BEATS_DOC",
    "JOBS_DOC",
    "JOB_PREFIX",
    "LEASES_DOC",
    "RESERVED_PREFIX",
    "BeatBoard",
    "JobBoard",
    "JobIndex",
    "JobSpec",
    "check_job_id",
]

log = logging.getLogger(__name__)

RESERVED_PREFIX = "_work/"
JOBS_DOC = "_work/jobs"
BEATS_DOC = "_work/beats"
LEASES_DOC = "_work/leases"
JOB_PREFIX = "_work/job/"

DocFor = Callable[[str], "pycrdt.Doc[Any]"]


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _loads(raw: object) -> Any:
    if not isinstance(raw, str):
        raise ValueError("not JSON text")
    return json.loads(raw)


@dataclass(frozen=True)
class JobSpec:
    """What was submitted: the kind, the inputs, and how to run them."""

    job_id: str
    kind: str
    inputs: tuple[Any, ...]
    redundancy: int
    lease: float
    max_attempts: int
    by: str  # the submitting device
    at: float  # wall-clock seconds at submission (the submitter's clock; for display only)

    @property
    def total(self) -> int:
        """How many tasks: inputs x redundancy."""
        return len(self.inputs) * self.redundancy

    def task_keys(self) -> list[str]:
        """Every task key, in input order."""
        k = self.redundancy
        return [task_key(i, s, k) for i in range(len(self.inputs)) for s in range(k)]

    def record(self) -> dict[str, Any]:
        """The spec as stored (inputs apart)."""
        return {
            "kind": self.kind,
            "n": len(self.inputs),
            "k": self.redundancy,
            "lease": self.lease,
            "max": self.max_attempts,
            "by": self.by,
            "at": self.at,
        }

    @classmethod
    def parse(cls, job_id: str, rec: Any, inputs: Any) -> JobSpec:
        """Read a stored spec; ValueError if it is malformed."""
        if not isinstance(rec, dict) or not isinstance(inputs, list):
            raise ValueError("job spec is not an object with an input list")
        spec = cls(
            job_id=job_id,
            kind=str(rec["kind"]),
            inputs=tuple(inputs),
            redundancy=int(rec["k"]),
            lease=float(rec["lease"]),
            max_attempts=int(rec["max"]),
            by=str(rec["by"]),
            at=float(rec["at"]),
        )
        if int(rec["n"]) != len(inputs) or spec.redundancy < 1 or spec.lease <= 0:
            raise ValueError("job spec does not add up")
        if spec.max_attempts < 1:
            raise ValueError("job spec has max_attempts < 1")
        return spec


class JobBoard:
    """One job's doc as an index: the spec and every claim of every task."""

    def __init__(
        self,
        job_id: str,
        doc: pycrdt.Doc[Any],
        *,
        now: Callable[[], float],
        on_change: Callable[[JobBoard, set[str]], None],
    ) -> None:
        self.job_id = job_id
        self.doc = doc
        self._now = now
        self._on_change = on_change
        self.spec: JobSpec | None = None
        self.claims: dict[str, dict[str, Claim]] = {}  # task -> claim key -> claim
        self.values: dict[str, Any] = {}  # claim key -> result ("ok") or error text ("err")
        self.seen_at: dict[str, float] = {}  # claim key -> when this node saw its state
        self._spec_map = doc.get("spec", type=pycrdt.Map)
        self._claims_map = doc.get("claims", type=pycrdt.Map)
        self._handoff_map = doc.get("handoff", type=pycrdt.Map)
        self.handoffs: dict[str, str] = {}  # task -> the device its owner gave it to
        self._pending: dict[str, str] = {}
        self._pending_handoffs: dict[str, str] = {}
        self._subs = [
            self._spec_map.observe(lambda _e: self._read_spec()),
            self._claims_map.observe(self._on_claims),
            self._handoff_map.observe(self._on_handoffs),
        ]
        self._read_spec()
        self._ingest({k: v for k, v in self._claims_map.items()})
        self._read_handoffs(dict(self._handoff_map.items()))

    def close(self) -> None:
        """Stop observing the doc."""
        roots = (self._spec_map, self._claims_map, self._handoff_map)
        for sub, root in zip(self._subs, roots, strict=True):
            root.unobserve(sub)

    def _on_handoffs(self, event: Any) -> None:
        self._read_handoffs(
            {
                k: c.get("newValue")
                for k, c in event.keys.items()
                if c.get("action") in ("add", "update")
            }
        )

    def _read_handoffs(self, entries: dict[str, Any]) -> None:
        tasks = set()
        for task, raw in entries.items():
            try:
                task_position(task)
                device = _loads(raw)
                if not isinstance(device, str):
                    raise ValueError("not a device id")
            except (ValueError, TypeError) as exc:
                log.warning("job %s: malformed hand-off %r ignored: %s", self.job_id, task, exc)
                continue
            self.handoffs[task] = device
            tasks.add(task)
        if tasks:
            self._on_change(self, tasks)

    def hand_off(self, task: str, device: str) -> None:
        """Record that this task's owner gives it to `device` (committed by `flush`)."""
        self.handoffs[task] = device
        self._pending_handoffs[task] = _dumps(device)

    def write_spec(self, spec: JobSpec) -> None:
        """Record a new job (the submitter does this once)."""
        with self.doc.transaction():
            self._spec_map["inputs"] = _dumps(list(spec.inputs))
            self._spec_map["spec"] = _dumps(spec.record())

    def _read_spec(self) -> None:
        if self.spec is not None or "spec" not in self._spec_map:
            return
        if "inputs" not in self._spec_map:
            return
        try:
            self.spec = JobSpec.parse(
                self.job_id, _loads(self._spec_map["spec"]), _loads(self._spec_map["inputs"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.error("job %s: malformed spec ignored: %s", self.job_id, exc)
            return
        self._on_change(self, set())

    def _on_claims(self, event: Any) -> None:
        changed: dict[str, Any] = {}
        for key, change in event.keys.items():
            if change.get("action") in ("add", "update"):
                changed[key] = change.get("newValue")
        self._ingest(changed)

    def _ingest(self, entries: dict[str, Any]) -> None:
        tasks: set[str] = set()
        now = self._now()
        for key, raw in entries.items():
            try:
                claim, value = self._parse(key, raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("job %s: malformed claim %r ignored: %s", self.job_id, key, exc)
                continue
            per_task = self.claims.setdefault(claim.task, {})
            old = per_task.get(key)
            per_task[key] = claim
            if old is None or old.state != claim.state:
                self.seen_at[key] = now
            if value is not None:
                self.values[key] = value
            tasks.add(claim.task)
        if tasks:
            self._on_change(self, tasks)

    @staticmethod
    def _parse(key: str, raw: Any) -> tuple[Claim, Any]:
        task, attempt, device = key.split("|")
        task_position(task)
        rec = _loads(raw)
        state = rec["s"]
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        claim = Claim(task, int(attempt), device, int(rec["t"]), state, bool(rec.get("x")))
        if claim.attempt < 1:
            raise ValueError("attempt < 1")
        value = rec.get("v") if state == "ok" else rec.get("e") if state == "err" else None
        return claim, value

    def write(self, claim: Claim, value: Any = None) -> None:
        """Record a claim (and its result or error); committed by the next `flush`."""
        rec: dict[str, Any] = {"t": claim.token, "s": claim.state}
        if claim.strict:
            rec["x"] = 1
        if claim.state == "ok":
            rec["v"] = value
        elif claim.state == "err":
            rec["e"] = str(value)
        self._pending[claim.key] = _dumps(rec)

    @property
    def dirty(self) -> bool:
        """Whether writes wait for `flush`."""
        return bool(self._pending or self._pending_handoffs)

    def flush(self) -> None:
        """Commit the buffered writes in one transaction."""
        if not self.dirty:
            return
        pending, self._pending = self._pending, {}
        handoffs, self._pending_handoffs = self._pending_handoffs, {}
        with self.doc.transaction():
            for key, raw in handoffs.items():
                self._handoff_map[key] = raw
            for key, raw in pending.items():
                self._claims_map[key] = raw

    def task_claims(self, task: str) -> list[Claim]:
        """Every claim of a task."""
        return list(self.claims.get(task, {}).values())


class JobIndex:
    """The index of jobs (`_work/jobs`): which jobs exist, of which kind."""

    def __init__(self, doc: pycrdt.Doc[Any], on_job: Callable[[str, dict[str, Any]], None]):
        self._map = doc.get("jobs", type=pycrdt.Map)
        self.doc = doc
        self._on_job = on_job
        self.jobs: dict[str, dict[str, Any]] = {}
        self._sub = self._map.observe(self._on_event)
        for key, raw in list(self._map.items()):
            self._add(key, raw)

    def _on_event(self, event: Any) -> None:
        for key, change in event.keys.items():
            if change.get("action") in ("add", "update"):
                self._add(key, change.get("newValue"))

    def _add(self, job_id: str, raw: Any) -> None:
        try:
            rec = _loads(raw)
            if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str):
                raise ValueError("not a job record")
            check_job_id(job_id)
        except (ValueError, ConfigError) as exc:
            log.warning("jobs index: entry %r ignored: %s", job_id, exc)
            return
        if job_id not in self.jobs:
            self.jobs[job_id] = rec
            self._on_job(job_id, rec)

    def add(self, spec: JobSpec) -> None:
        """Announce a new job."""
        self._map[spec.job_id] = _dumps(
            {"kind": spec.kind, "n": len(spec.inputs), "k": spec.redundancy, "by": spec.by}
        )

    def close(self) -> None:
        """Stop observing."""
        self._map.unobserve(self._sub)


_JOB_ID_CHARS = set("abcdefghijklmnopqrstuvwxyz234567")


def check_job_id(job_id: object) -> str:
    """Return `job_id` if it looks like one (16 lower-case base32 characters)."""
    if not isinstance(job_id, str) or len(job_id) != 16 or not set(job_id) <= _JOB_ID_CHARS:
        raise ConfigError(f"not a job id: {job_id!r}")
    return job_id


class BeatBoard:
    """Heartbeats of the group's workers (`_work/beats`): kinds served, and signs of life."""

    def __init__(
        self, doc: pycrdt.Doc[Any], *, now: Callable[[], float], on_change: Callable[[], None]
    ) -> None:
        self._map = doc.get("beats", type=pycrdt.Map)
        self._now = now
        self._on_change = on_change
        self.kinds: dict[str, dict[str, int]] = {}  # device -> {kind: concurrency}
        self.names: dict[str, str] = {}
        self.last_beat: dict[str, float] = {}  # device -> when its counter last moved here
        self._counters: dict[str, int] = {}
        self._sub = self._map.observe(self._on_event)
        started = now()
        for device, raw in list(self._map.items()):
            self._read(device, raw, started)

    def _on_event(self, event: Any) -> None:
        now = self._now()
        for device, change in event.keys.items():
            if change.get("action") in ("add", "update"):
                self._read(device, change.get("newValue"), now)
        self._on_change()

    def _read(self, device: str, raw: Any, now: float) -> None:
        try:
            rec = _loads(raw)
            kinds = {str(k): int(v) for k, v in dict(rec.get("k", {})).items()}
            counter = int(rec["b"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("beats: entry of %s ignored: %s", device[:8], exc)
            return
        self.kinds[device] = kinds
        self.names[device] = str(rec.get("n", ""))
        if self._counters.get(device) != counter:
            self._counters[device] = counter
            self.last_beat[device] = now

    def beat(self, device: str, name: str, kinds: dict[str, int]) -> None:
        """Write this node's heartbeat (the counter moves by one)."""
        counter = self._counters.get(device, 0) + 1
        self._map[device] = _dumps({"n": name, "k": kinds, "b": counter})

    def close(self) -> None:
        """Stop observing."""
        self._map.unobserve(self._sub)
