"""The namespaced-LAN kit for this tier; it lives in the package as unity_crdt.netlab."""

from __future__ import annotations

from unity_crdt.netlab import *  # noqa: F403
from unity_crdt.netlab import (
    REPO,
    Host,
    JsonProc,
    Lan,
    Proc,
    spawn_local,
    sweep_stale,
    unavailable_reason,
    venv_python,
)

__all__ = [
    "REPO",
    "Host",
    "JsonProc",
    "Lan",
    "Proc",
    "spawn_local",
    "sweep_stale",
    "unavailable_reason",
    "venv_python",
]
