"""The agent's modules import each other without a cycle, and nothing a device does not have.

`agents/` runs on edge devices with only Python 3.9+, numpy and onnxruntime (psutil optional). The
import graph is read from the source with `ast`, every import statement counted, those inside
functions too: a cycle hidden by a function-local import is still a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

AGENTS = Path(__file__).resolve().parents[1] / "agents"
ALLOWED_OUTSIDE = {"numpy", "onnxruntime", "psutil"}
# Imported by name (importlib) only where its driver is present, never required: the NVML sensor.
OPTIONAL_BY_NAME = {"pynvml"}


def agent_modules(root: Path = AGENTS) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name ("agents.sensors" for its __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in a module, relative ones resolved.

    `from X import y` yields `X.y` (a submodule, or a name of X: the caller resolves it).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.extend(("%s.%s" % (base, alias.name) if base else alias.name, child.lineno, in_function)
                             for alias in child.names)
            elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                  and child.func.attr == "import_module" and child.args
                  and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str)):
                found.append((child.args[0].value, child.lineno, in_function))  # importlib.import_module("x")
            visit(child, local)

    visit(tree, False)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (the longest module name each import resolves to)."""
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target, _, _ in imports_of(name, path):
            parts = target.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in modules:
                    if candidate != name:
                        edges.add(candidate)
                    break
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = dfs(start)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_names_it():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_a_function_local_import_counts_in_the_graph(tmp_path):
    pkg = tmp_path / "agents"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from agents.two import x\n")
    (pkg / "two.py").write_text("def x():\n    from agents import one\n    return one\n")
    (pkg / "three.py").write_text("from .two import x\n")
    graph = import_graph(agent_modules(pkg))
    assert graph == {"agents": set(), "agents.one": {"agents.two"}, "agents.two": {"agents.one"},
                     "agents.three": {"agents.two"}}
    assert find_cycle(graph) == ["agents.one", "agents.two", "agents.one"]


def test_agent_modules_import_each_other_without_a_cycle():
    modules = agent_modules()
    assert {"agents.kernel", "agents.cli", "agents.deploy", "agents.health", "agents.versions",
            "agents.sensors"} <= set(modules)
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, "import cycle in agents/: " + " -> ".join(cycle)


def test_the_kernel_and_the_rollout_modules_import_downwards_only():
    graph = import_graph(agent_modules())
    assert graph["agents.kernel"] == set()
    assert graph["agents.versions"] == {"agents.kernel"}
    assert graph["agents.health"] == {"agents.kernel", "agents.versions"}
    assert graph["agents.deploy"] <= {"agents.kernel", "agents.versions", "agents.health"}


@pytest.mark.parametrize("name", sorted(agent_modules()))
def test_agent_module_imports_only_what_a_device_has(name):
    path = agent_modules()[name]
    allowed = set(sys.stdlib_module_names) | ALLOWED_OUTSIDE | {"agents"}
    bad = sorted({"%s (line %d)" % (target, line) for target, line, _ in imports_of(name, path)
                  if target.split(".")[0] not in allowed | OPTIONAL_BY_NAME})
    assert not bad, "%s imports what an edge device does not have: %s" % (path.name, ", ".join(bad))
    by_statement = {target.split(".")[0] for target, _, _ in imports_of(name, path)} & OPTIONAL_BY_NAME
    assert not by_statement or "importlib.import_module(" in path.read_text()


@pytest.mark.parametrize("name", sorted(agent_modules()))
def test_no_function_local_imports_without_a_reason(name):
    # allowed only to avoid a heavy optional import, with "# local import: why" on its line
    path = agent_modules()[name]
    lines = path.read_text().splitlines()
    local = ["line %d: %s" % (line, lines[line - 1].strip()) for target, line, in_function in imports_of(name, path)
             if in_function and target.split(".")[0] not in OPTIONAL_BY_NAME
             and "# local import:" not in lines[line - 1]]
    assert not local, "%s imports inside functions: %s" % (path.name, "; ".join(local))
