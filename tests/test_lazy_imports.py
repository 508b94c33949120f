"""Imports inside functions are only where they keep a heavy library out of `orchestrate`'s start.

Rule (docs/architecture.md): a function may import a module only if importing it at the top would
load a heavy library (torch, ray, onnx, onnxruntime, optuna, scikit-learn, matplotlib, paramiko,
transformers, numpy, ...), directly or through the project modules it imports at their top; or
inside `try:` (an optional dependency); or with a comment on that line saying why. Everything
else is imported at the top of its module, where a reader sees what the module depends on.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "torch_pruning", "ray", "onnx", "onnxruntime", "onnxconverter_common", "optuna", "sklearn",
         "matplotlib", "paramiko", "transformers", "numpy", "scipy", "pandas", "psutil", "pynvml"}
PROJECT = ("orchestrator", "agents", "plugins")


def _path(module: str) -> Path | None:
    for path in (ROOT / (module.replace(".", "/") + ".py"), ROOT / module.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def _top_level_imports(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names if _path(f"{node.module}.{a.name}")]
    return out


@cache
def _top_level_imports_of(path: Path) -> tuple[str, ...]:
    return tuple(_top_level_imports(path))


@cache
def heavy_reason(module: str) -> str | None:
    """The heavy library importing `module` loads (itself, or through project modules' top-level imports), or None.

    Depth first in import order, each module once (a walk that kept a module's path instead was
    exponential in the number of import paths: minutes for one module once `orchestrator`'s
    package imports grew)."""
    seen: set[str] = set()

    def visit(mod: str) -> str | None:
        top = mod.split(".")[0]
        if top in HEAVY:
            return top
        if top not in PROJECT or mod in seen:
            return None
        seen.add(mod)
        parts = mod.split(".")
        for package in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):  # each package's __init__ runs too
            path = _path(package)
            for dep in _top_level_imports_of(path) if path else ():
                reason = visit(dep)
                if reason:
                    return reason
        return None

    return visit(module)


def _function_local_imports(tree: ast.Module):
    """(import node, inside a try:) for every import statement inside a function."""
    found = []

    def walk(node: ast.AST, in_function: bool, in_try: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                found.append((child, in_try))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)),
                 in_try or isinstance(child, ast.Try))

    walk(tree, False, False)
    return found


def test_function_local_imports_are_only_of_heavy_modules():
    light = []
    for path in sorted([*(ROOT / "orchestrator").rglob("*.py"), *(ROOT / "agents").rglob("*.py")]):
        lines = path.read_text().splitlines()
        for node, in_try in _function_local_imports(ast.parse("\n".join(lines))):
            if in_try or getattr(node, "level", 0) or "#" in lines[node.lineno - 1]:
                continue
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            if not any(heavy_reason(m) for m in modules):
                light.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not light, "import these at the top of their module (nothing heavy; or say why in a comment):\n" + \
        "\n".join(light)


def test_the_rule_tells_heavy_from_light():
    assert heavy_reason("torch.nn") == "torch"
    assert heavy_reason("json") is None
    assert heavy_reason("orchestrator.config.profile") is None  # pydantic and yaml load with the CLI anyway
    assert heavy_reason("orchestrator.devices.ssh") == "paramiko"  # through its top-level imports
