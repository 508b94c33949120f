"""The agent's energy sensors (agents/sensors/) read the files and output of real boards' formats.

The boards are not here: each sensor reads a recording under tests/recordings/ (see its README)
through $EDGE_AGENT_SYSFS_ROOT, `vcgencmd` is a script on PATH that prints a recording, and NVML,
a library that cannot exist on this machine, is a clearly labelled fake module (`FakeNvml`).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from agents.benchmark import measure
from agents.sensors import (
    CombinedSensor,
    Ina3221Sensor,
    NvmlSensor,
    PmicSensor,
    RaplSensor,
    SensorError,
    discover_energy_sensor,
    energy_sensor_names,
    integrate_power,
    measured_energy,
    parse_pmic_read_adc,
    rpi_pmic,
)
from tests.helpers.agent import run_main, tiny_cnn

REPO = Path(__file__).resolve().parents[1]
RECORDINGS = Path(__file__).resolve().parent / "recordings"
ORIN_NANO = RECORDINGS / "jetson-orin-nano-ina3221"
ORIN_HWMON = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
ORIN_VDD_IN_W = 5.064 * 0.872
AGX_ORIN_SUM_W = 19.488 * 0.264 + 19.488 * 0.056 + 5.008 * 0.776 + 5.008 * 0.080
PMIC_RECORDING = RECORDINGS / "rpi5-pmic" / "pmic_read_adc.txt"


def use_root(monkeypatch, root: Path) -> None:
    monkeypatch.setenv("EDGE_AGENT_SYSFS_ROOT", str(root))


def copy_recording(name: str, tmp_path: Path) -> Path:
    """A writable copy of a recording, for tests that change a value while it is sampled."""
    return Path(shutil.copytree(RECORDINGS / name, tmp_path / name))


def write_atomically(path: Path, text: str) -> None:
    """Replace a file's contents in one step: sysfs never shows a reader a half-written value."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def fast_sampling(monkeypatch):
    """Sample every 5 ms and measure idle for 0.2 s, so the tests take fractions of a second."""
    for cls in (Ina3221Sensor, PmicSensor):
        monkeypatch.setattr(cls, "interval_s", 0.005 if cls is Ina3221Sensor else 0.02)
        monkeypatch.setattr(cls, "idle_seconds", 0.2)


# ------------------------------------------------------------------------------------------ hygiene


def test_sensors_package_is_stdlib_only_python39_and_spawns_only_vcgencmd():
    sources = {p.name: p.read_text() for p in sorted((REPO / "agents" / "sensors").glob("*.py"))}
    assert {"__init__.py", "base.py", "rapl.py", "nvml.py", "ina3221.py", "rpi_pmic.py"} <= set(sources)
    for name, source in sources.items():
        tree = ast.parse(source, feature_version=(3, 9))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, name
                imported.add(node.module)
        outside = {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names}
        assert all(m.startswith("agents.sensors.") for m in outside), (name, outside)  # no numpy, no kernel
        if name != "__init__.py":
            assert "agents.sensors" not in imported, name  # the package's modules import each other directly
    everything = "".join(sources.values())
    assert everything.count("subprocess.run(") == 1 and '"pmic_read_adc"' in sources["rpi_pmic.py"]
    assert "import pynvml" not in everything  # imported only when the NVIDIA driver is there, and guarded


# ---------------------------------------------------------------------------------- Jetson INA3221


def test_orin_nano_uses_the_total_input_rail_not_the_sum(monkeypatch):
    use_root(monkeypatch, ORIN_NANO)
    sensor = Ina3221Sensor.discover()
    assert sensor is not None and sensor.source == "measured:ina3221"
    assert sensor.rail == "VDD_IN" and "input rail VDD_IN" in sensor.description
    # VDD_IN already contains VDD_CPU_GPU_CV and VDD_SOC: their sum would be 6.40 W
    assert sensor.read_watts() == pytest.approx(ORIN_VDD_IN_W, abs=1e-9)


def test_agx_orin_without_a_total_rail_sums_the_rails_and_says_which(monkeypatch):
    use_root(monkeypatch, RECORDINGS / "jetson-agx-orin-ina3221")
    sensor = Ina3221Sensor.discover()
    assert sensor.rail == "VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0 + VDDQ_VDD2_1V8AO"  # no NC, no in7 sum
    assert "sum of rails VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0, VDDQ_VDD2_1V8AO" in sensor.description
    assert "no total-input rail" in sensor.description
    assert sensor.read_watts() == pytest.approx(AGX_ORIN_SUM_W, abs=1e-9)


def test_jetson_nano_iio_driver_uses_pom_5v_in_power(monkeypatch):
    use_root(monkeypatch, RECORDINGS / "jetson-nano-ina3221")
    sensor = Ina3221Sensor.discover()
    assert sensor.rail == "POM_5V_IN"
    assert sensor.read_watts() == pytest.approx(2.231, abs=1e-9)


def test_no_ina3221_under_an_empty_root(monkeypatch, tmp_path):
    use_root(monkeypatch, tmp_path)
    assert Ina3221Sensor.discover() is None and not Ina3221Sensor.readable()


def test_sampled_sensor_integrates_power_that_changes_mid_measurement(monkeypatch, tmp_path, fast_sampling):
    root = copy_recording("jetson-orin-nano-ina3221", tmp_path)
    use_root(monkeypatch, root)
    high_w = 5.064 * 2.872
    sensor = Ina3221Sensor.discover()
    t_start = time.perf_counter()
    sensor.start()
    time.sleep(0.3)
    t_switch = time.perf_counter()
    write_atomically(root / ORIN_HWMON / "curr1_input", "2872\n")
    time.sleep(0.3)
    joules, seconds = sensor.stop()
    t_stop = time.perf_counter()

    assert t_stop - t_start >= seconds >= 0.59
    low_s = t_switch - t_start
    expected = ORIN_VDD_IN_W * low_s + high_w * (seconds - low_s)
    assert joules == pytest.approx(expected, rel=0.05)
    # neither the power at start nor at stop held for the whole window
    assert ORIN_VDD_IN_W * seconds * 1.2 < joules < high_w * seconds * 0.8
    assert sensor.samples > 20  # the background thread sampled; start and stop alone would be 2


def test_sampled_sensor_fails_when_the_rail_becomes_unreadable(monkeypatch, tmp_path, fast_sampling):
    root = copy_recording("jetson-orin-nano-ina3221", tmp_path)
    use_root(monkeypatch, root)
    sensor = Ina3221Sensor.discover()
    sensor.start()
    time.sleep(0.05)
    (root / ORIN_HWMON / "curr1_input").unlink()
    with pytest.raises(SensorError, match="curr1_input"):
        sensor.stop()
    assert not any(t.name == "energy-sampler" for t in threading.enumerate())


def test_trapezoid_integration_over_real_timestamps():
    # 2 W for 1 s, a ramp to 4 W over 0.5 s, then 4 W for 0.25 s, at uneven times
    samples = [(10.0, 2.0), (10.4, 2.0), (11.0, 2.0), (11.5, 4.0), (11.75, 4.0)]
    assert integrate_power(samples) == pytest.approx(2.0 + 1.5 + 1.0)
    assert integrate_power(samples[:1]) == 0.0


# ----------------------------------------------------------------------------------- idle and measure


def test_measured_energy_subtracts_idle_power():
    sensor = RaplSensor(str(RECORDINGS / "rapl/sys/class/powercap/intel-rapl:0"))
    sensor.samples = 2
    energy = measured_energy(sensor, joules=10.0, seconds=2.0, idle_w=3.0, runs=4)
    assert energy["energy_mj"] == pytest.approx((10.0 - 3.0 * 2.0) / 4 * 1000.0)
    assert energy["power_watts"] == 5.0 and energy["idle_watts"] == 3.0
    assert energy["source"] == "measured:rapl" and energy["rail"] == "package-0" and energy["samples"] == 2
    assert "minus idle power" in energy["method"]
    assert measured_energy(sensor, 1.0, 2.0, 3.0, 4)["energy_mj"] == 0.0  # never negative


def _bench_args(**kw) -> argparse.Namespace:
    base = dict(warmup=0, runs=20, time_budget=10.0, warmup_until_stable=False, warmup_max=0,
                stable_window=10, stable_cv=0.05)
    return argparse.Namespace(**dict(base, **kw))


def test_measure_subtracts_the_idle_power_measured_just_before_the_timed_runs(monkeypatch, tmp_path,
                                                                               fast_sampling):
    root = copy_recording("jetson-orin-nano-ina3221", tmp_path)
    use_root(monkeypatch, root)
    high_w = 5.064 * 2.872  # 2 A more while the "model" runs

    def run():
        if not (root / "busy").exists():
            (root / "busy").touch()
            write_atomically(root / ORIN_HWMON / "curr1_input", "2872\n")
        time.sleep(0.01)

    warnings = []
    _, samples, energy = measure(run, _bench_args(), warnings)
    mean_ms = sum(samples) / len(samples)
    assert energy["source"] == "measured:ina3221" and energy["rail"] == "VDD_IN"
    assert energy["idle_watts"] == pytest.approx(ORIN_VDD_IN_W, abs=1e-9)  # idle before the runs began
    assert energy["energy_mj"] == pytest.approx((high_w - ORIN_VDD_IN_W) * mean_ms, rel=0.15)
    assert energy["energy_mj"] < 0.85 * high_w * mean_ms  # what it would be without the idle subtraction
    assert not [w for w in warnings if "energy" in w], warnings


def test_measure_stops_the_sampling_thread_when_inference_fails(monkeypatch, fast_sampling):
    use_root(monkeypatch, ORIN_NANO)

    def run():
        raise RuntimeError("inference failed")

    with pytest.raises(RuntimeError):
        measure(run, _bench_args(), [])
    assert not any(t.name == "energy-sampler" for t in threading.enumerate())


def test_bench_end_to_end_on_an_ina3221_recording(capsys, monkeypatch, tmp_path, fast_sampling):
    use_root(monkeypatch, ORIN_NANO)
    model = tiny_cnn(tmp_path / "tiny.onnx")
    code, out, _ = run_main(capsys, "bench", "--model", str(model), "--runs", "30", "--warmup", "2",
                            "--power-idle-w", "2", "--power-active-w", "6")
    assert code == 0
    energy = out["energy"]
    assert energy["source"] == "measured:ina3221" and energy["rail"] == "VDD_IN"  # measured beats the model
    assert energy["idle_watts"] == pytest.approx(ORIN_VDD_IN_W, abs=1e-9)
    assert energy["power_watts"] == pytest.approx(ORIN_VDD_IN_W, abs=1e-9)
    assert energy["energy_mj"] == pytest.approx(0.0, abs=1e-9)  # a static recording: nothing above idle
    assert energy["samples"] >= 2


def test_agent_zipapp_imports_its_sensors_module(tmp_path):
    from orchestrator.devices.bundle import agent_bundle

    bundle = agent_bundle()
    pyz = tmp_path / bundle.name
    pyz.write_bytes(bundle.data)
    env = dict(os.environ, EDGE_AGENT_SYSFS_ROOT=str(ORIN_NANO))
    proc = subprocess.run([sys.executable, str(pyz), "info"], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["energy_sensors"] == ["ina3221"]


# ------------------------------------------------------------------------------ Raspberry Pi 5 PMIC


def test_parse_pmic_read_adc_recording():
    watts = parse_pmic_read_adc(PMIC_RECORDING.read_text())
    assert len(watts) == 12 and "EXT5V" not in watts and "BATT" not in watts  # voltage only
    assert watts["VDD_CORE"] == pytest.approx(0.72418800 * 0.88724300)
    assert watts["3V7_WL_SW"] == pytest.approx(3.69246800 * 0.08741210)
    assert sum(watts.values()) == pytest.approx(2.0654321645, abs=1e-9)
    assert parse_pmic_read_adc('error=1 error_msg="Command not registered"\n') == {}


def _vcgencmd_replay(tmp_path: Path, monkeypatch, adc_text: str | None) -> Path:
    """A `vcgencmd` on PATH that prints a pmic_read_adc recording (or, with None, a Pi 4's answer)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    adc = tmp_path / "adc.txt"
    adc.write_text(adc_text if adc_text is not None else 'error=1 error_msg="Command not registered"\n')
    script = bin_dir / "vcgencmd"
    script.write_text('#!/bin/sh\nif [ "$1" = pmic_read_adc ]; then exec cat "%s"; fi\n'
                      'echo \'error=1 error_msg="Command not registered"\'\n' % adc)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", "%s%s%s" % (bin_dir, os.pathsep, os.environ.get("PATH", "")))
    return adc


def test_pmic_sensor_reads_vcgencmd_on_a_pi5(monkeypatch, tmp_path):
    use_root(monkeypatch, RECORDINGS / "rpi5-pmic")
    _vcgencmd_replay(tmp_path, monkeypatch, PMIC_RECORDING.read_text())
    sensor = PmicSensor.discover()
    assert sensor is not None and sensor.source == "measured:rpi5-pmic"
    assert "VDD_CORE" in sensor.rail and "EXT5V" not in sensor.rail
    assert sensor.read_watts() == pytest.approx(2.0654321645, abs=1e-9)
    assert energy_sensor_names() == ["rpi5-pmic"]
    assert isinstance(discover_energy_sensor(), PmicSensor)


def test_pmic_sensor_integrates_a_change_mid_measurement(monkeypatch, tmp_path, fast_sampling):
    use_root(monkeypatch, RECORDINGS / "rpi5-pmic")
    text = PMIC_RECORDING.read_text()
    adc = _vcgencmd_replay(tmp_path, monkeypatch, text)
    low_w = sum(parse_pmic_read_adc(text).values())
    busy = text.replace("VDD_CORE_A current(7)=0.88724300A", "VDD_CORE_A current(7)=2.88724300A")
    high_w = sum(parse_pmic_read_adc(busy).values())
    sensor = PmicSensor.discover()
    t_start = time.perf_counter()
    sensor.start()
    time.sleep(0.4)
    t_switch = time.perf_counter()
    write_atomically(adc, busy)
    time.sleep(0.4)
    joules, seconds = sensor.stop()
    low_s = t_switch - t_start
    assert joules == pytest.approx(low_w * low_s + high_w * (seconds - low_s), rel=0.1)
    assert sensor.samples >= 5


@pytest.mark.parametrize("case", ["not a Pi", "Pi 4 vcgencmd", "no vcgencmd"])
def test_no_pmic_sensor(monkeypatch, tmp_path, case):
    use_root(monkeypatch, tmp_path if case == "not a Pi" else RECORDINGS / "rpi5-pmic")
    if case == "no vcgencmd":
        monkeypatch.setattr(rpi_pmic, "vcgencmd_path", lambda: None)
    else:
        _vcgencmd_replay(tmp_path, monkeypatch, PMIC_RECORDING.read_text() if case == "not a Pi" else None)
    assert PmicSensor.discover() is None


# --------------------------------------------------------------------------------------------- RAPL


def test_rapl_uses_package_zones_only(monkeypatch):
    use_root(monkeypatch, RECORDINGS / "rapl")
    sensor = RaplSensor.discover()
    # psys contains the package, core/uncore are inside it, intel-rapl-mmio:0 is the same package again
    assert [os.path.basename(d) for d in sensor.zone_dirs] == ["intel-rapl:0"] and sensor.rail == "package-0"
    assert energy_sensor_names() == ["rapl"]


def test_rapl_sums_packages_and_handles_wraparound_per_zone(monkeypatch, tmp_path):
    use_root(monkeypatch, tmp_path)
    zones = tmp_path / "sys/class/powercap"
    for n, (energy, max_range) in enumerate([(9_999_000, 10_000_000), (5_000_000, 50_000_000)]):
        zone = zones / ("intel-rapl:%d" % n)
        zone.mkdir(parents=True)
        (zone / "name").write_text("package-%d\n" % n)
        (zone / "energy_uj").write_text("%d\n" % energy)
        (zone / "max_energy_range_uj").write_text("%d\n" % max_range)
    sensor = RaplSensor.discover()
    assert sensor.rail == "package-0 + package-1"
    sensor.start()
    write_atomically(zones / "intel-rapl:0/energy_uj", "1000\n")  # wrapped: 1000 uJ to the top, 1000 after
    write_atomically(zones / "intel-rapl:1/energy_uj", "6500000\n")
    joules, seconds = sensor.stop()
    assert joules == pytest.approx((1_000 + 1_000 + 1_500_000) / 1e6) and seconds >= 0


# --------------------------------------------------------------------------------------------- NVML


class FakeNvml(types.ModuleType):
    """FAKE `pynvml` (nvidia-ml-py): NVML is a driver library this machine cannot have.

    It keeps each GPU's total-energy counter in mJ; a test moves it as the GPU would.
    """

    class NVMLError(Exception):
        pass

    def __init__(self, energy_mj: list[int], supported: bool = True):
        super().__init__("pynvml")
        self.energy_mj = list(energy_mj)
        self.supported = supported

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.energy_mj)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.supported:  # a GPU older than Volta
            raise self.NVMLError("Not Supported")
        return self.energy_mj[handle]


def test_nvml_reads_the_total_energy_counter(monkeypatch):
    use_root(monkeypatch, RECORDINGS / "nvidia-gpu")
    fake = FakeNvml([1_000_000, 50_000])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sensor = NvmlSensor.discover()
    assert sensor is not None and sensor.source == "measured:nvml" and sensor.rail == "gpu0 + gpu1"
    sensor.start()
    fake.energy_mj[0] += 1500
    fake.energy_mj[1] += 250
    joules, _ = sensor.stop()
    assert joules == pytest.approx(1.75)
    assert energy_sensor_names() == ["nvml"]
    assert discover_energy_sensor(gpu=False) is None  # a CPU benchmark: the GPU's energy is not its cost
    assert isinstance(discover_energy_sensor(gpu=True), NvmlSensor)


def test_nvml_adds_to_rapl_for_a_gpu_benchmark(monkeypatch, tmp_path):
    root = copy_recording("rapl", tmp_path)
    shutil.copytree(RECORDINGS / "nvidia-gpu" / "proc", root / "proc")
    use_root(monkeypatch, root)
    fake = FakeNvml([7_000])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert isinstance(discover_energy_sensor(gpu=False), RaplSensor)
    sensor = discover_energy_sensor(gpu=True)
    assert isinstance(sensor, CombinedSensor) and sensor.source == "measured:rapl+nvml"
    assert sensor.rail == "package-0 + gpu0"
    sensor.start()
    energy_uj = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    write_atomically(energy_uj, "%d\n" % (int(energy_uj.read_text()) + 3_000_000))
    fake.energy_mj[0] += 2_000
    joules, _ = sensor.stop()
    assert joules == pytest.approx(5.0)


@pytest.mark.parametrize("case", ["no driver", "not installed", "older than Volta"])
def test_no_nvml_sensor(monkeypatch, tmp_path, case):
    use_root(monkeypatch, tmp_path if case == "no driver" else RECORDINGS / "nvidia-gpu")
    if case == "not installed":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    else:
        monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([0], supported=case != "older than Volta"))
    assert NvmlSensor.discover() is None


# ------------------------------------------------------------------------------------------ info


def test_info_lists_the_readable_sensors_of_each_recording(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as here, even where nvidia-ml-py is installed
    for recording, names in [("jetson-orin-nano-ina3221", ["ina3221"]), ("jetson-nano-ina3221", ["ina3221"]),
                             ("rapl", ["rapl"]), ("nvidia-gpu", [])]:  # nvidia-gpu: no pynvml here
        use_root(monkeypatch, RECORDINGS / recording)
        code, out, _ = run_main(capsys, "info")
        assert code == 0 and out["energy_sensors"] == names, recording
