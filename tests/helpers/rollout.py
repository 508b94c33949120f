"""Helpers of the rollout tests: small real models, and fixtures for real run records and a fleet of sshd devices.

The run records and the fleet are bench/fleet.py's (`make_run`, `start_fleet`), shared with bench/rollout.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from onnx import helper

from bench.fleet import Fleet, make_run, start_fleet
from tests.helpers.agent import cnn_graph


def cnn_model(seed: int = 0, dropout_in_training_mode: bool = False) -> bytes:
    """The agent tests' tiny CNN (tests/helpers/agent.py `cnn_graph`) with weights from `seed`, as ONNX bytes."""
    graph = cnn_graph("N", seed, dropout_in_training_mode, name=f"cnn_{seed}")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


# --- shared by the rollout test modules (test_rollout*.py) -----------------------------------------

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "rollout-test"
FAST = {"health_runs": 20, "health_time_budget_s": 0.5}


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    """The x86-host profile under a name of the rollout tests' own (their devices and runs are theirs)."""
    import yaml

    data = yaml.safe_load((ROOT / "device_profiles" / "x86-host.yaml").read_text())
    data["name"] = PROFILE
    path = tmp_path_factory.mktemp("profile") / f"{PROFILE}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def runs(profile, tmp_path_factory, state_home) -> dict[str, str]:
    """Real run records: `a` and `b` (two good models), `bad` (outputs do not reproduce), `none` (no pick)."""
    out = tmp_path_factory.mktemp("runs")
    return {"a": make_run(profile, cnn_model(0), out), "b": make_run(profile, cnn_model(1), out),
            "bad": make_run(profile, cnn_model(1, dropout_in_training_mode=True), out),
            "none": make_run(profile, cnn_model(2), out, latency_ms=1000.0)}


@pytest.fixture
def fleet(tmp_path, profile):
    """Call it with a count: that many sshd devices of the profile, registered; stopped at the end."""
    from bench.sshd import sshd_missing_reason

    if sshd_missing_reason():
        pytest.skip(sshd_missing_reason())
    made: list[Fleet] = []

    def make(count: int, **kwargs) -> Fleet:
        made.append(start_fleet(tmp_path, profile, count, **kwargs))
        return made[-1]

    yield make
    for f in made:
        f.stop()


def sha_of(run_id: str) -> str:
    """The sha256 of the model a run picked."""
    from orchestrator.rollout.plan import chosen_models

    return chosen_models(run_id)[0].sha256


def deploy_run(run_id: str, events: list | None = None, **options) -> object:
    """Roll a run's pick out in this process, with a short health check."""
    from orchestrator.rollout.execute import deploy
    from orchestrator.rollout.plan import RolloutOptions, chosen_models

    chosen = chosen_models(run_id)[0]
    record = (lambda kind, data: events.append((kind, data))) if events is not None else (lambda kind, data: None)
    return deploy(chosen, RolloutOptions(**{**FAST, **options}), record)


def working_current(disk: Path) -> str:
    """The version `current` names on a device's disk, after checking it is a complete, loadable model."""
    import json

    import onnxruntime as ort

    link = disk / "deploy" / "current"
    version = Path(link.readlink()).name
    model = link / "model.onnx"
    manifest = json.loads((link / "manifest.json").read_text())
    assert hashlib.sha256(model.read_bytes()).hexdigest() == manifest["sha256"] == version
    ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return version


def agent_processes(disk: Path, command: str) -> list:
    """The agent processes running `command` (install, health, ...) on the device whose disk is `disk`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if command in cmd and any(str(disk) in part for part in cmd):
            found.append(proc)
    return found
