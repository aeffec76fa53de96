"""The anchor of bench_work: the same tiny task as a Celery task (broker and results in Redis)."""

from __future__ import annotations

import os

from celery import Celery

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("bench_work", broker=URL, backend=URL)
app.conf.update(
    worker_prefetch_multiplier=4,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=False,
)


@app.task(name="tiny")
def tiny(x: int) -> int:
    """Twice the input."""
    return 2 * x
