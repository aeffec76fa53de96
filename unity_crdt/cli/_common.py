"""What every `unity-crdt` command shares: names, the parser class, defaults, output helpers.

The command modules (`_run`, `_client`) and the cli package import this, so it sits below them
and imports nothing of the library but errors (the import contracts hold it there).
"""

from __future__ import annotations

import argparse
import os
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConfigError

__all__ = [
    "CACHE_ENV",
    "EXIT_USAGE",
    "PROG",
    "SECRET_ENV",
    "YJS_TOKEN_ENV",
    "Parser",
    "default_cache_dir",
    "human_bytes",
    "human_duration",
    "plural",
    "read_toml",
    "say",
    "stamp",
    "table",
]

PROG = "unity-crdt"
EXIT_USAGE = 2
SECRET_ENV = "UNITY_CRDT_SECRET"
YJS_TOKEN_ENV = "UNITY_CRDT_YJS_TOKEN"
CACHE_ENV = "UNITY_CRDT_CACHE_DIR"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line with a hint, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        """Print `<prog>: <message> (see <prog> --help)` and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def default_cache_dir() -> Path:
    """$UNITY_CRDT_CACHE_DIR, else $XDG_DATA_HOME/unity-crdt, else ~/.local/share/unity-crdt."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "unity-crdt"


def read_toml(path: str) -> dict[str, Any]:
    """The [node] table of a TOML config file (or its top level if it has none)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    found = data.get("node", data)
    if not isinstance(found, dict):
        raise ConfigError(f"config file {path}: [node] must be a table")
    return dict(found)


# -- formatting ---------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """A byte count for people: 512 B, 1.5 KiB, 3.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(s: float) -> str:
    """Seconds for people: 4.2 s, 3m 07s, 2h 05m."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def plural(n: int, word: str) -> str:
    """`n word` with an s unless n is 1."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, indented two spaces, one string per line (headers first)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    return [
        "  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in (headers, *rows)
    ]


def stamp() -> str:
    """The local time as HH:MM:SS, for live output lines."""
    return time.strftime("%H:%M:%S")


def say(line: str) -> None:
    """Print one line of output to stdout now (it may be a pipe)."""
    print(line, flush=True)
