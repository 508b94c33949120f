"""Tests of the on-device agent (agents/: cli, benchmark, info, kernel) with real onnxruntime and tiny ONNX models."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from agents.info import parse_cpuinfo, read_thermal
from agents.kernel import ExitCode, latency_stats, make_inputs, reference_inputs
from agents.sensors import RaplSensor, SensorError
from tests.helpers.agent import run_main, save_model, tiny_cnn

REPO = Path(__file__).resolve().parents[1]
AGENT_SOURCES = sorted((REPO / "agents").rglob("*.py"))






def int_inputs_model(path: Path) -> Path:
    """ids int64 [N,3] and pixels uint8 [N,3] -> y = float(ids) + float(pixels)."""
    nodes = [
        helper.make_node("Cast", ["ids"], ["a"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["pixels"], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "int_inputs",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
         helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    return save_model(graph, path)


@pytest.fixture
def model(tmp_path) -> Path:
    return tiny_cnn(tmp_path / "tiny.onnx")


@pytest.fixture
def no_sensors(tmp_path, monkeypatch):
    """Point the agent's sysfs root at an empty directory: no RAPL, no thermal zones."""
    root = tmp_path / "empty_sysroot"
    root.mkdir()
    monkeypatch.setenv("EDGE_AGENT_SYSFS_ROOT", str(root))
    return root




def test_bench_reports_latency_memory_and_provenance(capsys, model):
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--runs", "30", "--warmup", "3")
    assert code == ExitCode.OK
    assert out["schema_version"] == 1 and out["command"] == "bench"
    lat = out["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert 5 <= out["runs"] <= 30 and out["warmup_runs"] == 3
    assert out["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert out["model"]["size_bytes"] == model.stat().st_size
    assert out["execution_provider"] == "CPUExecutionProvider"
    assert out["peak_memory_mb"] > 0 and out["model_memory_mb"] >= 0
    assert out["threads"] == {"intra_op": 1, "inter_op": 1}
    assert out["inputs"] == [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert out["noisy"] == (lat["cv"] > 0.05)
    assert out["energy"]["source"] in ("measured:rapl", "unavailable")
    assert isinstance(out["warnings"], list)


def test_bench_batch_symbolic_and_fixed(capsys, tmp_path):
    dynamic = tiny_cnn(tmp_path / "dyn.onnx")
    fixed = tiny_cnn(tmp_path / "fixed.onnx", batch=2)
    code, out, _ = run_main(capsys, "bench", "--model", str(dynamic), "--runs", "5", "--warmup", "0", "--batch", "3")
    assert code == 0 and out["inputs"][0]["shape"] == [3, 1, 8, 8] and out["warmup_runs"] == 0
    code, out, _ = run_main(capsys, "bench", "--model", str(fixed), "--runs", "5", "--warmup", "1", "--batch", "3")
    assert code == 0 and out["inputs"][0]["shape"] == [2, 1, 8, 8]
    assert any("fixed batch" in w for w in out["warnings"])


def test_bench_integer_inputs(capsys, tmp_path):
    path = int_inputs_model(tmp_path / "ints.onnx")
    code, out, _ = run_main(capsys, "bench", "--model", str(path), "--runs", "5", "--warmup", "1", "--batch", "2")
    assert code == 0
    assert [(i["name"], i["shape"], i["dtype"]) for i in out["inputs"]] == [
        ("ids", [2, 3], "int64"), ("pixels", [2, 3], "uint8")]


def test_energy_estimate_from_power_model(capsys, model, no_sensors):
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--runs", "20", "--warmup", "2", "--threads", "1",
                            "--power-idle-w", "2", "--power-active-w", "6", "--power-cores", "4")
    assert code == 0
    energy = out["energy"]
    assert energy["source"] == "estimated"
    expected = (6 - 2) * 1 / 4 * out["latency_ms"]["mean"]  # W x ms = mJ
    assert energy["energy_mj"] == pytest.approx(expected, rel=1e-6)
    assert energy["idle_watts"] == 2 and energy["power_watts"] == pytest.approx(3.0)
    assert out["thermal"] == [] and out["cpu_governor"] is None


def test_energy_unavailable_without_sensor_or_model(capsys, model, no_sensors):
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--runs", "5", "--warmup", "0")
    assert code == 0
    assert out["energy"]["energy_mj"] is None and out["energy"]["source"] == "unavailable"


def test_power_model_needs_both_watts(capsys, model):
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--power-idle-w", "2")
    assert code == ExitCode.USAGE and "--power-active-w" in out["error"]


def _rapl_recording(root: Path, energy_uj: int, max_range: int = 262143328850) -> Path:
    domain = root / "sys/class/powercap/intel-rapl:0"
    domain.mkdir(parents=True, exist_ok=True)
    (domain / "energy_uj").write_text("%d\n" % energy_uj)
    (domain / "max_energy_range_uj").write_text("%d\n" % max_range)
    return domain


def test_rapl_sensor_reads_counter_and_handles_wraparound(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_SYSFS_ROOT", str(tmp_path))
    domain = _rapl_recording(tmp_path, 1_000_000, max_range=10_000_000)
    sensor = RaplSensor.discover()
    assert sensor is not None and sensor.source == "measured:rapl"

    sensor.start()
    (domain / "energy_uj").write_text("3500000\n")
    joules, seconds = sensor.stop()
    assert joules == pytest.approx(2.5) and seconds >= 0

    (domain / "energy_uj").write_text("9999000\n")
    sensor.start()
    (domain / "energy_uj").write_text("500\n")  # wrapped at max_energy_range_uj
    joules, _ = sensor.stop()
    assert joules == pytest.approx((10_000_000 - 9_999_000 + 500) / 1e6)

    assert sensor.delta_uj(10, 30) == 20
    (domain / "max_energy_range_uj").unlink()
    with pytest.raises(SensorError):
        sensor.delta_uj(30, 10)


def test_rapl_sensor_absent_or_unreadable(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_SYSFS_ROOT", str(tmp_path))
    assert RaplSensor.discover() is None
    domain = _rapl_recording(tmp_path, 0)
    (domain / "energy_uj").write_text("not a number")
    assert RaplSensor.discover() is None


def test_bench_uses_rapl_when_readable(capsys, model, tmp_path, monkeypatch):
    # A static recording: the counter does not move, so the measured dynamic energy is 0.
    monkeypatch.setenv("EDGE_AGENT_SYSFS_ROOT", str(tmp_path))
    _rapl_recording(tmp_path, 123456)
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--runs", "5", "--warmup", "0",
                            "--power-idle-w", "2", "--power-active-w", "6")
    assert code == 0
    assert out["energy"]["source"] == "measured:rapl" and out["energy"]["energy_mj"] == 0.0
    assert out["energy"]["idle_watts"] == 0.0


def test_corrupt_model_is_invalid(capsys, tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(np.random.default_rng(1).bytes(512))
    code, out, err = run_main(capsys, "bench", "--model", str(bad), "--runs", "5")
    assert code == ExitCode.MODEL_INVALID == 3
    assert out == {"schema_version": 1, "command": "bench", "error": out["error"], "exit_code": 3}
    assert str(bad) in out["error"] and "\n" not in out["error"]
    assert "Traceback" not in err


def test_missing_model_is_not_found(capsys, tmp_path):
    missing = tmp_path / "nope.onnx"
    code, out, err = run_main(capsys, "bench", "--model", str(missing))
    assert code == ExitCode.MODEL_NOT_FOUND == 4
    assert out["exit_code"] == 4 and str(missing) in out["error"]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--model", "m.onnx", "--runs", "0"], ["frobnicate"], []])
def test_usage_errors_exit_2_with_json(capsys, argv):
    code, out, _ = run_main(capsys, *argv)
    assert code == ExitCode.USAGE and out["exit_code"] == 2 and out["error"]


def test_unavailable_provider_falls_back_to_cpu(capsys, model):
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--runs", "5", "--warmup", "0",
                            "--providers", "NoSuchExecutionProvider")
    assert code == 0 and out["execution_provider"] == "CPUExecutionProvider"
    assert out["providers_requested"] == ["NoSuchExecutionProvider"]
    assert any("falling back to CPUExecutionProvider" in w for w in out["warnings"])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_pin_cpu_records_and_restores_affinity(capsys, model):
    before = os.sched_getaffinity(0)
    cpu = min(before)
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--runs", "5", "--warmup", "0",
                            "--pin-cpu", str(cpu))
    assert code == 0 and out["pinned_cpu"] == cpu
    assert os.sched_getaffinity(0) == before


def test_info(capsys):
    code, out, _ = run_main(capsys, "info")
    assert code == 0 and out["schema_version"] == 1 and out["command"] == "info"
    for key in ("arch", "cpu_model", "cores", "memory_mb", "os", "python", "onnxruntime", "providers",
                "energy_sensors", "thermal", "cpu_governor", "throttled"):
        assert key in out
    assert out["arch"] == platform.machine()
    assert out["cores"] == os.cpu_count()
    assert "CPUExecutionProvider" in out["providers"]


def test_info_reads_sensors_thermal_and_governor_from_sysfs_root(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_SYSFS_ROOT", str(tmp_path))
    _rapl_recording(tmp_path, 42)
    hwmon = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hwmon.mkdir(parents=True)
    (hwmon / "in1_input").write_text("5000\n")
    for i, (kind, milli) in enumerate([("cpu-thermal", "45500"), ("gpu-thermal", "41000")]):
        zone = tmp_path / ("sys/class/thermal/thermal_zone%d" % i)
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    gov = tmp_path / "sys/devices/system/cpu/cpu0/cpufreq"
    gov.mkdir(parents=True)
    (gov / "scaling_governor").write_text("performance\n")

    code, out, _ = run_main(capsys, "info")
    assert code == 0
    assert out["energy_sensors"] == ["rapl", "ina3221"]
    assert out["thermal"] == [{"zone": "thermal_zone0", "type": "cpu-thermal", "temp_c": 45.5},
                              {"zone": "thermal_zone1", "type": "gpu-thermal", "temp_c": 41.0}]
    assert read_thermal() == out["thermal"]
    assert out["cpu_governor"] == "performance"


def test_parse_cpuinfo():
    assert parse_cpuinfo("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n") == "Intel(R) Xeon(R)"
    assert parse_cpuinfo("processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n") == "ARM Cortex-A72"
    assert parse_cpuinfo("CPU part\t: 0xd08\nHardware\t: BCM2835\n") == "BCM2835"
    assert parse_cpuinfo("") is None


def test_latency_stats():
    stats = latency_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stats["p50"] == 3.0 and stats["p90"] == pytest.approx(4.6) and stats["p99"] == pytest.approx(4.96)
    assert stats["mean"] == 3.0 and stats["min"] == 1.0 and stats["max"] == 5.0
    assert stats["cv"] == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1) / 3.0)


def test_agent_runs_as_a_separate_process(model):
    proc = subprocess.run(
        [sys.executable, "-m", "agents", "bench", "--model", str(model), "--runs", "10", "--warmup", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["schema_version"] == 1 and out["command"] == "bench" and out["runs"] >= 5


def test_agent_process_error_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "agents", "bench", "--model", str(tmp_path / "missing.onnx")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 4
    assert json.loads(proc.stdout)["exit_code"] == 4 and "Traceback" not in proc.stderr


def test_import_hygiene():
    code = ("import agents.cli, sys; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in {'torch','ray','pluggy','pydantic','yaml','orchestrator'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("path", AGENT_SOURCES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_agent_sources_parse_as_python39(path):
    # what each module may import, and that they import each other without a cycle: tests/test_agent_imports.py
    source = path.read_text()
    tree = ast.parse(source, feature_version=(3, 9))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would pull in the package"
    if path.name not in ("__init__.py", "__main__.py"):
        assert "from __future__ import annotations" in source


# ------------------------------------------------------------------- inputs: the agent's and the host's


def _int8_model(path: Path) -> Path:
    """q int8 [N,2], u uint8 [N,2], ids int32 [N,2], flag bool [N,2] -> y = float(q) + float(u) + float(ids)."""
    nodes = [helper.make_node("Cast", [name], ["f_" + name], to=TensorProto.FLOAT) for name in ("q", "u", "ids")]
    nodes += [helper.make_node("Add", ["f_q", "f_u"], ["s"]), helper.make_node("Add", ["s", "f_ids"], ["y"])]
    inputs = [helper.make_tensor_value_info(name, kind, ["N", 2]) for name, kind in
              (("q", TensorProto.INT8), ("u", TensorProto.UINT8), ("ids", TensorProto.INT32),
               ("flag", TensorProto.BOOL))]
    graph = helper.make_graph(nodes, "int8_inputs", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                            ["N", 2])])
    return save_model(graph, path)


def test_inputs_are_made_one_way_for_bench_and_reference_data(tmp_path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(_int8_model(tmp_path / "q.onnx")), providers=["CPUExecutionProvider"])
    feeds = make_inputs(session, 64, 0, [])
    assert {n: (a.dtype, a.shape) for n, a in feeds.items()} == {
        "q": (np.int8, (64, 2)), "u": (np.uint8, (64, 2)), "ids": (np.int32, (64, 2)), "flag": (np.bool_, (64, 2))}
    assert feeds["q"].min() < 0 and feeds["q"].max() > 10  # 8-bit data spans its range (negative int8 included)
    assert feeds["u"].max() > 10 and 0 <= feeds["ids"].min() and feeds["ids"].max() <= 9  # ids stay small
    reference = reference_inputs(session)  # the host's health-check inputs: the same rule, 4 rows, seed 0
    assert {n: a.shape for n, a in reference.items()} == {n: (4, 2) for n in feeds}
    for name, array in make_inputs(session, 4, 0, []).items():
        np.testing.assert_array_equal(reference[name], array)


# ------------------------------------------------------------------- run: outputs for parity checks


def test_run_saves_outputs_equal_to_onnxruntime_on_the_host(capsys, model, tmp_path):
    import onnxruntime as ort

    x = np.random.default_rng(3).standard_normal((5, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, _ = run_main(capsys, "run", "--model", str(model), "--inputs", str(tmp_path / "x.npy"),
                            "--outputs", str(tmp_path / "y.npy"))
    assert code == ExitCode.OK and out["command"] == "run"
    assert out["inputs"] == [{"name": "x", "shape": [5, 1, 8, 8], "dtype": "float32"}]
    assert out["outputs"] == [{"name": "y", "shape": [5, 4], "dtype": "float32"}]
    assert out["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-6, atol=1e-6)


def test_run_takes_named_inputs_from_npz_and_saves_npz(capsys, tmp_path):
    path = int_inputs_model(tmp_path / "ints.onnx")
    ids, pixels = np.arange(6, dtype=np.int64).reshape(2, 3), np.full((2, 3), 7, np.uint8)
    np.savez(tmp_path / "in.npz", ids=ids, pixels=pixels)
    code, _, _ = run_main(capsys, "run", "--model", str(path), "--inputs", str(tmp_path / "in.npz"),
                            "--outputs", str(tmp_path / "out.npz"))
    assert code == 0
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_array_equal(saved["y"], ids + 7.0)


@pytest.mark.parametrize("inputs, message", [
    (np.zeros((1, 1, 8, 8), np.float64), "is float64, the model wants float32"),
    ({"wrong": np.zeros((1, 1, 8, 8), np.float32)}, "hold wrong, the model wants x"),
])
def test_run_refuses_inputs_that_do_not_fit_the_model(capsys, model, tmp_path, inputs, message):
    path = tmp_path / ("in.npz" if isinstance(inputs, dict) else "in.npy")
    np.savez(path, **inputs) if isinstance(inputs, dict) else np.save(path, inputs)
    code, out, _ = run_main(capsys, "run", "--model", str(model), "--inputs", str(path),
                            "--outputs", str(tmp_path / "y.npy"))
    assert code == ExitCode.USAGE and message in out["error"]
    assert not (tmp_path / "y.npy").exists()


def test_real_sample_rows_are_cut_or_repeated_to_the_rows_fed(tmp_path):
    """The host attaches 8 held-out rows; the agent feeds as many as it times, fixed batch sizes included."""
    import onnxruntime as ort

    rows = np.arange(8 * 1 * 8 * 8, dtype=np.float32).reshape(8, 1, 8, 8)
    for batch, fixed, expected in ((1, None, 1), (3, None, 3), (12, None, 12), (1, 2, 2)):
        path = tiny_cnn(tmp_path / f"{batch}-{fixed}.onnx", batch=fixed or "N")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        source: list = []
        feeds = make_inputs(session, batch, 0, [], source=source, sample={name: rows})
        assert source == ["sample"] and len(feeds[name]) == expected
        np.testing.assert_array_equal(feeds[name], np.concatenate([rows, rows])[:expected])
