"""The code's shape: no import cycle among vaefast's modules, no function longer than about 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vaefast"
MAX_LINES = 60  # code lines of a function, its docstring not counted

# Cycles through imports inside functions that are known and owned elsewhere; each must go, then leave this list.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module and package of vaefast."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The vaefast modules an import statement loads: the module itself and each package above it."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:k]) for k in range(2, len(parts) + 1) if ".".join(parts[:k]) in modules}
    return out


def _type_checking(stmt: ast.If) -> bool:
    return isinstance(stmt.test, ast.Name) and stmt.test.id == "TYPE_CHECKING"


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    """Module -> the vaefast modules it imports (packages above the importer itself are not edges)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = list(ast.iter_child_nodes(tree)) if top_level_only else list(ast.walk(tree))
        if top_level_only:  # module-level `if`/`try` blocks run at import time too (not `if TYPE_CHECKING:`)
            blocks = [s for s in nodes if isinstance(s, ast.Try) or (isinstance(s, ast.If) and not _type_checking(s))]
            nodes += [n for stmt in blocks for n in ast.walk(stmt)]
        own = {name.rsplit(".", k)[0] for k in range(name.count(".") + 1)}
        targets = set().union(*(_targets(n, modules) for n in nodes)) if nodes else set()
        graph[name] = targets - own
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while not comp or v not in comp:
                comp.add(stack.pop())
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_at_module_level():
    """Importing any vaefast module never re-enters a module that is still initialising."""
    assert _cycles(_graph(top_level_only=True)) == []


def test_no_import_cycle_hidden_in_functions():
    """Imports inside functions do not break cycles either: the graph of every import statement has none."""
    cycles = set(_cycles(_graph(top_level_only=False)))
    assert cycles - KNOWN_CYCLES == set(), sorted(sorted(c) for c in cycles - KNOWN_CYCLES)


def test_the_import_graph_sees_the_layout():
    """The checks above look at real edges (a sanity check of the parser)."""
    graph = _graph(top_level_only=True)
    assert "vaefast.schema" in graph["vaefast.store"]
    assert not any(m.startswith("vaefast.sweep") for m in _graph(top_level_only=False)["vaefast.store"])  # no arrow up
    assert "vaefast.analysis" in graph["vaefast.plots"] and "vaefast.analysis" in graph["vaefast.report"]
    assert "vaefast.report" not in _graph(top_level_only=False)["vaefast.plots"]


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_longer_than_60_lines():
    """Every function of vaefast fits on a screen: at most 60 lines besides its docstring."""
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_LINES:
                long.append(f"{name}.{node.name} ({_code_lines(node)} lines)")
    assert long == []
