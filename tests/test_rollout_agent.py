"""The rollout's device side in-process: the agent's install, health check, rollback and keep, with real
onnxruntime on a real folder as the device's disk; a power cut at each exact step of an install is
injected by a fake (tests/helpers/crash_agent.py), since it cannot be timed for real.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from agents.cli import main as agent_main
from orchestrator.models.modelfacts import model_precision
from orchestrator.rollout.healthcheck import health_spec, reference_data
from tests.helpers.rollout import ROOT, cnn_model, working_current

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
    assert not Path(args[4]).exists() and working_current(root) == shas[2]

    # rollback goes back along the activations; --from makes it a no-op unless current is that version
    code, out = _agent(capsys, "rollback", "--root", str(root), "--from", shas[1])
    assert code == 0 and out["rolled_back"] is False and working_current(root) == shas[2]
    code, out = _agent(capsys, "rollback", "--root", str(root))
    assert code == 0 and (out["from"], out["to"]) == (shas[2], shas[1]) and working_current(root) == shas[1]
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


def test_the_health_check_feeds_the_runs_held_out_samples(tmp_path, capsys):
    """With the run's samples.npz, the reference inputs are those real rows (repeated to the batch), not random."""
    import io

    import numpy as np

    from orchestrator.rollout.healthcheck import read_samples

    model = _integer_inputs_model()
    rows = {"q": np.array([[-3, 4], [7, -8]], np.int8), "u": np.array([[1, 2], [3, 250]], np.uint8),
            "ids": np.array([[11, 12], [13, 14]], np.int32), "flag": np.array([[True, False], [True, True]])}
    np.savez(tmp_path / "samples.npz", **rows)
    with np.load(io.BytesIO(reference_data(model, sample=read_samples(tmp_path / "samples.npz")))) as saved:
        stored = {k: saved[k] for k in saved.files}
    for name, array in rows.items():
        np.testing.assert_array_equal(stored[f"inputs/{name}"], np.concatenate([array, array]))  # 4 rows
    np.testing.assert_array_equal(stored["outputs/y"][:2], np.array([[9, 0], [23, 256]], np.float32))
    assert read_samples(tmp_path / "missing.npz") is None
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert read_samples(tmp_path / "broken.npz") is None
    # a sample of another model's inputs: the fixed random inputs instead
    with np.load(io.BytesIO(reference_data(model, sample={"x": np.zeros((2, 2), np.float32)}))) as saved:
        assert saved["inputs/q"].shape == (4, 2)
    root = tmp_path / "device"
    assert _agent(capsys, *_stage(root, model))[0] == 0


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
            version = working_current(device)  # complete and loadable, whatever the point of the cut
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
                assert _agent(capsys, *argv)[0] == 0 and working_current(device) == after
                left = [p.name for p in (device / "deploy").rglob("*") if ".tmp-" in p.name]
                assert left == [] and list((device / "deploy" / "incoming").iterdir()) == []
            shutil.rmtree(device)
        else:
            pytest.fail(f"{command} was still changing files after 60 steps")
        assert outcomes == {before, after}  # some cuts landed before the switch, some after


