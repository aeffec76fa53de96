"""`<cache_dir>/membership.json`: the roster's ops and the epoch secrets this device holds.

JSON, written atomically with mode 0600 (`store.files.write_private_file`). Treat it like
`device.key`: it holds the GS of every epoch this device was in (epoch 0's only when the device
joined with an invite code; a group secret derives it). A damaged file is reported and the node
starts from its group secret.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["read_state", "state_json", "state_parts"]

log = logging.getLogger(__name__)

VERSION = 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def state_json(group_id: bytes, ops: Iterable[bytes], secrets: Mapping[bytes, bytes]) -> bytes:
    """The file's bytes."""
    data = {
        "version": VERSION,
        "group": group_id.hex(),
        "ops": [_b64(raw) for raw in ops],
        "secrets": {op.hex(): _b64(gs) for op, gs in secrets.items()},
    }
    return json.dumps(data, indent=1).encode()


def state_parts(saved: Mapping[str, Any]) -> tuple[list[bytes], dict[bytes, bytes]]:
    """(the ops, epoch op id -> GS) of a file read by `read_state`."""
    ops = [base64.b64decode(b) for b in saved.get("ops", ())]
    kept = {bytes.fromhex(k): base64.b64decode(v) for k, v in saved.get("secrets", {}).items()}
    return ops, kept


def read_state(path: Path) -> dict[str, Any] | None:
    """The file as a dict, None if absent or unreadable (logged)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("membership state %s unreadable (%s); starting from the group secret", path, exc)
        return None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        log.error("membership state %s is not a version %d file; ignored", path, VERSION)
        return None
    return data
