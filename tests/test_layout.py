"""The package's import graph has no circles (DESIGN.md: imports point down, config -> checkpoint -> model ->
engine -> server / cli).

Read from the source with `ast`, nothing imported. An edge A -> B is any import of B in A: at module level, inside
a function (a lazy import is still a dependency) or under `if TYPE_CHECKING:` (a type A's code is written
against). Importing `a.b.c` also runs the package `a.b`'s `__init__`, so that is an edge too. Left out: the
`TYPE_CHECKING` re-exports of a package `__init__` that loads its names lazily (PEP 562) and `importlib` calls.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "letterpress"


def is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """Module -> {imported module: first line}, for the package's own modules."""
    mods = modules()

    def known(name: str) -> str | None:  # the longest prefix of `name` that is one of our modules
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, is_package) in mods.items():
        here = name if is_package else name.rpartition(".")[0]
        deps: dict[str, int] = {}
        stack: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
        while stack:
            node = stack.pop()
            if is_package and is_type_checking(node):
                continue
            stack.extend(ast.iter_child_nodes(node))
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([node.module] if node.module else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                target = known(target)
                if target is None or target == name:
                    continue
                deps.setdefault(target, node.lineno)
                parts = target.split(".")
                for k in range(2, len(parts)):  # the packages it passes through (not the root, not our own)
                    package = ".".join(parts[:k])
                    if package in mods and not (name == package or name.startswith(package + ".")):
                        deps.setdefault(package, node.lineno)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest circle through each module that lies on one (as 'a:line -> b:line -> ... -> a')."""
    found, seen = [], set()
    for start in sorted(graph):
        if start in seen:
            continue
        # breadth-first from start's imports back to start
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            next_frontier = []
            for node in frontier:
                for dep in sorted(graph.get(node, {})):
                    if dep not in previous:
                        previous[dep] = node
                        next_frontier.append(dep)
            frontier = next_frontier
        if start not in previous:
            continue
        path, node = [start], previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        path.reverse()  # start -> ... -> last, and last imports start
        ring = [start, *path[:-1]] if path[0] != start else path
        seen.update(ring)
        hops = [f"{a}:{graph[a][b]}" for a, b in zip(ring, ring[1:] + ring[:1])]
        found.append(hops + [ring[0]])
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "letterpress.model.layers" in graph["letterpress.model.diffusion_gemma"]
    assert "letterpress.config" in graph["letterpress.checkpoint"]
    # a lazy import (inside a function) counts
    assert "letterpress.checkpoint" in graph["letterpress.embedded"]


def test_cycles_are_found():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert cycles(graph) == [["a:1", "b:2", "c:3", "a"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import circles (module:line of each import), imports should point down:\n" + "\n".join(
        " -> ".join(ring) for ring in found)
