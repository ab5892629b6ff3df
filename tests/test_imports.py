"""The package's import structure: every subpackage loads on its own, no cycle between subpackages, and the
config leaves import nothing above them.

A node of the graph is a subpackage (`calib`, `passes` ...) or a top-level module (`recipe`, `pipeline` ...);
`dicompress` itself (its `__init__`) is the node `<root>`. Only imports that run when a module is loaded count
(module level, including class bodies and if/try blocks; not function bodies, not `if TYPE_CHECKING:`).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from dicompress.version import __version__

PKG = Path(__file__).resolve().parents[1] / "dicompress"
ROOT = "<root>"

SUBPACKAGES = ["arch", "calib", "distill", "passes", "nn", "kernels", "quant", "io", "eval", "stream", "analysis",
               "prune", "zoo"]
# leaf modules: they import nothing of dicompress but each other, so any layer may import them
LEAVES = ["dicompress.config", "dicompress.version", "dicompress.errors", "dicompress.calib.config"]

# `import dicompress.X` runs `dicompress/__init__.py` first, and that imports every subpackage in a fixed order,
# which would hide a cycle that only breaks when X is loaded first. This stand-in root package has the real
# `__path__` but runs none of the root's code, so X loads through its own imports alone.
_ALONE = """
import importlib, importlib.util, sys, types
spec = importlib.util.find_spec("dicompress")
root = types.ModuleType("dicompress")
root.__path__, root.__spec__, root.__file__ = list(spec.submodule_search_locations), spec, spec.origin
sys.modules["dicompress"] = root
importlib.import_module(sys.argv[1])
"""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _load_time_imports(body: list[ast.stmt]):
    """The import statements of `body` that run when the module loads."""
    for st in body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(st, (ast.Import, ast.ImportFrom)):
            yield st
        elif isinstance(st, ast.If) and _is_type_checking(st.test):
            yield from _load_time_imports(st.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(st, field, None)
                if isinstance(sub, list):
                    yield from _load_time_imports(sub)


def _all_imports(tree: ast.Module):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _targets(module: str, st: ast.Import | ast.ImportFrom) -> list[str]:
    """The dicompress modules an import statement in `module` loads (a submodule when a name is one)."""
    if isinstance(st, ast.Import):
        return [a.name for a in st.names if a.name.split(".")[0] == "dicompress"]
    if st.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - st.level + 1] + ([st.module] if st.module else []))
    else:
        base = st.module or ""
    if base.split(".")[0] != "dicompress":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in st.names]


def _node(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def import_graph() -> dict[tuple[str, str], list[str]]:
    """(from node, to node) -> ["file:line -> module", ...] for every load-time import between two nodes."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, path in MODULES.items():
        for st in _load_time_imports(ast.parse(path.read_text(), str(path)).body):
            for target in _targets(module, st):
                a, b = _node(module), _node(target)
                where = f"{path.relative_to(PKG.parent)}:{st.lineno} -> {target}"
                if a != b and where not in edges[(a, b)]:
                    edges[(a, b)].append(where)
    return edges


def cycles(edges) -> list[list[str]]:
    """One cycle (as a node list, first node repeated at the end) per strongly connected component."""
    succ = defaultdict(set)
    for a, b in edges:
        succ[a].add(b)
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):   # Tarjan; the graph has a few dozen nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(set(succ) | {b for _, b in edges}):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:   # a shortest cycle through the component's smallest node (breadth-first)
        start = min(comp)
        prev, queue = {start: None}, [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(succ[v] & comp):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    out.append(path[::-1] + [start])
                    queue = []
                    break
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
    return out


def _describe(cycle: list[str], edges) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in zip(cycle, cycle[1:]):
        lines += [f"  {a} -> {b}:"] + [f"    {w}" for w in edges[(a, b)]]
    return "\n".join(lines)


def test_graph_finds_a_planted_cycle():
    edges = {("a", "b"): ["a.py:1 -> b"], ("b", "c"): ["b.py:1 -> c"], ("c", "a"): ["c.py:2 -> a"],
             ("c", "d"): ["c.py:3 -> d"]}
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert "c.py:2 -> a" in _describe(cycles(edges)[0], edges)
    assert cycles({("a", "b"): [], ("b", "c"): []}) == []


def test_relative_imports_resolve_to_modules():
    tree = ast.parse("from ..calib.store import CalibrationStore\nfrom . import base\nfrom .. import version\n"
                     "import dicompress.errors\nimport torch\n")
    got = [t for st in tree.body for t in _targets("dicompress.passes.tlq", st)]
    assert got == ["dicompress.calib.store", "dicompress.passes.base", "dicompress.version", "dicompress.errors"]


def test_no_import_cycle_between_subpackages():
    edges = import_graph()
    found = cycles(edges)
    assert not found, "import cycles between subpackages (module-level imports):\n" + "\n".join(
        _describe(c, edges) for c in found)


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_only_leaves(leaf):
    tree = ast.parse(MODULES[leaf].read_text())
    bad = [f"line {st.lineno}: {t}" for st in _all_imports(tree) for t in _targets(leaf, st) if t not in LEAVES]
    assert not bad, f"{leaf} must import nothing of dicompress but the leaves {LEAVES}; found {bad}"


@pytest.mark.parametrize("module", [f"dicompress.{s}" for s in SUBPACKAGES] + LEAVES)
def test_imports_alone_in_a_fresh_interpreter(module):
    res = subprocess.run([sys.executable, "-c", _ALONE, module], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"`import {module}` alone failed:\n{res.stderr[-3000:]}"


def test_package_imports_in_a_fresh_interpreter():
    res = subprocess.run([sys.executable, "-c", "import dicompress; print(dicompress.__version__)"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == __version__
