"""`unity-crdt jobs` and `unity-crdt leases`: collective work as a running node sees it.

Both read the node's status through its control socket (`status().work`), so they show what
that node knows: jobs of the whole group (their docs sync like any doc) and the leases.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import TYPE_CHECKING, Any

from ._client import add_target, call, print_json
from ._common import human_duration, plural, say, table

if TYPE_CHECKING:
    from ..frontends.control_client import ControlClient

__all__ = [
    "configure_jobs",
    "configure_leases",
    "job_bar",
    "run_jobs",
    "run_leases",
    "work_line",
]

BAR = 24
FOLLOW_EVERY = 0.5


def job_bar(job: dict[str, Any]) -> str:
    """A progress bar: '#' done, '!' failed, '>' running, '.' waiting; then the percentage."""
    total = max(1, job["total"])
    done = BAR * job["done"] // total
    failed = BAR * job["failed"] // total
    running = min(BAR - done - failed, -(-BAR * job["running"] // total))
    bar = "#" * done + "!" * failed + ">" * running
    pct = 100 * (job["done"] + job["failed"]) // total
    return f"[{bar:.<{BAR}}] {pct:3d}%"


def work_line(work: dict[str, Any] | None) -> str:
    """One line for `status`: mode, kinds served, jobs and leases."""
    if work is None:
        return "off"
    mode = work["mode"]
    if work["coordination_url"]:
        mode += f" ({work['coordination_url']}" + (
            ")" if work["connected"] else f": {work['error']})"
        )
    open_jobs = sum(1 for j in work["jobs"] if j["done"] + j["failed"] < j["total"])
    kinds = ", ".join(work["kinds"]) or "none"
    return (
        f"{mode}; works on {kinds}; running {work['running']}; "
        f"{plural(len(work['jobs']), 'job')} ({open_jobs} open), "
        f"{plural(len(work['leases']), 'lease')} held"
    )


def configure_jobs(p: argparse.ArgumentParser) -> None:
    """The options of `jobs`."""
    p.add_argument("--follow", action="store_true", help="redraw until every job is finished")
    add_target(p)


def _job_rows(work: dict[str, Any]) -> list[str]:
    now = time.time()
    rows = [
        (
            j["job_id"],
            j["kind"],
            job_bar(j),
            f"{j['done']}/{j['total']}",
            str(j["failed"]),
            str(j["running"]),
            f"{human_duration(max(0.0, now - j['submitted_at']))} ago by {j['submitted_by'][:8]}",
        )
        for j in work["jobs"]
    ]
    if not rows:
        return ["no jobs yet (node.submit(...) starts one)"]
    return table(("JOB", "KIND", "PROGRESS", "DONE", "FAILED", "RUNNING", "SUBMITTED"), rows)


def run_jobs(args: argparse.Namespace) -> int:
    """`unity-crdt jobs`: every job the node knows, with progress bars."""

    async def work(client: ControlClient) -> int:
        shown = 0
        while True:
            st = (await client.status()).get("work") or {"jobs": []}
            if args.json:
                print_json(st["jobs"])
                return 0
            lines = _job_rows(st)
            if shown and sys.stdout.isatty():
                sys.stdout.write(f"\x1b[{shown}A\x1b[J")  # redraw in place
            say("\n".join(lines))
            shown = len(lines)
            finished = all(j["done"] + j["failed"] >= j["total"] for j in st["jobs"])
            if not args.follow or finished:
                return 0
            await asyncio.sleep(FOLLOW_EVERY)

    try:
        return call(args, work)
    except KeyboardInterrupt:
        return 0 if args.follow else 130


def configure_leases(p: argparse.ArgumentParser) -> None:
    """The options of `leases`."""
    add_target(p)


def run_leases(args: argparse.Namespace) -> int:
    """`unity-crdt leases`: who holds which lease, with its fencing token."""

    async def work(client: ControlClient) -> int:
        st = (await client.status()).get("work")
        leases = st["leases"] if st else []
        if args.json:
            print_json(leases)
        elif not leases:
            say(f"no lease is held ({st['mode'] if st else 'work off'} mode)")
        else:
            rows = [
                (x["name"], x["device_id"][:8], str(x["token"]), human_duration(x["expires_in"]))
                for x in leases
            ]
            say(f"mode {st['mode']}" if st else "")
            say("\n".join(table(("NAME", "HOLDER", "TOKEN", "EXPIRES IN"), rows)))
        return 0

    return call(args, work)
