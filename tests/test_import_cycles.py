"""No import cycles among the ``emakit`` modules, counting imports inside functions.

A deferred (function-level) import hides a cycle from Python's import machinery but not from
a reader: the modules still depend on each other. Every module under ``emakit/`` is parsed
with :mod:`ast`; each ``import`` / ``from ... import`` anywhere in it (module level, inside
functions, under ``TYPE_CHECKING``) is an edge to the ``emakit`` module it names (relative
imports resolved; ``from pkg import name`` counts ``pkg.name`` when that is a module, else
``pkg``). A strongly connected component of more than one module is a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "emakit"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``emakit/``."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _resolve(importer: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``importer``."""
    if level == 0:
        return target or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The ``emakit`` modules that ``name`` (at ``path``) imports anywhere in its code."""
    is_package = path.name == "__init__.py"
    edges: set[str] = set()

    def add(dotted: str) -> None:
        while dotted and dotted not in modules:  # ``emakit.training.x.attr`` -> the module part
            dotted = dotted.rpartition(".")[0]
        if dotted and dotted != name:
            edges.add(dotted)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(name, is_package, node.level, node.module)
            for alias in node.names:
                full = f"{source}.{alias.name}"
                add(full if full in modules else source)
    return edges


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``emakit`` modules it imports (function-level imports included)."""
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_function_level_cycle():
    """The checker itself: a cycle closed only by an import inside a function is found, and
    relative imports (``from . import x``, ``from .x import y``, ``from .. import z``) resolve."""
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(graph) == [{"p.a", "p.b", "p.c"}]
    assert _resolve("emakit.training.outputs", False, 1, "plots") == "emakit.training.plots"
    assert _resolve("emakit.training.outputs", False, 1, None) == "emakit.training"
    assert _resolve("emakit.training", True, 1, "rundir") == "emakit.training.rundir"
    assert _resolve("emakit.training.outputs", False, 2, "checkpoint") == "emakit.checkpoint"


def test_function_level_imports_are_edges(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .plots import plot_summary\n    import emakit.ema\n"
                   "from . import rundir\n")
    modules = {"emakit.training.m", "emakit.training.plots", "emakit.training.rundir", "emakit.ema",
               "emakit.training", "emakit"}
    assert imports_of("emakit.training.m", src, modules) == {"emakit.training.plots", "emakit.training.rundir",
                                                            "emakit.ema"}


def test_no_import_cycles_among_emakit_modules():
    graph = import_graph()
    assert "emakit.training.plots" in graph and len(graph) > 20  # the walk found the package
    found = [sorted(c) for c in cycles(graph)]
    assert not found, f"import cycles (function-level imports count): {found}"
