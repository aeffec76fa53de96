"""The tree reads as the architecture: one home per name, and the layers stated in docs exist.

Import directions are checked by import-linter (`make lint`); this checks what it cannot:
that no module re-exports a name defined elsewhere (only the package root and the `testing`
kit are facades), that every public name has one defining module, and that the package tree
matches the one docs/architecture.md shows.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import unity_crdt

PKG = Path(unity_crdt.__file__).parent
FACADES = {"unity_crdt", "unity_crdt.testing"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _defined(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        names.add(leaf.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _all(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            assert isinstance(node.value, ast.List | ast.Tuple)
            return [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    return []


def test_no_module_but_the_facades_re_exports() -> None:
    for name, tree in _modules().items():
        if name in FACADES:
            continue
        foreign = sorted(set(_all(tree)) - _defined(tree))
        assert not foreign, f"{name} lists names it does not define: {foreign}"
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    assert alias.asname != alias.name, f"{name} re-exports {alias.name}"


def test_every_public_class_has_one_home() -> None:
    homes: dict[str, list[str]] = defaultdict(list)
    for name, tree in _modules().items():
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                homes[node.name].append(name)
    twice = {cls: mods for cls, mods in homes.items() if len(mods) > 1}
    assert not twice, f"classes defined in several modules: {twice}"


def test_one_protocol_version_and_one_varint() -> None:
    source = {p: p.read_text(encoding="utf-8") for p in PKG.rglob("*.py")}
    versions = [p for p, text in source.items() if re.search(r"^PROTOCOL_VERSION\s*=", text, re.M)]
    assert [p.relative_to(PKG).as_posix() for p in versions] == ["sync/codec.py"]
    # LEB128 decoding (the `& 0x7F` continuation loop) lives in sync/lib0.py only.
    loops = [p for p, text in source.items() if "& 0x7F) <<" in text]
    assert [p.relative_to(PKG).as_posix() for p in loops] == ["sync/lib0.py"]


def test_the_tree_matches_the_documented_layers() -> None:
    packages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())
    assert packages == [
        "checkpoint",
        "cli",
        "crypto",
        "frontends",
        "members",
        "net",
        "node",
        "store",
        "sync",
        "testing",
        "work",
    ]
    doc = (PKG.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for package in packages:
        assert f"{package}/" in doc, f"docs/architecture.md does not show {package}/"
