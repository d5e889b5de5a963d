"""The code's shape that readers rely on: the top-level files import each other without a cycle
(imports at call time included), so each file can be read, and copied, with what it depends on."""

import ast
import os

from conftest import ROOT


def top_level_imports() -> dict:
    """file stem -> the top-level files it imports, anywhere in the file."""
    stems = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    graph = {}
    for stem in stems:
        deps = set()
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, f"{stem}.py")).read())):
            if isinstance(node, ast.Import):
                deps |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split(".")[0])
        graph[stem] = deps & stems
    return graph


def cycle(graph: dict):
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    done = set()

    def visit(node, path):
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for dep in sorted(graph[node]):
            found = visit(dep, path + [node])
            if found:
                return found
        done.add(node)
        return None

    for node in sorted(graph):
        found = visit(node, [])
        if found:
            return found
    return None


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_top_level_files():
    graph = top_level_imports()
    assert {"train", "dist", "checkpoint", "rewards", "sokoban"} <= set(graph)
    assert cycle(graph) is None
    assert graph["dist"] == set()  # plumbing depends on nothing of ours
