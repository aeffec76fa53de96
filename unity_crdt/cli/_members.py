"""`unity-crdt members`, `invite` and `revoke`: the group's roster, through the control socket.

`invite` prints the code alone on stdout (so `$(unity-crdt invite)` works) and says how to use
it on stderr. `revoke` takes a device id or an unambiguous start of one (at least 4
characters), as `members` shows them.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ._client import add_target, call, membership_line, print_json
from ._common import PROG, human_duration, say, table

if TYPE_CHECKING:
    from ..frontends.control_client import ControlClient

__all__ = [
    "configure_invite",
    "configure_members",
    "configure_revoke",
    "run_invite",
    "run_members",
    "run_revoke",
]


def configure_members(p: argparse.ArgumentParser) -> None:
    """The options of `members`."""
    add_target(p)


def run_members(args: argparse.Namespace) -> int:
    """`unity-crdt members`: every device on the roster, active or revoked."""

    async def work(client: ControlClient) -> int:
        found = await client.members()
        if args.json:
            print_json(found)
            return 0
        names = {m["device_id"]: m["name"] for m in found["members"]}
        now = time.time()
        lines = [f"group   {membership_line(found['membership'])}"]
        lines += table(
            ("NAME", "DEVICE ID", "STATE", "ADDED BY", "ADDED"),
            [
                (
                    m["name"],
                    m["device_id"],
                    m["state"],
                    "itself (group secret)"
                    if m["added_by"] == m["device_id"]
                    else names.get(m["added_by"], m["added_by"][:8]),
                    human_duration(max(0.0, now - m["added_at"])) + " ago",
                )
                for m in found["members"]
            ],
        )
        say("\n".join(lines))
        return 0

    return call(args, work)


def configure_invite(p: argparse.ArgumentParser) -> None:
    """The options of `invite`."""
    add_target(p)
    p.add_argument(
        "--ttl",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long the code may be used (default 600: ten minutes)",
    )


def run_invite(args: argparse.Namespace) -> int:
    """`unity-crdt invite`: a single-use code a new device starts with as its group secret."""

    async def work(client: ControlClient) -> int:
        code = await client.invite(args.ttl)
        if args.json:
            print_json({"code": code, "ttl": args.ttl})
            return 0
        say(code)
        print(
            f"single use, valid {human_duration(args.ttl)}: start the new device with it as "
            f"its group secret, e.g. UNITY_CRDT_SECRET='<code>' {PROG} run --name tablet",
            file=sys.stderr,
        )
        return 0

    return call(args, work)


def configure_revoke(p: argparse.ArgumentParser) -> None:
    """The options of `revoke`."""
    add_target(p)
    p.add_argument("device_id", metavar="DEVICE_ID", help="the device to cut out (see `members`)")


def _resolve(device: str, members: list[dict[str, Any]]) -> dict[str, Any]:
    exact = [m for m in members if m["device_id"] == device]
    if exact:
        return exact[0]
    if len(device) < 4:
        raise ConfigError("give at least the first 4 characters of the device id")
    found = [m for m in members if m["device_id"].startswith(device)]
    if not found:
        raise ConfigError(f"no member's device id starts with {device!r} (see `{PROG} members`)")
    if len(found) > 1:
        raise ConfigError(f"{device!r} starts several device ids; give more of it")
    return found[0]


def run_revoke(args: argparse.Namespace) -> int:
    """`unity-crdt revoke DEVICE_ID`: cut a device out; the others move to new keys."""

    async def work(client: ControlClient) -> int:
        target = _resolve(args.device_id, (await client.members())["members"])
        result = await client.revoke(target["device_id"])
        if args.json:
            print_json(result)
            return 0
        ms = result["membership"]
        say(
            f"revoked {target['name']!r} ({target['device_id']}): it can no longer link, and "
            f"gets nothing written from now on"
        )
        say(f"group   {membership_line(ms)}")
        return 0

    return call(args, work)
