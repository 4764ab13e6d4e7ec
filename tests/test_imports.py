"""tether's modules import each other without a cycle (issue 15).

A cycle makes the import order matter (a name imported from a half-initialised module is
missing) and ties modules that should be layered. The graph is built from the source, not
by importing: every module under src/tether is parsed, and its module-level imports (also
in module-level `try`/`if` blocks and class bodies, which run at import time) are edges.
Imports inside functions run later, when every module is loaded, so they are not edges;
neither are imports under `if TYPE_CHECKING:` (never run). The parent packages an import
loads first are not edges either: a package's `__init__` importing its own submodules is
the usual layout, not a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "tether"

Graph = dict[str, set[str]]


def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package, by dotted name (a package is its `__init__`)."""
    modules: dict[str, Path] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_time(node.body)
            yield from _import_time(node.orelse)
        elif isinstance(node, ast.Try | ast.TryStar):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _import_time(block)
        elif isinstance(node, ast.With | ast.AsyncWith | ast.For | ast.While | ast.ClassDef):
            yield from _import_time(node.body)  # a class body runs at import time too


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an `from X import ...` names (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    package = parts if is_package else parts[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, node.module] if node.module else package)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports at import time."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _import_time(tree.body):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = _base(module, is_package, node)
        for alias in node.names:
            # `from tether import wire` imports the submodule tether.wire; `from
            # tether.store.base import LogEntry` imports tether.store.base.
            sub = f"{base}.{alias.name}"
            targets.add(sub if sub in modules else base)
    return {t for t in targets if t in modules and t != module}


def import_graph(src: Path = SRC, package: str = PACKAGE) -> Graph:
    modules = module_files(src, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module
    (Tarjan's algorithm, then a path back to the component's first module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: Graph, component: set[str]) -> list[str]:
    """A shortest cycle from the component's first module back to it (breadth-first)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in {component}")  # a component of >1 always has one


def test_the_checker_resolves_every_kind_of_import(tmp_path: Path) -> None:
    """Absolute, `from pkg import submodule`, relative, a name from a module; not those
    in functions or under TYPE_CHECKING."""
    files = {
        "__init__.py": "VERSION = 1\n",
        "a.py": "import pkg.b\nfrom pkg import c, VERSION\n",
        "b.py": "from .sub import d\nfrom . import c\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
        "def f() -> None:\n    import pkg.b\n",
        "sub/__init__.py": "from .d import X\nfrom .. import c\n",
        "sub/d.py": "try:\n    from pkg.sub import e\nexcept ImportError:\n    pass\n"
        "class K:\n    from ..c import f\n",
        "sub/e.py": "X = 1\n",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    assert import_graph(tmp_path, "pkg") == {
        "pkg": set(),
        "pkg.a": {"pkg.b", "pkg.c", "pkg"},
        "pkg.b": {"pkg.sub.d", "pkg.c"},
        "pkg.c": set(),
        "pkg.sub": {"pkg.sub.d", "pkg.c"},
        "pkg.sub.d": {"pkg.sub.e", "pkg.c"},
        "pkg.sub.e": set(),
    }
    graph = import_graph()  # and tether's own
    assert "tether.wire" in graph["tether.routes"]  # from tether import (..., wire, ...)
    assert "tether.lifecycle" in graph["tether.routes"]  # from tether.lifecycle import ...


def test_the_checker_finds_a_cycle() -> None:
    graph: Graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, (
        "import cycles in src/tether (break each, e.g. by moving the shared "
        "part into a module both import):\n" + "\n".join(" -> ".join(c) for c in found)
    )


def test_the_server_starts_without_the_mcp_sdk() -> None:
    """The `mcp` SDK (a second of CPU to import) loads at the first MCP tool a process
    meets (`tool_loop._load_sdk`), not with the app: every server start would pay it."""
    probe = (
        "import sys, tether.app, tether.cli;"
        "print(sorted(m for m in sys.modules if m == 'mcp' or m.startswith('mcp.')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
