"""Child processes that print JSON lines: the demo's nodes (and the LAN kit's, in scripts/).

`spawn_local` starts a command with the package importable and unbuffered output, and a
`JsonProc` collects each JSON-object line it prints as an event that callers can wait for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["PACKAGE_ROOT", "JsonProc", "program_env", "spawn_local"]

# The directory holding the unity_crdt package: put on PYTHONPATH of every spawned program so
# `python -m unity_crdt...` works with or without an installed package.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class JsonProc:
    """A running command whose stdout JSON-object lines are collected as events."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        label: str = "",
        cwd: str | Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.label = label or Path(self.argv[0]).name
        self.events: list[dict[str, Any]] = []
        self._stderr: deque[str] = deque(maxlen=200)
        self._cond = threading.Condition()
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=dict(env),
            cwd=str(cwd) if cwd else None,
        )
        assert self._popen.stdout is not None and self._popen.stderr is not None
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(self._popen.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self._popen.stderr,), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def pid(self) -> int:
        """Process id (for a Proc the command itself: `ip netns exec` execs it)."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status, or None while running."""
        return self._popen.poll()

    def _read_stdout(self, stream: TextIO) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                self._stderr.append("stdout: " + line.rstrip())
                continue
            if isinstance(event, dict):
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stderr(self, stream: TextIO) -> None:
        for line in stream:
            self._stderr.append(line.rstrip())

    def stderr_tail(self, lines: int = 30) -> str:
        """The last lines of stderr (and non-JSON stdout), for failure messages."""
        return "\n".join(list(self._stderr)[-lines:])

    def send(self, line: str) -> None:
        """Write one line to the command's stdin (a control channel for test programs)."""
        assert self._popen.stdin is not None
        try:
            self._popen.stdin.write(line.rstrip("\n") + "\n")
            self._popen.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:  # it exited or was stopped
            raise RuntimeError(f"{self.label}: cannot send, the process has exited") from exc

    def snapshot(self) -> list[dict[str, Any]]:
        """A copy of the events received so far."""
        with self._cond:
            return list(self.events)

    def wait_until(
        self, cond: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str = ""
    ) -> list[dict[str, Any]]:
        """Block until cond(events) holds; on timeout raise with the events and stderr."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not cond(self.events):
                left = deadline - time.monotonic()
                if left <= 0 or (
                    self._popen.poll() is not None and not self._threads[0].is_alive()
                ):
                    raise AssertionError(
                        f"{self.label}: {what or 'condition'} not met in {timeout:.1f}s "
                        f"(exit={self._popen.poll()}); events={self.events[-10:]}\n"
                        f"{self.stderr_tail()}"
                    )
                self._cond.wait(min(left, 0.2))
            return list(self.events)

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Block until an event satisfying pred arrives, and return it."""
        events = self.wait_until(lambda evs: any(pred(e) for e in evs), timeout)
        return next(e for e in events if pred(e))

    def wait(self, timeout: float) -> int | None:
        """Wait up to timeout for the command to exit on its own; its status, or None."""
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        """Send SIGTERM without waiting (stop() waits)."""
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 3.0) -> int:
        """SIGTERM, then SIGKILL after timeout; returns the exit status."""
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait(5)
        for stream in (self._popen.stdin, self._popen.stdout, self._popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
        for t in self._threads:
            t.join(1.0)
        return self._popen.returncode


def program_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """os.environ plus the package on PYTHONPATH, unbuffered output, then `env`."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    return full_env


def spawn_local(
    argv: Sequence[str], env: Mapping[str, str] | None = None, *, label: str = ""
) -> JsonProc:
    """Start a command in the current (root) namespace, collecting its JSON events."""
    return JsonProc(argv, program_env(env), label=label)
