"""The namespaced-LAN kit for this tier: scripts/netlab.py of this checkout (a dev kit, not
part of the installed package), shared with `unity-crdt demo --netns`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from unity_crdt.cli._procs import JsonProc, spawn_local

# Loaded by path: putting scripts/ on sys.path would shadow the weaviate client package with
# scripts/weaviate.py.
_spec = importlib.util.spec_from_file_location(
    "netlab", Path(__file__).resolve().parents[2] / "scripts" / "netlab.py"
)
assert _spec is not None and _spec.loader is not None
netlab = importlib.util.module_from_spec(_spec)
sys.modules["netlab"] = netlab
_spec.loader.exec_module(netlab)

REPO = netlab.REPO
Host = netlab.Host
Lan = netlab.Lan
Proc = netlab.Proc
sweep_stale = netlab.sweep_stale
unavailable_reason = netlab.unavailable_reason
venv_python = netlab.venv_python

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
