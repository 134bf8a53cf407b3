"""The import graph of the project's modules (dograph/, baselines/, experiments/), read from the source.

Every ``import`` and ``from ... import`` counts, at module level, inside functions and under
``if TYPE_CHECKING:`` alike (an import hidden in a function still ties two modules together).
Relative imports are resolved; ``from pkg import name`` is an edge to ``pkg.name`` when that
is a module of the project, else to ``pkg``; ``import a.b.c`` is an edge to the longest prefix
that is a project module. Importing a submodule is not counted as importing its parent package.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("dograph", "baselines", "experiments")


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` (both project modules) at ``line``; ``names``: what ``from`` imports name."""

    source: str
    target: str
    line: int
    type_checking: bool
    names: tuple[str, ...] = ()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module and package of the project."""
    return {module_name(p): p for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))
            if "__pycache__" not in p.parts}


def _is_package(module: str) -> bool:
    return project_modules()[module].name == "__init__.py"


def _longest_project_prefix(dotted: str) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in project_modules():
            return candidate
    return None


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines of the bodies of ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


@cache
def edges_of(module: str) -> tuple[Edge, ...]:
    path = project_modules()[module]
    tree = ast.parse(path.read_text(), str(path))
    checking = _type_checking_lines(tree)
    found: list[Edge] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _longest_project_prefix(alias.name)
                if target:
                    found.append(Edge(module, target, node.lineno, node.lineno in checking))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in project_modules() else _longest_project_prefix(base)
                if target:
                    found.append(Edge(module, target, node.lineno, node.lineno in checking, (alias.name,)))
    return tuple(e for e in found if e.target != module)


def all_edges() -> list[Edge]:
    return [e for module in project_modules() for e in edges_of(module)]


def imports_of(module: str) -> set[str]:
    return {e.target for e in edges_of(module)}


def find_cycle() -> list[str] | None:
    """One import cycle among the project's modules (``[a, b, ..., a]``), or None."""
    graph = {m: sorted(imports_of(m)) for m in project_modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (cycle := visit(start)):
            return cycle
    return None
