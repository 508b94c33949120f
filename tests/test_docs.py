"""docs/plugins.md is true: every hook is documented, every hook has a test, every example runs."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from orchestrator.hooks import specs as hookspecs
from orchestrator.hooks.manager import PluginRegistry

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "plugins.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
               if hasattr(fn, "edge_orchestrator_spec"))


def test_there_are_hooks():
    assert {"register_techniques", "register_tasks", "candidate_measured", "run_finished"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook):
    assert f"### {hook}\n" in DOC, f"docs/plugins.md has no section for {hook}"
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    section = DOC.split(f"### {hook}\n", 1)[1].split("\n### ", 1)[0]
    assert f"`{hook}(" in section and all(p in section for p in params.split(", ")), section[:300]
    assert f"def {hook}(" in section, f"the {hook} section has no runnable example"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    """datasette-style: some test outside this file implements the hook and checks it is called."""
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py"]
    assert any(re.search(rf"\b{hook}\b", p.read_text()) for p in tests), f"no test uses the {hook} hook"


def _module(name: str, code: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(code, f"docs/plugins.md:{name}", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("index", range(len(BLOCKS) - 1))
def test_plugin_examples_load_as_plugins(index):
    """Each example (but the test) is a working plugin: it registers without errors."""
    module = _module(f"doc_example_{index}", BLOCKS[index])
    registry = PluginRegistry()
    registry.add_plugin(module, f"doc-example-{index}")
    assert registry.plugins[f"doc-example-{index}"].error is None


def test_first_example_technique_works_on_a_model(eo_technique_context, eo_tiny_onnx, eo_evaluate):
    module = _module("my_technique", BLOCKS[0])
    registry = PluginRegistry()
    registry.add_plugin(module, "my_technique")
    technique = registry.technique("zero-small-weights")
    model = technique.apply(eo_tiny_onnx(), technique.check_params({"threshold": 1e-2}), eo_technique_context)
    assert eo_evaluate(model) > 0.5


def test_documented_plugin_test_passes(tmp_path):
    """The page's plugin test, run as a plugin author would run it (a separate pytest)."""
    (tmp_path / "my_technique.py").write_text(BLOCKS[0])
    (tmp_path / "test_my_technique.py").write_text(BLOCKS[-1])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_the_own_data_task_example_trains_and_distils_with_train_epochs():
    import torch

    from orchestrator import Dataset

    module = _module("my_camera", next(b for b in BLOCKS if "class MyCamera" in b))
    torch.manual_seed(0)
    data = Dataset(torch.randn(20, 3, 4, 4).numpy(), torch.randint(0, 2, (20,)).numpy())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    before = model[1].weight.detach().clone()
    trained = module.MyCamera().train(model, data, epochs=2, seed=0)
    assert not trained.training and not torch.equal(before, trained[1].weight)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    module.MyCamera().train(student, data, epochs=1, seed=0, teacher=trained)


def _written_keys(path: Path, function: str, variable: str) -> set[str]:
    """The string keys `function` in `path` writes into `variable`: its dict literal, `variable[key] = ...` and
    `variable.update(key=...)`."""
    import ast

    tree = ast.parse(path.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    keys: set[str] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets) \
                and isinstance(node.value, ast.Dict):
            keys |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == variable \
                and isinstance(node.value, ast.Dict):
            keys |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and \
                isinstance(node.value, ast.Name) and node.value.id == variable and isinstance(node.slice, ast.Constant):
            keys.add(node.slice.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update" and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == variable:
            keys |= {k.arg for k in node.keywords if k.arg}
    return keys


def test_every_key_results_json_gets_is_in_docs_results_md():
    """results.json's keys, as the run writes them (finish_run's dict and the run's extras), its candidates'
    (CandidateRecord.to_json) and the final round's decision block: each is named in docs/results.md."""
    import dataclasses

    from orchestrator.search.record import Metrics
    from tests.helpers import ROOT as root

    documented = set(re.findall(r"`([a-z_0-9]+)`", (root / "docs" / "results.md").read_text()))
    run, final_round = root / "orchestrator" / "run.py", root / "orchestrator" / "search" / "final_round.py"
    top = _written_keys(run, "finish_run", "results") | _written_keys(run, "execute_run", "extras") \
        | _written_keys(run, "_search", "extras")
    decision = _written_keys(final_round, "decide", "block") | _written_keys(final_round, "run_final_round", "block")
    trial = _written_keys(root / "orchestrator" / "search" / "trial.py", "run_trial", "record")
    record = {"id", "pipeline", "status", "error", "metrics", "device", "model_sha256", "measurement",
              "violations", "feasible", "on_front"}
    metrics = {f.name for f in dataclasses.fields(Metrics)} - {"extra"}
    assert {"schema_version", "candidates", "starting_points", "decision", "ruled_out"} <= top
    assert {"pick", "leader", "sentence", "protocol"} <= decision and {"build", "cached"} <= trial
    missing = sorted((top | decision | trial | record | metrics) - documented)
    assert not missing, f"docs/results.md does not name: {missing}"
