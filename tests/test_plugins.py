"""The plugin seam: built-ins load through entry points, broken or duplicate plugins are reported, the rest load."""

from __future__ import annotations

import json
import pytest

from orchestrator import Technique, choice, hookimpl
from orchestrator.cli import main
from orchestrator.errors import PluginError, TechniqueParamsError
from orchestrator.plugins import DISABLE_ENV, PluginRegistry, get_plugin_manager


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
    assert len(technique.param_grid()) == 2 * 3 * 2 * 2


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
