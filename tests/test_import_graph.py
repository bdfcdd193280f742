"""The project's modules import each other without a cycle, counting imports inside functions: an import hidden in
a function to dodge a cycle is a cycle still (a newcomer who moves it to the top gets a partially initialised
module)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.common import ROOT

PACKAGES = ("ldm_core", "pipeline", "benchmarks")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source (top level, functions, TYPE_CHECKING blocks).

    ``from package import name`` counts as an import of ``package.name`` when that is a module, else of
    ``package`` itself; importing ``a.b.c`` also runs ``a`` and ``a.b`` (their ``__init__``), which counts too,
    except for the packages the importing module lives in (they are initialised before it runs)."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    modules = set(files)

    def with_parents(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own = with_parents(name) - {name}  # already initialised (or being) when this module runs

        def imported(target: str) -> set[str]:
            """The module itself (when it is one of ours) and the packages on the way that do not run yet."""
            return ({target} & modules) | (with_parents(target) - {target} - own)  # noqa: B023 (called right here)

        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets |= imported(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the current package up
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets |= imported(full) if full in modules else imported(base)
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, …, a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_project_has_no_import_cycle():
    graph = import_graph(ROOT)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100, "walked too little: the check would be vacuous"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("inside_function", [False, True])
def test_a_planted_cycle_is_found(tmp_path, inside_function):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    body = "def f():\n    from pkg import a\n" if inside_function else "import pkg.a\n"
    (pkg / "sub" / "c.py").write_text(body)
    graph = import_graph(tmp_path, ("pkg",))
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]
    (pkg / "sub" / "c.py").write_text("import json\n")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) is None
