"""The desktop kit for this tier: scripts/desklab.py of this checkout (shared with the bench)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# Loaded by path: putting scripts/ on sys.path would shadow the weaviate client package with
# scripts/weaviate.py.
_spec = importlib.util.spec_from_file_location(
    "desklab", Path(__file__).resolve().parents[2] / "scripts" / "desklab.py"
)
assert _spec is not None and _spec.loader is not None
desklab = importlib.util.module_from_spec(_spec)
sys.modules["desklab"] = desklab
_spec.loader.exec_module(desklab)

REPO = desklab.REPO
TkNotes = desklab.TkNotes
remote_storm = desklab.remote_storm
xvfb = desklab.xvfb

__all__ = ["REPO", "TkNotes", "remote_storm", "xvfb"]
