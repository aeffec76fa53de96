"""`unity-crdt ...` / `python -m unity_crdt ...`: argument parsing only; the work lives elsewhere.

Each subcommand is a `Command` (name, help, how to add its arguments, what to run), listed in
COMMANDS; adding `run`, `status`, `doc`, `checkpoint`, `restore` or `search` later means adding
one entry. Handlers import what they need lazily, so `unity-crdt keygen` stays instant.
Every error is one line on stderr saying what to do, with exit code 2.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from .errors import UnityCrdtError

__all__ = ["COMMANDS", "Command", "build_parser", "keygen", "main"]

PROG = "unity-crdt"
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line with a hint, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        """Print `<prog>: <message> (see <prog> --help)` and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, argument setup and handler (-> exit code)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def keygen() -> str:
    """A strong group secret: 32 random bytes, base64url without padding (43 characters)."""
    return secrets.token_urlsafe(32)


def _configure_keygen(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _run_keygen(args: argparse.Namespace) -> int:
    print(keygen())
    return 0


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    from . import demo

    demo.add_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(netns=args.netns, keep=args.keep)


COMMANDS: list[Command] = [
    Command("demo", "three nodes edit offline, meet by mDNS and merge (the LAN demo)",
            _configure_demo, _run_demo),
    Command("keygen", "print a new random group secret (share it with the group's devices)",
            _configure_keygen, _run_keygen),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The `unity-crdt` parser with one subparser per entry of COMMANDS."""
    parser = _Parser(
        prog=PROG,
        description="Offline-first CRDT documents that merge peer to peer on a LAN.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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


if __name__ == "__main__":
    raise SystemExit(main())
