"""What the work engine keeps per worker, per running task and per job (plain state)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from .board import JobBoard
from .jobs import Task
from .rules import Claim, Verdict

__all__ = ["Handler", "JobState", "Run", "Spawn", "Worker"]

Handler = Callable[[Task], Any]
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


@dataclass
class Worker:
    """A kind this node works on: its handler, its slots, what runs now."""

    kind: str
    handler: Handler
    concurrency: int
    running: dict[str, Run] = field(default_factory=dict)  # claim key -> run
    claiming: int = 0


@dataclass
class Run:
    """One task running here, with the strict-mode bookkeeping of its claim."""

    job: JobState
    claim: Claim
    task: Task
    kv_key: str | None = None
    rev: int = 0  # strict: the key's revision now (renewals move it)
    valid_until: float = 0.0  # strict: no later than the server's expiry of our claim
    renewed_at: float = 0.0
    renewing: bool = False
    closing: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # renewals and the close take turns
    nonces: set[str] = field(default_factory=set)  # strict: our writes to the key (see _kv)


@dataclass
class JobState:
    """One job as this node follows it: finished tasks, queues by owner, what to re-judge."""

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
    kv_nonces: dict[str, set[str]] = field(default_factory=dict)  # strict: claims of unknown fate
    done: asyncio.Event = field(default_factory=asyncio.Event)
    built: bool = False
