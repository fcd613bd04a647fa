"""The package's shape: no import circle (in-function imports included), no oversized module, and the
import-linter layer contracts of pyproject.toml hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 600


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level and inside functions; `if TYPE_CHECKING:` blocks never run."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            stack.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(src: Path, root: str) -> dict[str, set[str]]:
    """module -> the modules of ``root`` it imports (``from pkg import name`` counts as pkg.name when
    that is a module, else as pkg)."""
    files = {_module_name(p, src): p for p in sorted((src / root).rglob("*.py"))}

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                names = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            for name in names:
                if name == root or name.startswith(root + "."):
                    target = owner(name)
                    if target and target != module:
                        targets.add(target)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        iters = [iter(sorted(graph[start]))]
        state[start] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_no_import_cycle_in_src() -> None:
    graph = import_graph(SRC, "moa_train")
    assert len(graph) > 50  # the scan really read the package
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_scan_finds_an_in_function_circle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == set()
    assert find_cycle(graph) is None  # the TYPE_CHECKING import does not run
    (pkg / "c.py").write_text("def g():\n    import pkg.a\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def test_no_module_over_600_lines() -> None:
    sizes = {
        p.relative_to(SRC).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
        for p in SRC.rglob("*.py")
    }
    assert sizes
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"split these modules (> {MAX_LINES} lines): {over}"


def test_import_linter_contracts_hold() -> None:
    """`lint-imports` as CI runs it: a layers contract of at least four layers, every contract kept."""
    pytest.importorskip("importlinter")
    root = SRC.parent
    contracts = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = [c for c in contracts if c["type"] == "layers" and "containers" not in c]
    assert layers and len(layers[0]["layers"]) >= 4
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in proc.stdout


def _statement_lists(node: ast.AST) -> list[list[ast.stmt]]:
    lists = [
        getattr(node, name)
        for name in ("body", "orelse", "finalbody")
        if isinstance(getattr(node, name, None), list)
    ]
    lists += [handler.body for handler in getattr(node, "handlers", [])]
    lists += [case.body for case in getattr(node, "cases", [])]
    return [stmts for stmts in lists if stmts and isinstance(stmts[0], ast.stmt)]


def uncommented_function_imports(source: str) -> list[int]:
    """Line numbers of imports inside functions that give no reason for being there. An in-function import
    is allowed to defer a heavy or optional dependency (or to break an import order), with a comment on
    its line, on the line directly above, or above the consecutive block of imports it belongs to."""
    lines = source.splitlines()

    def commented(node: ast.stmt) -> bool:
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        return "#" in lines[node.lineno - 1] or above.startswith("#")

    found: list[int] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for stmts in _statement_lists(node):
            previous: ast.stmt | None = None
            covered = False
            for stmt in stmts:
                if in_function and isinstance(stmt, ast.Import | ast.ImportFrom):
                    gap = lines[previous.end_lineno : stmt.lineno - 1] if previous else ["x"]
                    in_block = covered and isinstance(previous, ast.Import | ast.ImportFrom)
                    covered = commented(stmt) or (in_block and all(not g.strip() for g in gap))
                    if not covered:
                        found.append(stmt.lineno)
                else:
                    covered = False
                previous = stmt
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(source), False)
    return found


def test_every_in_function_import_says_why() -> None:
    """Imports belong at module level; one inside a function must say why it is deferred (a heavy
    dependency kept off the fast CLI start-up, an optional extra, ...)."""
    bare = {
        f"{path.relative_to(SRC).as_posix()}:{line}": path.read_text(encoding="utf-8")
        .splitlines()[line - 1]
        .strip()
        for path in sorted((SRC / "moa_train").rglob("*.py"))
        for line in uncommented_function_imports(path.read_text(encoding="utf-8"))
    }
    assert not bare, f"hoist these imports to module level, or comment why they are deferred: {bare}"


def test_the_import_comment_scan_finds_a_bare_import() -> None:
    source = (
        "import os\n\n"
        "def f():\n"
        "    # deferred: heavy\n"
        "    import torch\n\n"
        "    import numpy\n"
        "    x = 1\n"
        "    import json\n"
        "    if x:\n"
        "        import csv  # deferred: reason\n"
        "        import re\n"
        "    try:\n"
        "        import yaml\n"
        "    except ImportError:\n"
        "        pass\n"
        "    def g():\n"
        "        # a comment\n"
        "        import math\n"
        "        import random\n"
        "        return math, random\n"
    )
    assert uncommented_function_imports(source) == [9, 14]
