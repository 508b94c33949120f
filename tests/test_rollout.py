"""The rollout with real parts: several real sshd "devices" on loopback (each with its own folder as its disk),
real paramiko, the real agent zipapp, real onnxruntime on both sides, real runs recorded as `orchestrate` does.

Faults have real causes (a model whose outputs do not reproduce, a stopped sshd, sshd and the agent
killed mid-install, a link unplugged in a network namespace, a new host key), except two that a
fake injects because they cannot be timed or caused for real: the corrupt upload (a byte flipped
after the transfer) and the power cut at each exact step of an install (tests/helpers/crash_agent.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnxruntime as ort
import psutil
import pytest

from agents.cli import main as agent_main
from orchestrator.cli.main import main
from orchestrator.devices.registry import DeviceRegistry
from orchestrator.errors import RolloutFailed, RolloutIncomplete
from orchestrator.modelfacts import model_precision
from orchestrator.rollout.deployments import DeploymentStore
from orchestrator.rollout.execute import deploy
from orchestrator.rollout.healthcheck import TOLERANCES, health_spec, reference_data
from orchestrator.rollout.plan import RolloutOptions, canary_count, chosen_models
from orchestrator.rollout.target import DeployTarget
from tests.helpers.rollout import Fleet, cnn_model, make_run, start_fleet
from tests.helpers.sshd import sshd_missing_reason

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "rollout-test"
FAST = {"health_runs": 20, "health_time_budget_s": 0.5}


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    """The x86-host profile under a name of this module's own (its devices and runs are this module's)."""
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
    if sshd_missing_reason():
        pytest.skip(sshd_missing_reason())
    made: list[Fleet] = []

    def make(count: int, **kwargs) -> Fleet:
        made.append(start_fleet(tmp_path, profile, count, **kwargs))
        return made[-1]

    yield make
    for f in made:
        f.stop()


def _sha(run_id: str) -> str:
    return chosen_models(run_id)[0].sha256


def _deploy(run_id: str, events: list | None = None, **options) -> object:
    chosen = chosen_models(run_id)[0]
    record = (lambda kind, data: events.append((kind, data))) if events is not None else (lambda kind, data: None)
    return deploy(chosen, RolloutOptions(**{**FAST, **options}), record)


def _working_current(disk: Path) -> str:
    """The version `current` names on a device's disk, after checking it is a complete, loadable model."""
    link = disk / "deploy" / "current"
    version = Path(link.readlink()).name
    model = link / "model.onnx"
    manifest = json.loads((link / "manifest.json").read_text())
    assert hashlib.sha256(model.read_bytes()).hexdigest() == manifest["sha256"] == version
    ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return version


# ------------------------------------------------------------------------------ host side, no device


def test_chosen_model_is_read_as_run_py_wrote_it(runs):
    from orchestrator.paths import store_path
    from orchestrator.store import RunStore

    chosen = chosen_models(runs["a"][:-2])[0]  # a unique prefix of the id is enough
    run = RunStore(store_path()).get_run(runs["a"])
    results = json.loads((Path(run["out_dir"]) / "results.json").read_text())
    assert results["best"]["model_sha256"] == chosen.sha256 and run["best_id"] == chosen.candidate
    assert (Path(run["out_dir"]) / "best.onnx").read_bytes() == chosen.path.read_bytes()
    assert chosen.profile == PROFILE and chosen.candidate == "c000" and chosen.label == "baseline"
    assert hashlib.sha256(chosen.path.read_bytes()).hexdigest() == chosen.sha256
    assert chosen.sha256 == hashlib.sha256(cnn_model(0)).hexdigest()
    assert chosen.precision == "fp32" and chosen.constraints["max_latency_ms"] == 20


def test_canary_counts_and_precisions():
    assert [canary_count(s, 10) for s in ("1", "0", "3", "10%", "25%", "100%", "50")] == [1, 0, 3, 1, 3, 10, 10]
    assert canary_count("1%", 3) == 1  # a share rounds up to at least one device
    from orchestrator.errors import DeployError

    for bad in ("x", "-1", "0%", "150%"):
        with pytest.raises(DeployError):
            canary_count(bad, 10)
    assert model_precision(cnn_model(0)) == "fp32"
    assert TOLERANCES["int8"][0] > TOLERANCES["fp16"][0] > TOLERANCES["fp32"][0]  # int8 is looser than fp32


# ------------------------------------------------------------------------------------- the agent, in-process


@pytest.mark.parametrize("module", ["deploy.py", "health.py", "versions.py"])
def test_agent_rollout_modules_import_only_what_a_device_has_and_parse_as_python39(module):
    import ast

    tree = ast.parse((ROOT / "agents" / module).read_text(), feature_version=(3, 9))
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "__future__", "agents"}
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= allowed - {"subprocess", "multiprocessing"}, imported


def _stage(root: Path, model: bytes, tag: str = "x") -> list[str]:
    """What the host uploads, put straight into the device's incoming folder; returns install's arguments."""
    incoming = root / "deploy" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    reference = reference_data(model)
    (incoming / f"m.part-{tag}").write_bytes(model)
    (incoming / f"r.part-{tag}").write_bytes(reference)
    spec = health_spec(model_precision(model), {"latency_percentile": "p90", "max_latency_ms": 20}, {}, 1, 20, 0.5)
    return ["install", "--root", str(root), "--model", str(incoming / f"m.part-{tag}"),
            "--sha256", hashlib.sha256(model).hexdigest(), "--reference", str(incoming / f"r.part-{tag}"),
            "--reference-sha256", hashlib.sha256(reference).hexdigest(),
            "--meta", json.dumps({"run_id": "r", "candidate": "c000", "label": "baseline", "health": spec})]


def _agent(capsys, *argv: str) -> tuple[int, dict]:
    code = agent_main(list(argv))
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_agent_install_health_rollback_keep_and_refusals(tmp_path, capsys):
    root = tmp_path / "device"
    models = [cnn_model(seed) for seed in (10, 11, 12)]
    shas = [hashlib.sha256(m).hexdigest() for m in models]
    for i, model in enumerate(models):
        code, out = _agent(capsys, *_stage(root, model, str(i)), "--keep", "2")
        assert code == 0 and out["version"] == shas[i] and out["previous"] == (shas[i - 1] if i else None)
        code, health = _agent(capsys, "health", "--root", str(root))
        assert code == 0 and health["healthy"], health
        assert health["outputs"]["max_abs_err"] <= 1e-5 and health["latency"]["ok"]
    # the last 2 versions are kept, the oldest removed; nothing temporary is left
    assert sorted(p.name for p in (root / "deploy" / "versions").iterdir()) == sorted(shas[1:])
    assert list((root / "deploy" / "incoming").iterdir()) == []
    code, status = _agent(capsys, "status", "--root", str(root))
    assert status["current"]["version"] == shas[2] and status["previous"] == shas[1]

    # a corrupt upload is refused: the upload is removed, current is untouched
    args = _stage(root, cnn_model(13), "c")
    raw = bytearray(Path(args[4]).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    Path(args[4]).write_bytes(bytes(raw))
    code, out = _agent(capsys, *args)
    assert code == 3 and out["error"].startswith("corrupt upload refused: the model has sha256")
    assert not Path(args[4]).exists() and _working_current(root) == shas[2]

    # rollback goes back along the activations; --from makes it a no-op unless current is that version
    code, out = _agent(capsys, "rollback", "--root", str(root), "--from", shas[1])
    assert code == 0 and out["rolled_back"] is False and _working_current(root) == shas[2]
    code, out = _agent(capsys, "rollback", "--root", str(root))
    assert code == 0 and (out["from"], out["to"]) == (shas[2], shas[1]) and _working_current(root) == shas[1]
    code, out = _agent(capsys, "rollback", "--root", str(root))  # the oldest was pruned: nothing further back
    assert code == 4 and out["error"] == "no previous version to roll back to"
    code, out = _agent(capsys, "rollback", "--root", str(root), "--to", "../../etc")
    assert code == 2 and "not a version name" in out["error"]
    code, out = _agent(capsys, "install", "--root", str(root), "--model", "/etc/passwd", "--sha256", shas[0],
                       "--reference", "/etc/passwd", "--reference-sha256", shas[0])
    assert code == 2 and "is not a file in" in out["error"]  # uploads are only taken from deploy/incoming


def _integer_inputs_model() -> bytes:
    """q int8, u uint8, ids int32 and flag bool inputs [N,2] -> y float [N,2] (q + u + ids, zero where not flag)."""
    from onnx import TensorProto, helper

    names = (("q", TensorProto.INT8), ("u", TensorProto.UINT8), ("ids", TensorProto.INT32), ("flag", TensorProto.BOOL))
    nodes = [helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT) for name, _ in names]
    nodes += [helper.make_node("Add", ["q_f", "u_f"], ["qu"]), helper.make_node("Add", ["qu", "ids_f"], ["s"]),
              helper.make_node("Mul", ["s", "flag_f"], ["y"])]
    graph = helper.make_graph(nodes, "integer_inputs",
                              [helper.make_tensor_value_info(name, kind, ["N", 2]) for name, kind in names],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_reference_inputs_are_the_agents_own_and_its_health_check_passes_on_them(tmp_path, capsys):
    """The host makes the health check's inputs with the agent kernel's rule (int8 data spans its range)."""
    import io

    import numpy as np

    from agents.kernel import reference_inputs

    model = _integer_inputs_model()
    with np.load(io.BytesIO(reference_data(model))) as saved:
        stored = {k.removeprefix("inputs/"): saved[k] for k in saved.files if k.startswith("inputs/")}
    expected = reference_inputs(ort.InferenceSession(model, providers=["CPUExecutionProvider"]))
    assert stored.keys() == expected.keys() == {"q", "u", "ids", "flag"}
    for name, array in expected.items():
        assert stored[name].dtype == array.dtype and stored[name].shape == (4, 2)
        np.testing.assert_array_equal(stored[name], array)
    root = tmp_path / "device"
    assert _agent(capsys, *_stage(root, model))[0] == 0
    code, health = _agent(capsys, "health", "--root", str(root))
    assert code == 0 and health["healthy"], health


def test_agent_health_fails_on_latency_over_the_profile_limit(tmp_path, capsys):
    root = tmp_path / "device"
    args = _stage(root, cnn_model(0))
    meta = json.loads(args[-1])
    meta["health"]["max_latency_ms"] = 1e-6  # no model runs in a nanosecond
    args[-1] = json.dumps(meta)
    assert _agent(capsys, *args)[0] == 0
    code, health = _agent(capsys, "health", "--root", str(root))
    assert code == 0 and health["healthy"] is False and health["outputs"]["ok"] is True
    assert health["reasons"][0].startswith("latency p90 ") and "over the profile's 1e-06 ms" in health["reasons"][0]
    # the service mode checks current once and writes the result where the device's tools can read it
    code, out = _agent(capsys, "watch", "--root", str(root), "--count", "1", "--interval", "1")
    assert code == 0 and out["checks"] == 1
    assert json.loads((root / "deploy" / "health.json").read_text())["healthy"] is False


def _install_template(tmp_path: Path, capsys) -> tuple[Path, list[str], str, str]:
    """A device folder on version A with version B uploaded to incoming (kept aside to copy for each try)."""
    template = tmp_path / "template"
    a, b = cnn_model(20), cnn_model(21)
    assert _agent(capsys, *_stage(template, a, "a"))[0] == 0
    args = _stage(template, b, "b")
    return template, args, hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()


def test_power_cut_at_every_step_of_an_install_or_rollback_leaves_a_working_current(tmp_path, capsys):
    """FAKE fault, real kill: tests/helpers/crash_agent.py SIGKILLs the agent before its k-th file-system change."""
    template, install_args, a, b = _install_template(tmp_path, capsys)
    for command, args, before, after in (("install", install_args, a, b), ("rollback", None, b, a)):
        if command == "rollback":  # from B (installed over A) back to A
            assert _agent(capsys, *install_args)[0] == 0
            shutil.rmtree(template / "deploy" / "incoming")
            args = ["rollback", "--root", str(template)]
        outcomes = set()
        for k in range(1, 60):
            device = tmp_path / f"{command}-{k}"
            shutil.copytree(template, device, symlinks=True)
            argv = [a.replace(str(template), str(device)) for a in args]
            proc = subprocess.run([sys.executable, "-m", "tests.helpers.crash_agent", str(k), *argv], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            version = _working_current(device)  # complete and loadable, whatever the point of the cut
            assert version in (before, after), (command, k)
            outcomes.add(version)
            code, status = _agent(capsys, "status", "--root", str(device))
            assert code == 0 and status["current"]["version"] == version
            if proc.returncode == 0:  # the command finished before its k-th change: every point was tried
                assert version == after and k > 3
                break
            assert proc.returncode == -9, proc.stderr[-2000:]
            # the host's next attempt (a fresh upload for an install) finishes the job and clears the leftovers
            if command == "install":
                shutil.rmtree(device / "deploy" / "incoming")
                shutil.copytree(template / "deploy" / "incoming", device / "deploy" / "incoming")
                assert _agent(capsys, *argv)[0] == 0 and _working_current(device) == after
                left = [p.name for p in (device / "deploy").rglob("*") if ".tmp-" in p.name]
                assert left == [] and list((device / "deploy" / "incoming").iterdir()) == []
            shutil.rmtree(device)
        else:
            pytest.fail(f"{command} was still changing files after 60 steps")
        assert outcomes == {before, after}  # some cuts landed before the switch, some after


# ------------------------------------------------------------------------------------- rollouts over SSH


def test_full_rollout_canary_then_waves_and_devices_list(fleet, runs, capsys):
    f = fleet(4, canary_tag=True)  # dev-3 is tagged canary: it goes first
    assert main(["deploy", runs["a"], "--dry-run", "--max-parallel", "2"]) == 0
    plan = capsys.readouterr().out
    assert "plan (dry run, nothing is installed)" in plan and "wave 1 (canary):\n  dev-3: no model deployed" in plan
    assert "wave 2:\n  dev-0: no model deployed\n  dev-1: no model deployed\nwave 3:\n  dev-2" in plan
    assert all(f.current(n) is None for n in f.servers)  # a dry run installs nothing

    assert main(["deploy", runs["a"], "--max-parallel", "2"]) == 0
    out = capsys.readouterr().out
    assert "wave 1 (canary): dev-3\n" in out and "wave 2: dev-0, dev-1\n" in out and "wave 3: dev-2\n" in out
    assert out.count("installed, healthy: outputs within tolerance (fp32") == 4
    a = _sha(runs["a"])
    for name in f.servers:
        assert _working_current(f.disk(name)) == a
        assert (f.disk(name) / "agent.pyz").resolve().name.startswith("agent-")  # for the systemd unit
    assert main(["deploy", runs["b"], "--max-parallel", "4", "--canary", "50%"]) == 0
    out = capsys.readouterr().out
    assert "wave 1 (canary): dev-3, dev-0\n" in out and f"installed (was {a[:12]})" in out
    b = _sha(runs["b"])
    assert all(_working_current(f.disk(n)) == b for n in f.servers)
    assert sorted(p.name for p in (f.disk("dev-1") / "deploy" / "versions").iterdir()) == sorted([a, b])  # A kept

    assert main(["devices", "list", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    for name in f.servers:
        d = listed[name]
        assert d["deployed_model"] == b and d["deployment"]["version"] == b
        assert d["deployment"]["run_id"] == runs["b"] and d["deployment"]["health"]["healthy"] is True
    assert main(["devices", "list"]) == 0
    table = capsys.readouterr().out
    assert b[:12] in table and "ok " in table and "baseline" in table
    rollout = DeploymentStore().latest()
    assert rollout["status"] == "done" and {d["state"] for d in rollout["devices"].values()} == {"healthy"}


def test_failing_canary_stops_and_every_device_stays_on_its_previous_version(fleet, runs, capsys):
    """The bad run's model has a Dropout left in training mode: its outputs are random on every inference, so
    the device's outputs disagree with the host's reference outputs far beyond the fp32 tolerance."""
    f = fleet(3)
    a = _sha(runs["a"])
    assert main(["deploy", runs["a"], "--canary", "2", "--max-parallel", "3"]) == 0
    capsys.readouterr()
    code = main(["deploy", runs["bad"], "--canary", "2", "--max-parallel", "3"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "ROLLED BACK: health check failed: outputs differ from the reference" in out
    assert err.startswith("error: rollout ") and " stopped: canary " in err and "every canary was rolled back" in err
    assert "\n" not in err.strip()
    for name in f.servers:  # canaries rolled back, the third never touched
        assert _working_current(f.disk(name)) == a
    rollout = DeploymentStore().latest()
    assert rollout["status"] == "stopped"
    states = {n: d["state"] for n, d in rollout["devices"].items()}
    assert states == {"dev-0": "rolled-back", "dev-1": "rolled-back", "dev-2": "skipped"}
    failed = rollout["devices"]["dev-0"]["health"]
    assert failed["healthy"] is False and failed["outputs"]["mismatched"] > 0
    deployed = DeploymentStore().deployments()
    assert deployed["dev-0"]["version"] == a and deployed["dev-0"]["health"]["healthy"] is False
    assert DeviceRegistry().get("dev-0").deployed_model == a


class _CorruptingTarget(DeployTarget):
    """FAKE fault: after each real model upload, flip one byte of the file on the "device's" disk (possible
    because the device is this machine), before the agent checks its sha256."""

    def _upload(self, sftp, data, path):
        super()._upload(sftp, data, path)
        if "/deploy/incoming/" in path and ".onnx.part-" in path:
            raw = bytearray(Path(path).read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            Path(path).write_bytes(bytes(raw))


def test_corrupt_upload_is_refused_and_the_failure_policy_decides(fleet, runs):
    f = fleet(3)
    a, b = _sha(runs["a"]), _sha(runs["b"])
    _deploy(runs["a"], max_parallel=3)
    chosen = chosen_models(runs["b"])[0]

    def corrupt_dev1(device, *args):
        return (_CorruptingTarget if device.name == "dev-1" else DeployTarget)(device, *args)

    with pytest.raises(RolloutFailed, match=r"stopped: wave 2: dev-1 failed \(dev-1: device 'dev-1': corrupt upload "
                                            r"refused: the model has sha256"):
        deploy(chosen, RolloutOptions(**FAST), target_factory=corrupt_dev1)
    assert [f.current(n) for n in ("dev-0", "dev-1", "dev-2")] == [b, a, a]  # dev-2's wave never started
    assert list((f.disk("dev-1") / "deploy" / "incoming").iterdir()) == []  # the refused upload is gone

    with pytest.raises(RolloutFailed, match=r"done-with-failures: dev-1 failed"):
        deploy(chosen, RolloutOptions(**FAST, on_failure="continue"), target_factory=corrupt_dev1)
    assert [f.current(n) for n in ("dev-0", "dev-1", "dev-2")] == [b, a, b]


def _agent_processes(disk: Path, command: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if command in cmd and any(str(disk) in part for part in cmd):
            found.append(proc)
    return found


def test_device_killed_mid_install_keeps_a_working_current_and_resume_finishes(fleet, runs, capsys):
    f = fleet(2)
    a, b = _sha(runs["a"]), _sha(runs["b"])
    _deploy(runs["a"], max_parallel=2)
    victim = f.servers["dev-1"]

    def kill_during_install() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _agent_processes(f.disk("dev-1"), "install"):
            time.sleep(0.01)
        victim.stop()  # the device dies: sshd, its sessions and the agent mid-install, all SIGKILLed

    killer = threading.Thread(target=kill_during_install)
    killer.start()
    with pytest.raises(RolloutIncomplete, match=r"incomplete: dev-1 offline \(dev-1: device 'dev-1': connection "
                                                r"lost .*then unreachable"):
        _deploy(runs["b"], canary="1")
    killer.join()
    assert _working_current(f.disk("dev-0")) == b
    assert _working_current(f.disk("dev-1")) == a  # the old version, complete and loadable
    assert DeviceRegistry().get("dev-1").status == "offline"

    victim.start()  # the device is back
    assert main(["deploy", "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resuming ") and "wave 2: dev-1\n" in out and "dev-0" not in out.split("\n", 2)[2]
    assert _working_current(f.disk("dev-1")) == b
    assert not [p for p in (f.disk("dev-1") / "deploy").rglob("*") if ".tmp-" in p.name]


def test_offline_device_is_left_for_resume_then_rollback(fleet, runs, capsys):
    f = fleet(3)
    a, b = _sha(runs["a"]), _sha(runs["b"])
    _deploy(runs["a"], max_parallel=3)
    f.servers["dev-2"].stop()  # switched off: a real offline device
    code = main(["deploy", runs["b"], "--max-parallel", "2"])
    out, err = capsys.readouterr()
    assert code == 4
    assert "dev-2: offline, left for --resume: device 'dev-2': cannot connect" in out
    assert "incomplete: dev-2 offline" in err and "orchestrate deploy --resume" in err
    assert [f.current(n) for n in ("dev-0", "dev-1", "dev-2")] == [b, b, a]
    assert main(["deploy", "--resume", "--canary", "2"]) == 2  # the rollout goes on with its own options
    assert "--canary cannot be used with --resume" in capsys.readouterr().err

    f.servers["dev-2"].start()
    rollout_id = DeploymentStore().latest()["id"]
    assert main(["deploy", "--resume", runs["b"]]) == 0  # by run id
    assert f"done: rollout {rollout_id}" in capsys.readouterr().out
    assert f.current("dev-2") == b
    assert main(["deploy", "--resume"]) == 1
    assert "no rollout to resume" in capsys.readouterr().err

    assert main(["rollback", "--device", "dev-1"]) == 0
    assert f"dev-1: {b[:12]} -> {a[:12]}" in capsys.readouterr().out
    assert [_working_current(f.disk(n)) for n in ("dev-0", "dev-1", "dev-2")] == [b, a, b]
    assert main(["rollback", "--profile", PROFILE]) == 1  # dev-1 has nothing before A
    out, err = capsys.readouterr()
    assert "dev-1: NOT rolled back: device 'dev-1': no previous version to roll back to" in out
    assert "1 of 3 device(s) not rolled back" in err
    assert [f.current(n) for n in ("dev-0", "dev-1", "dev-2")] == [a, a, a]
    assert DeploymentStore().deployments()["dev-0"]["version"] == a


def test_bad_input_is_one_line_and_an_exit_code(fleet, runs, capsys, own_sshd, tmp_path):
    assert main(["deploy", "no-such-run"]) == 2
    assert capsys.readouterr().err.startswith("error: no run with id 'no-such-run'")
    assert main(["deploy", runs["none"]]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: run {runs['none']} has no chosen model to deploy (status no_feasible")
    assert main(["deploy", runs["a"]]) == 4  # nothing registered in the profile
    assert f"profile '{PROFILE}' has no registered device to deploy to" in capsys.readouterr().err
    assert main(["deploy", runs["a"], "--profile", "rpi4"]) == 1
    assert "chose a model for profile 'rollout-test', not 'rpi4'" in capsys.readouterr().err
    assert main(["deploy", runs["a"], "--canary", "lots"]) == 2  # a usage error, found before anything is looked at
    assert "'lots': give a number" in capsys.readouterr().err
    assert main(["deploy", "--resume", "--dry-run"]) == 2
    assert "--dry-run cannot be used with --resume" in capsys.readouterr().err
    assert main(["rollback"]) == 2 and "give --profile NAME or --device NAME" in capsys.readouterr().err

    # model files that no longer match the run's sha256 are refused before anything is sent
    from orchestrator.paths import store_path
    from orchestrator.store import RunStore

    chosen = chosen_models(runs["a"])[0]
    copies = [chosen.path, Path(RunStore(store_path()).get_run(runs["a"])["out_dir"]) / "best.onnx"]
    saved = chosen.path.read_bytes()
    try:
        copies[0].write_bytes(saved + b"\0")
        assert chosen_models(runs["a"])[0].path == copies[1]  # the run's own best.onnx still matches: used
        copies[1].write_bytes(saved + b"\0")
        assert main(["deploy", runs["a"]]) == 1
        assert "no longer matches its sha256" in capsys.readouterr().err
    finally:
        for path in copies:
            path.write_bytes(saved)

    # a device whose host key changed is refused, named, and nothing is installed on it
    f = fleet(1)
    f.servers["dev-0"].restart(new_host_key=True)
    assert main(["deploy", runs["a"]]) == 1
    out, err = capsys.readouterr()
    assert "dev-0: FAILED: device 'dev-0': host key of 127.0.0.1:" in out and "has changed" in err
    assert len(err.strip().splitlines()) == 1
    assert DeviceRegistry().get("dev-0").status == "host-key-changed" and f.current("dev-0") is None


# ------------------------------------------------------------------------------------- one rollout at a time


def _deploy_process(*args: str) -> subprocess.Popen:
    """`orchestrate deploy ARGS` as a process of its own (the host that gets killed)."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "deploy", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the deploy process ended ({proc.returncode}) before {what}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def _new_rollout_of(run_id: str, before: dict | None) -> dict | None:
    """The newest rollout, if it is of `run_id` and newer than `before` (the newest when the deploy started)."""
    latest = DeploymentStore().latest()
    fresh = latest and (before is None or latest["id"] != before["id"]) and latest["run_id"] == run_id
    return latest if fresh else None


def test_a_newer_rollout_supersedes_an_unfinished_one_and_resume_does_not_go_back(fleet, runs, capsys):
    """Issue 16, item 1: roll out A, kill -9 the deploy after its first wave, roll out B fully, then
    `deploy --resume` must not put A back over B."""
    f = fleet(2)
    a, b = _sha(runs["a"]), _sha(runs["b"])
    before = DeploymentStore().latest()
    host = _deploy_process(runs["a"], "--canary", "1")
    try:
        x = _wait(lambda: _new_rollout_of(runs["a"], before), 60, "rollout A to start", host)
        canary = x["waves"][0][0]
        _wait(lambda: DeploymentStore().get_rollout(x["id"])["devices"][canary]["state"] == "healthy", 120,
              "the canary wave to end", host)
    finally:
        host.kill()  # SIGKILL: the rollout stays `running` with a dead owner
        host.communicate()
    _wait(lambda: not any(_agent_processes(f.disk(n), "install") for n in f.servers), 60, "the devices to settle")
    assert DeploymentStore().get_rollout(x["id"])["status"] == "running"

    assert main(["deploy", runs["b"], "--max-parallel", "2"]) == 0
    capsys.readouterr()
    y = DeploymentStore().latest()
    assert all(_working_current(f.disk(n)) == b for n in f.servers)
    old = DeploymentStore().get_rollout(x["id"])
    assert old["status"] == "superseded" and old["superseded_by"] == y["id"]

    assert main(["deploy", "--resume"]) == 1  # the newest resumable: none (B is done, A superseded)
    assert f"no rollout to resume (the newest, {y['id']}, is done)" in capsys.readouterr().err
    assert main(["deploy", "--resume", x["id"]]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: rollout {x['id']} was superseded by rollout {y['id']}: resuming it would put its older "
                   f"model back; deploy --resume {x['id']} --force does it anyway")
    assert all(_working_current(f.disk(n)) == b for n in f.servers)  # nothing went back
    assert main(["deploy", runs["a"], "--force"]) == 2
    assert "--force goes with --resume only" in capsys.readouterr().err

    assert main(["deploy", "--resume", x["id"], "--force"]) == 0  # asked for explicitly: A goes on
    left = [n for n, d in old["devices"].items() if d["state"] != "healthy"]
    assert left and all(_working_current(f.disk(n)) == a for n in left)


def test_a_live_rollout_is_locked_and_a_host_killed_mid_install_is_recorded_right(fleet, runs, capsys):
    """Items 1 and 3: while a deploy runs, `deploy --resume` and another rollout of the profile are refused;
    the host is then killed mid-install, the device's install goes on, and the resumed rollout records what the
    device ran before (A), not the version the device switched to meanwhile (B)."""
    f = fleet(2)
    a, b = _sha(runs["a"]), _sha(runs["b"])
    _deploy(runs["a"], max_parallel=2)
    before = DeploymentStore().latest()
    host = _deploy_process(runs["b"], "--canary", "1")
    try:
        y = _wait(lambda: _new_rollout_of(runs["b"], before), 60, "rollout B to start", host)
        canary = y["waves"][0][0]
        _wait(lambda: _agent_processes(f.disk(canary), "install"), 60, "the canary's install", host)
        assert main(["deploy", "--resume"]) == 1
        err = capsys.readouterr().err
        assert f"error: rollout {y['id']} is still running (pid {host.pid} on " in err and "not resumed" in err
        assert main(["deploy", runs["a"]]) == 1
        assert f"rollout {y['id']} is still running (pid {host.pid}" in capsys.readouterr().err
    finally:
        host.kill()  # mid-install: the device's own `install --health` goes on without it
        host.communicate()
    _wait(lambda: f.current(canary) == b and not _agent_processes(f.disk(canary), "install"), 60,
          "the device's install to finish")
    stored = DeploymentStore().get_rollout(y["id"])
    assert stored["devices"][canary]["state"] == "installing" and stored["devices"][canary]["previous_version"] is None

    assert main(["deploy", "--resume"]) == 0  # its owner is dead: resumed at once
    out = capsys.readouterr().out
    assert f"{canary}: installed (was {a[:12]})" in out
    done = DeploymentStore().get_rollout(y["id"])
    assert done["status"] == "done" and done["owner_pid"] != host.pid
    assert {n: d["previous_version"] for n, d in done["devices"].items()} == {n: a for n in f.servers}
    assert all(_working_current(f.disk(n)) == b for n in f.servers)


# ------------------------------------------------------------------------------------- network namespaces


def test_device_cut_off_mid_rollout_in_its_own_network_namespace(tmp_path, profile, runs):
    from tests.helpers.netns import NetnsLink, NetnsSshd, netns_missing_reason

    why = netns_missing_reason()
    if why:
        pytest.skip(f"no network namespaces here: {why}")
    links = [NetnsLink(i).up() for i in range(3)]
    servers = iter(links)
    f = None
    try:
        f = start_fleet(tmp_path, profile, 3, prefix="ns",
                        server_factory=lambda folder: NetnsSshd(folder, next(servers)))
        a, b = _sha(runs["a"]), _sha(runs["b"])
        _deploy(runs["a"], max_parallel=3)
        link = links[1]

        def unplug(kind, data):
            if kind == "uploading" and data["name"] == "ns-1":
                link.cut()  # mid-rollout, with the device's SSH connection open

        started = time.monotonic()
        with pytest.raises(RolloutIncomplete, match=r"ns-1 offline \(ns-1: device 'ns-1': .*then unreachable"):
            chosen = chosen_models(runs["b"])[0]
            deploy(chosen, RolloutOptions(**FAST, max_parallel=2, command_timeout_s=4, connect_timeout_s=3), unplug)
        assert time.monotonic() - started < 40  # bounded by the command timeout, not TCP's minutes
        assert [f.current(n) for n in ("ns-0", "ns-1", "ns-2")] == [b, a, b]
        assert _working_current(f.disk("ns-1")) == a

        link.restore()
        result = deploy(chosen_models(runs["b"])[0], RolloutOptions(**FAST), resume=DeploymentStore().latest())
        assert result.status == "done" and f.current("ns-1") == b
    finally:
        if f is not None:
            f.stop()
        for link in links:
            link.down()


def test_systemd_unit_runs_the_agent_watch_from_the_stable_name(tmp_path):
    unit = ROOT / "deploy" / "systemd" / "edge-agent.service"
    exec_start = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    assert "/.edge-orchestrator/agent.pyz watch --root " in exec_start
    script = ROOT / "deploy" / "systemd" / "install-agent-service.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed: the unit file was not verified")
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    check = subprocess.run(["systemd-analyze", "verify", "--user", str(unit)], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)})
    assert check.returncode == 0 and not check.stderr.strip(), check.stderr
