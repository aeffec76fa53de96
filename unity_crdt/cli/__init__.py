"""`unity-crdt ...` / `python -m unity_crdt ...`: argument parsing and terminal output only.

Each subcommand is a `Command` (name, help, how to add its arguments, what to run), listed in
COMMANDS. `run` (`cli._run`) hosts a node and its control API (`frontends.control`);
`status`, `doc`, `checkpoint`, `restore`, `search` (`cli._client`), `members`, `invite`,
`revoke` (`cli._members`), `jobs` and `leases` (`cli._work`) are clients of that API, because
the running node holds the cache lock. Handlers import what they need lazily, so
`unity-crdt keygen` stays instant. Every error is one line on stderr saying what to do, with
exit code 2. The group secret is never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UnityCrdtError
from . import _client as cli_client
from . import _members as cli_members
from . import _run as cli_run
from . import _work as cli_work
from ._common import EXIT_USAGE, PROG, Parser

__all__ = [
    "COMMANDS",
    "Command",
    "build_parser",
    "keygen",
    "main",
]


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, argument setup and handler (-> exit code)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def keygen(passphrase: str | None = None) -> str:
    """A new group secret string "ucg1.<salt>.<secret>": a random salt, 32 random bytes
    (or `passphrase`), each base64url; see `crypto.keys.make_group_secret`."""
    from ..crypto.keys import make_group_secret

    return make_group_secret(passphrase)


def _configure_keygen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--passphrase",
        action="store_true",
        help="salt a passphrase read from stdin instead of drawing 32 random bytes",
    )


def _run_keygen(args: argparse.Namespace) -> int:
    if not args.passphrase:
        print(keygen())
        return 0
    if sys.stdin.isatty():
        import getpass

        phrase = getpass.getpass("passphrase: ")
    else:
        phrase = sys.stdin.readline().rstrip("\r\n")
    print(keygen(phrase))
    return 0


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    from . import _demo as demo

    demo.add_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from . import _demo as demo

    return demo.run(netns=args.netns, keep=args.keep)


COMMANDS: list[Command] = [
    Command(
        "run",
        "run a node that syncs its docs with peers until Ctrl-C",
        cli_run.configure,
        cli_run.run,
    ),
    Command(
        "status",
        "show a running node's peers, docs and sync state",
        cli_client.configure_status,
        cli_client.run_status,
    ),
    Command(
        "doc",
        "list, read, edit or watch the docs of a running node",
        cli_client.configure_doc,
        cli_client.run_doc,
    ),
    Command(
        "checkpoint",
        "push every changed doc of a running node to Weaviate now",
        cli_client.configure_checkpoint,
        cli_client.run_checkpoint,
    ),
    Command(
        "restore",
        "merge the group's Weaviate checkpoints into a running node",
        cli_client.configure_restore,
        cli_client.run_restore,
    ),
    Command(
        "search",
        "keyword search over the checkpointed text of searchable docs",
        cli_client.configure_search,
        cli_client.run_search,
    ),
    Command(
        "members",
        "list the devices of the group: active and revoked, who added them",
        cli_members.configure_members,
        cli_members.run_members,
    ),
    Command(
        "invite",
        "print a single-use code a new device joins the group with",
        cli_members.configure_invite,
        cli_members.run_invite,
    ),
    Command(
        "revoke",
        "cut a device out of the group (the others move to new keys)",
        cli_members.configure_revoke,
        cli_members.run_revoke,
    ),
    Command(
        "jobs",
        "show the group's jobs with progress bars (collective work)",
        cli_work.configure_jobs,
        cli_work.run_jobs,
    ),
    Command(
        "leases",
        "show who holds which lease, with its fencing token",
        cli_work.configure_leases,
        cli_work.run_leases,
    ),
    Command(
        "demo",
        "three nodes edit offline, meet by mDNS and merge (the LAN demo)",
        _configure_demo,
        _run_demo,
    ),
    Command(
        "keygen",
        "print a new random group secret (share it with the group's devices)",
        _configure_keygen,
        _run_keygen,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    """The `unity-crdt` parser with one subparser per entry of COMMANDS."""
    parser = Parser(
        prog=PROG,
        description="Offline-first CRDT documents that merge peer to peer on a LAN.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for cmd in COMMANDS:
        cmd.configure(sub.add_parser(cmd.name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse argv (default sys.argv[1:]), run the subcommand, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler = next(c.run for c in COMMANDS if c.name == args.command)
    try:
        return handler(args)
    except UnityCrdtError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `unity-crdt status | head -1`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again, and exit as a SIGPIPE death would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
