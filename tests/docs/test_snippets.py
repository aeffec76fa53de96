"""The docs are tested: runnable snippets run, and the site builds with `mkdocs build --strict`.

Convention (see docs/index.md): a fenced ```python block whose first line is exactly
`# docs: run` is executed, on its own, in a fresh interpreter, in an empty temporary directory
with a timeout. It passes if it exits 0; snippets prove their claims with `assert`. Blocks without
the marker are shown, not run (fragments, or code that needs a LAN or a Weaviate server).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MARKER = "# docs: run"
TIMEOUT = 60.0
OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")


@dataclass(frozen=True)
class Snippet:
    """One fenced python block of a docs page."""

    path: Path
    line: int  # 1-based line of the opening fence
    code: str

    @property
    def runnable(self) -> bool:
        """Whether the block is marked to run."""
        first = self.code.lstrip("\n").split("\n", 1)[0]
        return first.strip() == MARKER

    @property
    def id(self) -> str:
        """A readable test id: page:line."""
        return f"{self.path.name}:{self.line}"


def python_blocks(path: Path) -> list[Snippet]:
    """Every ```python (or ```py) fenced block of a markdown file, dedented."""
    lines = path.read_text(encoding="utf-8").split("\n")
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        m = OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        lang = m["info"].strip().split(" ", 1)[0].lower()
        body: list[str] = []
        j = i + 1
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        if lang in ("python", "py", "python3"):
            out.append(Snippet(path, i + 1, "\n".join(body) + "\n"))
        i = j + 1
    return out


def all_blocks() -> list[Snippet]:
    """Python blocks of every page in docs/."""
    return [s for page in sorted(DOCS.glob("*.md")) for s in python_blocks(page)]


RUNNABLE = [s for s in all_blocks() if s.runnable]


def test_the_fence_parser_finds_marked_blocks_only(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\n# docs: run\nprint(1)\n```\n\n- item\n\n    ```py\n    # docs: run\n"
        "    if True:\n        x = 1\n    ```\n```python\nshown only\n```\n````text\n```python\n"
        "# docs: run\n````\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [(b.line, b.runnable) for b in blocks] == [(2, True), (9, True), (14, False)]
    assert blocks[1].code == "# docs: run\nif True:\n    x = 1\n"


def test_the_desktop_and_concepts_pages_have_runnable_snippets() -> None:
    pages = {s.path.name for s in RUNNABLE}
    assert {"concepts.md", "desktop.md"} <= pages
    assert sum(s.path.name == "concepts.md" for s in RUNNABLE) >= 6


@pytest.mark.parametrize("snippet", RUNNABLE, ids=[s.id for s in RUNNABLE])
def test_snippet_runs(snippet: Snippet, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(snippet.code, encoding="utf-8")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("DISPLAY", None)  # snippets must not need a screen
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{snippet.id}: still running after {TIMEOUT} s")
    assert proc.returncode == 0, (
        f"{snippet.id} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
        f"--- stderr\n{proc.stderr}"
    )


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    # No --quiet: mkdocs 1.6 then drops warnings before --strict counts them, and passes.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, proc.stderr
    for page in ("concepts", "desktop", "troubleshooting"):
        assert (tmp_path / "site" / page / "index.html").is_file()
    assert (tmp_path / "site" / "index.html").is_file()
