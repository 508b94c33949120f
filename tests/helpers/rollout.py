"""Helpers of the rollout tests and bench/rollout.py: small real models, real run records, a fleet of sshd devices.

A run is recorded the way `orchestrate --profile` records one: RunStore.start_run, then
orchestrator.run._finish (selection, results.json, best.onnx, report.html), with the model in
the model cache under its sha256.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from onnx import helper

from tests.helpers.agent import cnn_graph
from tests.helpers.sshd import Sshd


def cnn_model(seed: int = 0, dropout_in_training_mode: bool = False) -> bytes:
    """The agent tests' tiny CNN (tests/helpers/agent.py `cnn_graph`) with weights from `seed`, as ONNX bytes."""
    graph = cnn_graph("N", seed, dropout_in_training_mode, name=f"cnn_{seed}")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def make_run(profile_path: Path, model: bytes, out_root: Path, latency_ms: float = 0.1) -> str:
    """A finished run of the profile whose one candidate (the baseline) is `model`; returns the run id.

    With `latency_ms` over the profile's limit, the run ends `no_feasible`, with no chosen model.
    """
    from orchestrator.config.profile import load_profile
    from orchestrator.run import _finish, new_run_id
    from orchestrator.search.record import CandidateRecord
    from orchestrator.state.paths import cache_dir, store_path
    from orchestrator.state.store import RunStore

    loaded = load_profile(profile_path)
    sha = hashlib.sha256(model).hexdigest()
    (cache_dir("models") / f"{sha}.onnx").write_bytes(model)
    run_id = new_run_id(loaded.profile.name)
    out = out_root / run_id
    out.mkdir(parents=True)
    store = RunStore(store_path())
    store.start_run(run_id, loaded.profile.name, str(loaded.path), "digits", str(out))
    record = {"id": "c000", "pipeline": [], "status": "ok", "error": None, "device": "local:test", "model_sha256": sha,
              "metrics": {"accuracy": 0.9, "size_bytes": len(model), "compressed_size_bytes": len(model),
                          "latency_ms": {"p50": latency_ms, "p90": latency_ms, "p99": latency_ms},
                          "peak_memory_mb": 50.0, "model_memory_mb": 1.0, "energy_mj": 0.1,
                          "energy_source": "estimated"}}
    device = {"name": "local:test", "arch": "x86_64", "transport": "local", "emulated": False, "pinned_cpu": None,
              "source": "fallback", "note": "test run", "devices": [], "unreachable": []}
    _finish(store, run_id, loaded, "digits", device, [CandidateRecord.from_json(record)], out, "finished", None)
    return run_id


@dataclass
class Fleet:
    """Real sshd devices on loopback, each with its own folder as its disk, registered in one profile."""

    profile: Path
    servers: dict[str, Sshd] = field(default_factory=dict)

    def disk(self, name: str) -> Path:
        """The device's remote folder (its agent, its deploy/ folder)."""
        return self.servers[name].folder / "disk"

    def current(self, name: str) -> str | None:
        """The version `current` points to on the device, read from its disk."""
        link = self.disk(name) / "deploy" / "current"
        return Path(link.readlink()).name if link.is_symlink() else None

    def stop(self) -> None:
        """Stop every sshd."""
        for server in self.servers.values():
            server.stop()


def start_fleet(folder: Path, profile: Path, count: int, prefix: str = "dev", canary_tag: bool = False,
                server_factory=Sshd) -> Fleet:
    """Start `count` sshd on 127.0.0.1 and register each as a device of `profile` (host key pinned by fingerprint)."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.fleet.registration import Registration, register_device

    fleet = Fleet(profile)
    try:
        for i in range(count):
            fleet.servers[f"{prefix}-{i}"] = server_factory(folder / f"{prefix}-{i}").start()

        def register(item: tuple[int, str]) -> None:
            i, name = item
            server = fleet.servers[name]
            register_device(Registration(
                name=name, host=getattr(server, "address", "127.0.0.1"), port=server.port, user=server.user,
                key_path=str(server.client_key), profile_path=str(profile), python=sys.executable,
                remote_dir=str(server.folder / "disk"), host_key_fingerprint=server.host_key_fingerprint,
                tags=["canary"] if canary_tag and i == count - 1 else [], connect_timeout_s=5.0), lambda q: True)

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(register, enumerate(fleet.servers)))
    except BaseException:
        fleet.stop()
        raise
    return fleet


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
    from tests.helpers.sshd import sshd_missing_reason

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
