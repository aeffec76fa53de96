"""What applications hold: a `Task` (a handler's argument) and a `Job` (a submitted batch)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..status import Progress

if TYPE_CHECKING:
    from .engine import WorkEngine

__all__ = ["Job", "Task"]


@dataclass
class Task:
    """One task given to a worker's handler: what to do, and whether it is still ours."""

    id: str  # "<job id>/<task key>"
    job_id: str
    kind: str
    index: int  # the input's position in the job
    slot: int  # which of the input's `redundancy` runs this is (0-based)
    input: Any
    attempt: int  # 1 for the first try
    token: int  # fencing token: higher for every later holder of this task
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # set: another holder took over


class Job:
    """A submitted job, followed from any node: its progress, then its results."""

    def __init__(self, engine: WorkEngine, job_id: str) -> None:
        self._engine = engine
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    @property
    def kind(self) -> str | None:
        """The task kind, once the job's doc reached this node."""
        spec = self._engine.spec(self.id)
        return spec.kind if spec else None

    def progress(self) -> Progress:
        """Tasks in all, done, failed for good, and running now (as this node sees them)."""
        return self._engine.progress(self.id)

    async def results(self, timeout: float | None = None) -> list[Any]:
        """Every result, in input order (a list of `redundancy` results per input when > 1).

        Waits until each task is done or failed for good; raises JobFailed naming the failed
        inputs, TimeoutError after `timeout` seconds.
        """
        await self._engine.wait(self.id, timeout)
        return self._engine.results(self.id)
