"""The plugin seam: built-ins load through entry points, broken or duplicate plugins are reported, the rest load."""

from __future__ import annotations

import json

import pytest

from orchestrator import Technique, choice, hookimpl
from orchestrator.cli.main import main
from orchestrator.errors import PluginError, TechniqueParamsError
from orchestrator.hooks.manager import DISABLE_ENV, PluginRegistry, get_plugin_manager


class Dummy(Technique):
    name = "int8-static"  # clashes with the built-in on purpose
    stage = "graph"
    search_space = {"k": choice([1, 2])}


def _plugin(**hooks):
    """A plugin object (pluggy needs it hashable) with the given hook implementations."""
    return type("Plugin", (), {name: staticmethod(hookimpl(fn)) for name, fn in hooks.items()})()


def test_builtins_load_through_entry_points():
    registry = get_plugin_manager()
    assert {"digits", "quantization"} <= set(registry.plugins)
    assert registry.plugins["quantization"].package == "edge-orchestrator"
    assert "int8-static" in registry.techniques and "digits" in registry.tasks
    assert all(p.error is None for p in registry.plugins.values())


def test_duplicate_technique_names_both_plugins_and_the_rest_still_load():
    registry = get_plugin_manager()
    registry.add_plugin(_plugin(register_techniques=lambda register: register(Dummy())), "third-party")
    assert registry.plugins["third-party"].error == (
        "technique 'int8-static' from plugin 'third-party' is already registered by plugin 'quantization'"
    )
    assert type(registry.techniques["int8-static"]).__name__ == "Int8Static"


def test_hook_that_does_not_exist_is_reported():
    registry = PluginRegistry()
    registry.add_plugin(_plugin(register_warp_drives=lambda register: None), "typo-plugin")
    assert "register_warp_drives" in registry.plugins["typo-plugin"].error


def test_unknown_technique_lists_installed():
    with pytest.raises(PluginError, match=r"unknown technique 'nope'; installed: .*int8-static"):
        get_plugin_manager().technique("nope")


def test_disable_env_skips_a_plugin(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "quantization")
    registry = get_plugin_manager()
    assert "quantization" not in registry.plugins and "int8-static" not in registry.techniques
    assert "digits" in registry.tasks


def test_plugins_command_json(capsys):
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["quantization"]["techniques"] == ["int8-static", "int8-dynamic", "fp16"]
    assert listed["digits"]["tasks"] == ["digits"]


@pytest.mark.parametrize(
    "params, message",
    [
        ({"bits": 4}, "unknown parameter(s) bits"),
        ({"calibration": "magic"}, "calibration='magic' is not one of"),
        ({"calibration_samples": 2}, "calibration_samples must be an integer >= 8"),
    ],
)
def test_int8_static_refuses_bad_params(params, message):
    technique = get_plugin_manager().technique("int8-static")
    with pytest.raises(TechniqueParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        technique.check_params(params)


def test_int8_static_grid_size():
    technique = get_plugin_manager().technique("int8-static")
    assert len(technique.param_grid()) == 2 * 3 * 2 * 2 * 2  # per_channel, calibration, activations, reduce_range, quant_format


def test_register_tasks_adds_a_task_and_refuses_a_duplicate():
    from orchestrator.testing import TinyDigitsTask

    class Mine(TinyDigitsTask):
        name = "mine"

    registry = get_plugin_manager()
    registry.add_plugin(_plugin(register_tasks=lambda register: register(Mine())), "my-tasks")
    assert registry.task("mine").name == "mine" and registry.plugins["my-tasks"].tasks == ["mine"]
    registry.add_plugin(_plugin(register_tasks=lambda register: register(Mine())), "copycat")
    assert "already registered by plugin 'my-tasks'" in registry.plugins["copycat"].error


def test_plugins_list_the_hooks_they_implement():
    registry = get_plugin_manager()
    assert registry.plugins["quantization"].hooks == ["register_techniques"]
    assert registry.plugins["digits"].hooks == ["register_tasks"]


# -- outside plugins installed as real distributions (a package + its .dist-info on sys.path) --------


def _install(tmp_path, monkeypatch, dist: str, entry: str, source: str) -> None:
    """Write package `dist` (module source `source`) with entry point `entry = dist` and put it on sys.path."""
    (tmp_path / dist).mkdir()
    (tmp_path / dist / "__init__.py").write_text(source)
    info = tmp_path / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[edge_orchestrator]\n{entry} = {dist}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


RAISES = '''
from orchestrator import hookimpl

@hookimpl
def register_techniques(register):
    raise RuntimeError("no GPU here")
'''

EXITS = '''
import sys
sys.exit(3)
'''

GREEDY = '''
from orchestrator import Technique, hookimpl

class Fp16(Technique):
    name = "fp16"  # the built-in quantization plugin's
    stage = "graph"

class Twice(Technique):
    name = "greedy-twice"
    stage = "graph"

class Mine(Technique):
    name = "greedy-own"
    stage = "graph"

@hookimpl
def register_techniques(register):
    register(Fp16())
    register(Twice())
    register(Twice())
    register(Mine())
'''


def test_a_plugin_whose_register_raises_is_broken_and_the_rest_load(tmp_path, monkeypatch, capsys):
    _install(tmp_path, monkeypatch, "eo_test_raises", "aaa-raises", RAISES)
    registry = get_plugin_manager()
    assert registry.plugins["aaa-raises"].error == "register_techniques failed: RuntimeError: no GPU here"
    assert all(p.error is None for n, p in registry.plugins.items() if n != "aaa-raises")
    assert {"int8-static", "int8-dynamic", "fp16"} <= set(registry.techniques) and "digits" in registry.tasks
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert "RuntimeError: no GPU here" in listed["aaa-raises"]["error"]
    assert listed["quantization"]["error"] is None


def test_a_plugin_that_calls_sys_exit_on_import_is_broken_and_the_cli_goes_on(tmp_path, monkeypatch, capsys):
    _install(tmp_path, monkeypatch, "eo_test_exits", "aaa-exits", EXITS)
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["aaa-exits"]["error"] == "failed to import eo_test_exits: called sys.exit(3)"
    assert listed["quantization"]["techniques"] == ["int8-static", "int8-dynamic", "fp16"]
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert "aaa-exits" in table and "broken" in table and "sys.exit(3)" in table


HANGS = '''
import time
time.sleep(3600)
'''

EXITS_HARD = '''
import os
os._exit(0)
'''

RAISES_BASE = '''
class Stop(BaseException):
    pass

raise Stop("not an Exception")
'''


def test_plugins_that_hang_end_the_process_or_raise_a_base_exception_on_import_are_broken(tmp_path, monkeypatch,
                                                                                             capsys):
    """Issue 31 item 21: a plugin whose import hangs made `orchestrate plugins` print nothing, for ever; one that
    calls os._exit(0) ended it with exit 0 and no output; one raising a BaseException subclass, a traceback.
    Each is now listed as broken and the others load; the probe's verdict is cached until the plugin changes."""
    import time

    monkeypatch.setenv("EDGE_ORCHESTRATOR_PLUGIN_IMPORT_TIMEOUT_S", "5")
    (tmp_path / "h").mkdir()
    _install(tmp_path / "h", monkeypatch, "eo_test_hangs", "aaa-hangs", HANGS)
    (tmp_path / "x").mkdir()
    _install(tmp_path / "x", monkeypatch, "eo_test_exits_hard", "aaa-exits-hard", EXITS_HARD)
    (tmp_path / "b").mkdir()
    _install(tmp_path / "b", monkeypatch, "eo_test_base", "aaa-base", RAISES_BASE)
    started = time.monotonic()
    assert main(["plugins", "--json"]) == 0
    assert time.monotonic() - started < 60
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["aaa-hangs"]["error"] == (
        "failed to import eo_test_hangs: its import did not finish within 5 s (it hangs?; "
        "$EDGE_ORCHESTRATOR_PLUGIN_IMPORT_TIMEOUT_S gives it longer)")
    assert listed["aaa-exits-hard"]["error"] == (
        "failed to import eo_test_exits_hard: its import ended the process (exit code 0; os._exit or a crash)")
    assert listed["aaa-base"]["error"] == "failed to import eo_test_base: Stop: not an Exception"
    assert listed["quantization"]["techniques"] == ["int8-static", "int8-dynamic", "fp16"]
    assert listed["digits"]["error"] is None

    started = time.monotonic()  # the verdicts are cached: no 5 s wait again
    assert main(["plugins"]) == 0
    assert time.monotonic() - started < 5
    table = capsys.readouterr().out
    assert "aaa-hangs" in table and "hangs?" in table and "broken" in table


def test_builtins_register_first_and_only_the_duplicate_is_refused(tmp_path, monkeypatch):
    """An outside plugin sorted before the built-ins claims `fp16` and registers one name twice."""
    _install(tmp_path, monkeypatch, "eo_test_greedy", "aaa-greedy", GREEDY)
    registry = get_plugin_manager()
    quantization = registry.plugins["quantization"]
    assert quantization.error is None and quantization.techniques == ["int8-static", "int8-dynamic", "fp16"]
    assert type(registry.techniques["fp16"]).__module__.startswith("plugins.")
    greedy = registry.plugins["aaa-greedy"]
    assert greedy.techniques == ["greedy-twice", "greedy-own"]  # its other registrations still count
    assert greedy.error == (
        "technique 'fp16' from plugin 'aaa-greedy' is already registered by plugin 'quantization'; "
        "technique 'greedy-twice' from plugin 'aaa-greedy' is already registered by plugin 'aaa-greedy'"
    )
    assert {"greedy-twice", "greedy-own"} <= set(registry.techniques)
