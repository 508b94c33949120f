"""One transport interface: a plugin adds a transport kind (one module plus its registration) and a search and a
rollout run through it, with no change elsewhere; the rollout says which devices it cannot deploy to.

The toy transport is the `register_transports` example of docs/plugins.md, installed as a real
distribution (a package and its .dist-info on the path), so the run's own process and its Ray
workers load it like any installed plugin. Its "device" is the agent (`python -m agents`) in a
child process on this machine, with a folder of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator import Deployable, Transport, TransportKind, hookimpl
from orchestrator.devices.base import Device
from orchestrator.devices.registry import DeviceRegistry, RegisteredDevice
from orchestrator.errors import DeployError, MeasurementError, RolloutFailed
from orchestrator.hooks.manager import PluginRegistry
from tests.helpers import ROOT

X86 = ROOT / "device_profiles" / "x86-host.yaml"
DOC = (ROOT / "docs" / "plugins.md").read_text()
EXAMPLE = re.search(r"### register_transports\n.*?```python\n(.*?)```", DOC, flags=re.S).group(1)
TINY_TASK = '''

from orchestrator.testing import TinyDigitsTask


@hookimpl
def register_tasks(register):
    register(TinyDigitsTask())
'''


def _plugin(**hooks):
    return type("Plugin", (), {name: staticmethod(hookimpl(fn)) for name, fn in hooks.items()})()


def _install(folder: Path) -> Path:
    """The docs' example (plus the tiny task, for a fast search) as an installed distribution under `folder`."""
    (folder / "eo_agent_process").mkdir(parents=True)
    (folder / "eo_agent_process" / "__init__.py").write_text(EXAMPLE + TINY_TASK)
    info = folder / "eo_agent_process-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eo-agent-process\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[edge_orchestrator]\nagent-process = eo_agent_process\n")
    return folder


def _device(name: str, transport: str, **extra) -> RegisteredDevice:
    return RegisteredDevice(name=name, host="", port=0, user="", key_path=None, host_key="", profile="x86-host",
                            profile_path=str(X86), arch="x86_64", transport=transport, extra=extra)


# ------------------------------------------------------------------------------------------ the hook


def test_register_transports_refuses_a_taken_name_naming_both_plugins_and_a_builtin_name():
    kind = TransportKind("serial-board", lambda device: None)
    registry = PluginRegistry()
    registry.add_plugin(_plugin(register_transports=lambda register: register(kind)), "first")
    registry.add_plugin(_plugin(register_transports=lambda register: register(kind)), "copycat")
    registry.add_plugin(_plugin(register_transports=lambda register: register(TransportKind("ssh", Device))), "greedy")
    registry.add_plugin(_plugin(register_transports=lambda register: register("not a kind")), "confused")
    assert registry.plugins["first"].error is None and registry.plugins["first"].transports == ["serial-board"]
    assert registry.plugins["copycat"].error == (
        "transport 'serial-board' from plugin 'copycat' is already registered by plugin 'first'")
    assert registry.plugins["greedy"].error == "transport 'ssh' from plugin 'greedy' is a built-in transport's name"
    assert "which is not a named TransportKind" in registry.plugins["confused"].error
    assert registry.transports["serial-board"] == (kind, "first")


def test_the_example_transport_has_both_capabilities_and_a_device_of_an_unknown_kind_is_named(tmp_path):
    namespace: dict = {}
    exec(compile(EXAMPLE, "docs/plugins.md:register_transports", "exec"), namespace)
    device = Device(name="proc", transport="agent-process", arch="x86_64", extra={"root": str(tmp_path)})
    process = namespace["AgentProcess"](device)
    assert isinstance(process, Transport) and isinstance(process, Deployable)
    assert process.info()["arch"]  # the real agent answered

    from orchestrator.fleet.transports import deployable_reason, make_transport

    with pytest.raises(MeasurementError, match=r"device ghost: transport 'carrier-pigeon' is not installed \(known: "
                                               r"local, qemu, ssh"):
        make_transport(Device(name="ghost", transport="carrier-pigeon", arch="x86_64"))
    local = Device(name="here", transport="local", arch="x86_64")
    assert isinstance(make_transport(local), Transport)
    assert deployable_reason(local) == "transport 'local' has no deploy capability (install, health, rollback, status)"


# ------------------------------------------------------------------------------------------ a search and a rollout


@pytest.mark.slow
def test_a_plugin_transport_runs_a_search_and_a_rollout_with_no_change_elsewhere(tmp_path, monkeypatch):
    from orchestrator.rollout.execute import deploy, rollback_devices
    from orchestrator.rollout.plan import RolloutOptions, chosen_models

    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_ORCHESTRATOR_HOME", str(home))
    plugin_dir = _install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(plugin_dir))
    registry = DeviceRegistry()
    registry.add(_device("proc-1", "agent-process", root=str(tmp_path / "proc-1")))

    ray_tmp = Path(tempfile.mkdtemp(prefix="eo-ray-", dir="/tmp"))  # short: Ray's unix sockets live under it
    out = tmp_path / "runs"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp),
           "PYTHONPATH": os.pathsep.join(p for p in (str(plugin_dir), os.environ.get("PYTHONPATH")) if p)}
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "orchestrator", "--profile", str(X86), "--task", "tiny-digits",
                               "--trials", "3", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=480)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results.json")).read_text())
    assert results["device"]["source"] == "registry" and results["device"]["transport"] == "agent-process"
    measured = [c for c in results["candidates"] if (c.get("metrics") or {}).get("latency_ms")]
    assert measured, "no candidate was measured through the plugin's transport"
    assert results["best"]["model_sha256"]
    print(f"search through the plugin transport: {time.monotonic() - started:.0f} s")

    # the rollout: the plugin's device is deployed to; a device whose transport cannot be is said, not skipped
    registry.add(_device("here", "local"))
    chosen = chosen_models(results["run_id"])[0]
    events: list[tuple[str, dict]] = []
    result = deploy(chosen, RolloutOptions(canary="1", health_runs=5, health_time_budget_s=2.0),
                    on_event=lambda kind, data: events.append((kind, data)))
    assert result.status == "done", result.message
    assert result.devices["proc-1"]["state"] == "healthy"
    assert result.not_deployable == {"here": "transport 'local' has no deploy capability (install, health, "
                                             "rollback, status)"}
    assert "not deployed to (its transport cannot be): here: transport 'local'" in result.message
    assert registry.get("proc-1").deployed_model == chosen.sha256
    current = (tmp_path / "proc-1" / "deploy" / "current").resolve()
    assert (current / "model.onnx").read_bytes() == chosen.path.read_bytes()

    with pytest.raises(RolloutFailed, match="here: device here: transport 'local' has no deploy capability"):
        rollback_devices(["here"])


def test_deploy_target_of_a_device_without_the_capability_is_refused():
    from orchestrator.fleet.transports import deploy_target

    with pytest.raises(DeployError, match=r"device here: transport 'local' has no deploy capability"):
        deploy_target(_device("here", "local"))
