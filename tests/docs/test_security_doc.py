"""docs/security.md names the test behind every claim: each name must be a real test."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"


def _defined_tests() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names |= set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    return names


def test_every_test_the_security_doc_names_exists() -> None:
    doc = DOC.read_text(encoding="utf-8")
    defined = _defined_tests()
    # A name ends at a backtick, bracket, comma or space; `test_f13_*` names a family.
    named = set(re.findall(r"\b(test_\w+\*?)(?=[`\[,\s(])", doc))
    missing = sorted(
        n
        for n in named
        if (n.endswith("*") and not any(d.startswith(n[:-1]) for d in defined))
        or (not n.endswith("*") and n not in defined)
    )
    assert len(named) > 60
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"
    # Every row of the two summary tables names at least one test.
    for title in ("### What is protected", "### What is *not* protected (v1)"):
        table = doc.split(title, 1)[1].split("\n\n", 2)[1]
        rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
        assert len(rows) >= 10, title
        for row in rows:
            assert re.search(r"test_\w+|their tests land", row), row
