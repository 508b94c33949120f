"""The house's shape: no import circles, and the wings import only what docs/architecture.md allows.

The graph is read from the source with `ast` (imports inside functions count too; imports
under `if TYPE_CHECKING:` do not, they never run), so a circle hidden by a function-local
import is still a circle here.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450


def _modules(package: str) -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph(packages: tuple[str, ...] = ("orchestrator", "agents", "plugins")) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in the file, except type-checking-only imports)."""
    mods: dict[str, Path] = {}
    for package in packages:
        mods.update(_modules(package))
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def wing(module: str) -> str:
    """The room a module lives in: `orchestrator.search.trial` -> `orchestrator/search`; top-level modules -> `orchestrator`."""
    parts = module.split(".")
    if parts[0] == "orchestrator" and len(parts) > 2:
        return f"orchestrator/{parts[1]}"
    if parts[0] == "orchestrator" and len(parts) == 2 and (ROOT / "orchestrator" / parts[1]).is_dir():
        return f"orchestrator/{parts[1]}"
    return parts[0]


def allowed_imports() -> dict[str, set[str]]:
    """The table in docs/architecture.md: room -> the rooms it may import."""
    table: dict[str, set[str]] = {}
    text = (ROOT / "docs" / "architecture.md").read_text()
    for line in text.splitlines():
        m = re.match(r"^\|\s*`([\w/]+)/?`\s*\|.*\|\s*([^|]*)\|\s*$", line)
        if m:
            table[m.group(1).rstrip("/")] = set(re.findall(r"`([\w/]+?)/?`", m.group(2)))
    return table


def test_no_import_circle_in_orchestrator_agents_or_plugins():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_circle_between_wings():
    graph = import_graph()
    wings: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        if wing(mod) == "orchestrator":  # the top (api, run, report, testing) may use every wing
            continue
        wings.setdefault(wing(mod), set()).update(wing(t) for t in targets if wing(t) not in (wing(mod), "orchestrator"))
    cycle = find_cycle(wings)
    assert cycle is None, "wings import each other in a circle: " + " -> ".join(cycle or [])


def test_every_import_between_rooms_is_allowed_by_docs_architecture():
    table = allowed_imports()
    graph = import_graph()
    rooms = {wing(m) for m in graph}
    assert rooms <= set(table), f"rooms missing from docs/architecture.md: {sorted(rooms - set(table))}"
    wrong = sorted(
        f"{mod} imports {target}"
        for mod, targets in graph.items()
        for target in targets
        if wing(target) != wing(mod) and wing(target) not in table[wing(mod)]
    )
    assert not wrong, "imports the table in docs/architecture.md does not allow:\n" + "\n".join(wrong)


def test_the_allowed_imports_table_names_only_real_rooms():
    rooms = {wing(m) for m in import_graph()}
    table = allowed_imports()
    for room, allowed in table.items():
        assert allowed <= rooms, f"docs/architecture.md: {room} may import unknown rooms {sorted(allowed - rooms)}"


def test_plugins_use_only_the_public_api():
    graph = import_graph()
    for mod, targets in graph.items():
        if mod.startswith("plugins"):
            outside = {t for t in targets if t.startswith("orchestrator") and t not in ("orchestrator", "orchestrator.api")}
            assert not outside, f"{mod} imports {sorted(outside)}: plugins use `orchestrator`'s public API only"


def test_no_module_is_over_450_lines():
    long = [f"{p.relative_to(ROOT)} ({n} lines)"
            for package in ("orchestrator", "agents", "plugins")
            for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, "split these modules: " + ", ".join(long)


# ------------------------------------------------------------------ devices, fleet, rollout: one transport interface

TRANSPORT_WINGS = ("orchestrator/devices", "orchestrator/fleet", "orchestrator/rollout")
#: The transport classes and the module each is defined in.
TRANSPORT_CLASSES = {
    "LocalTransport": "orchestrator.devices.local",
    "SshTransport": "orchestrator.devices.ssh",
    "DeployTarget": "orchestrator.devices.ssh_deploy",
    "QemuUserTransport": "orchestrator.emulation.user",
    "EmulatedDeviceTransport": "orchestrator.emulation.rule",
}
#: Where a transport class may be made besides its own module: the table of kinds, and what is built of others.
MAKES_TRANSPORTS = {
    "orchestrator.fleet.transports": "the one table of transport kinds",
    "orchestrator.devices.ssh_deploy": "the ssh kind's Deployable is an SshTransport",
    "orchestrator.emulation.rule": "the qemu kind: QEMU user mode for the check, this host for the time",
    "orchestrator.testing": "the eo_local_device fixture: plugin authors' measurement on this machine",
}


def _trees() -> dict[str, ast.Module]:
    return {mod: ast.parse(path.read_text()) for mod, path in _modules("orchestrator").items()}


def private_imports(packages: tuple[str, ...] = ("orchestrator", "plugins", "agents", "bench")) -> list[str]:
    """`module: from X import _name` for every private name imported from another module (dunders aside).

    A private module (`plugins/_onnxgraph.py`) may stay private; the names imported from it may not."""
    wrong = []
    for package in packages:
        for mod, path in _modules(package).items():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    wrong += [f"{mod}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}"
                              for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return wrong


def test_no_private_name_is_imported_across_modules():
    wrong = private_imports()
    assert not wrong, "private names imported across modules (make them public, or move the code):\n" + "\n".join(wrong)


def test_the_private_import_finder_finds_one(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("from pkg._b import _helper, public\nfrom os import __all__\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert private_imports(("pkg",)) == ["pkg.a:1: from pkg._b import _helper"]


#: Benches that still import tests or examples, and why (to be emptied, not grown).
BENCH_IMPORTS_PENDING: dict[str, str] = {}


def test_benches_import_only_the_product_and_bench():
    """bench/ measures the product: it imports orchestrator, agents, plugins and its own helpers, never tests or
    examples (helpers a test shares with a bench live in bench/: sshd.py, fleet.py, models.py)."""
    wrong = []
    for mod, path in _modules("bench").items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            wrong += [f"{mod} imports {n}" for n in names
                      if n.split(".")[0] in ("tests", "examples") and mod not in BENCH_IMPORTS_PENDING]
    assert not wrong, "benches import test or example code:\n" + "\n".join(wrong)


def test_a_transport_kind_is_chosen_in_one_place():
    """Only fleet/transports.py picks a transport class for a device; nothing compares a device's kind to choose."""
    made, compared = [], []
    for mod, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func.value if isinstance(node.func, ast.Attribute) else node.func  # X(...), X.from_device(...)
                name = func.id if isinstance(func, ast.Name) else None
                if name in TRANSPORT_CLASSES and mod != TRANSPORT_CLASSES[name] and mod not in MAKES_TRANSPORTS:
                    made.append(f"{mod}:{node.lineno} makes {name}")
            if isinstance(node, ast.ClassDef) and mod not in MAKES_TRANSPORTS:
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)} & set(TRANSPORT_CLASSES)
                if bases and mod not in TRANSPORT_CLASSES.values():
                    made.append(f"{mod}:{node.lineno} subclasses {', '.join(sorted(bases))}")
            if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "transport"
                    and wing(mod) in ("orchestrator/fleet", "orchestrator/rollout", "orchestrator/cli", "orchestrator/search")
                    and mod != "orchestrator.fleet.transports"):
                compared.append(f"{mod}:{node.lineno}: {ast.unparse(node)}")
    assert not made, "make transports through orchestrator/fleet/transports.py (make_transport, deploy_target):\n" + \
        "\n".join(made)
    assert not compared, "ask the transport kind's table (fleet/transports.py), not the kind's name:\n" + \
        "\n".join(compared)


def test_every_builtin_transport_kind_is_in_the_table_and_the_protocols_are_met():
    from orchestrator.devices.transport import BUILTIN_KINDS, Deployable, Transport
    from orchestrator.fleet.transports import BUILTIN

    assert tuple(k.name for k in BUILTIN) == BUILTIN_KINDS
    import orchestrator.devices.local as local
    import orchestrator.devices.ssh as ssh
    import orchestrator.devices.ssh_deploy as ssh_deploy
    import orchestrator.emulation.rule as rule

    for cls in (local.LocalTransport, ssh.SshTransport, ssh_deploy.DeployTarget, rule.EmulatedDeviceTransport):
        assert all(callable(getattr(cls, m, None)) for m in ("info", "bench", "compare", "close")), cls
    assert all(callable(getattr(ssh_deploy.DeployTarget, m, None))
               for m in ("open", "install", "health", "rollback", "status", "close"))
    assert Transport is not Deployable


def test_every_model_is_a_task_the_search_does_not_know_brought_models():
    """Issue 28: search/ never imports the brought-model task (search <-> ownmodel circle gone), and no module
    but the task's own asks whether a task is one (`isinstance(task, OwnModelTask)`): workers rebuild any task
    from `Task.spec()` (search/trial.py `rebuild_task`)."""
    graph = import_graph()
    leaks = sorted(m for m, targets in graph.items() if m.startswith("orchestrator.search") and
                   "orchestrator.models.ownmodel" in targets)
    assert not leaks, f"search modules import orchestrator.models.ownmodel: {leaks}"
    asks = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "orchestrator").rglob("*.py")
                  if p.name != "ownmodel.py" and re.search(r"isinstance\([^)]*OwnModelTask", p.read_text()))
    assert not asks, f"isinstance on the brought-model task outside its module: {asks}"


def test_at_most_ten_loose_modules_at_the_top_of_orchestrator():
    loose = sorted(p.name for p in (ROOT / "orchestrator").glob("*.py"))
    assert len(loose) <= 10, f"{len(loose)} loose modules at the top of orchestrator/ (give them rooms): {loose}"


def test_models_never_import_the_search():
    graph = import_graph()
    back = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("orchestrator.models")
                  for t in ts if t.startswith("orchestrator.search"))
    assert not back, f"the search uses models, never the other way round: {back}"


def test_the_builtins_are_the_entry_points_this_distribution_declares():
    import importlib.metadata

    from orchestrator.api import PROJECT_NAME
    from orchestrator.hooks.manager import is_builtin

    eps = importlib.metadata.entry_points(group=PROJECT_NAME)
    ours = {ep.name for ep in eps if is_builtin(ep)}
    assert {"digits", "quantization", "pruning", "distillation", "nas"} <= ours
    # a third party's package whose module happens to be named `plugins.*` is not built in
    outsider = importlib.metadata.EntryPoint(name="x", value="plugins.evil", group=PROJECT_NAME)
    assert not is_builtin(outsider)
