"""Instruction-counted latency of an emulated board (orchestrator/emulation/icount.py, `latency_source:
emulated-icount`): guest instructions counted by a QEMU TCG plugin on the profile's CPU model, turned into
milliseconds by the profile's uncalibrated cost model.

The tests that run the emulator need qemu-aarch64 with plugin support (Debian: qemu-user; qemu-user-static
has none), a C compiler, and the session's arm64 sysroot; they skip with the reason otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from orchestrator.config.profile import load_profile
from orchestrator.devices.base import Device
from orchestrator.emulation import icount
from orchestrator.emulation.rule import emulation_note, fallback_line, is_current, latency_constraint, latency_source
from orchestrator.errors import ProfileError
from tests.helpers import ROOT

PROFILES = ROOT / "device_profiles"
RPI4 = PROFILES / "rpi4.yaml"


def _variant(tmp_path: Path, name: str, **changes) -> Path:
    data = yaml.safe_load(RPI4.read_text())
    data["name"] = name
    for dotted, value in changes.items():
        section, _, key = dotted.partition(".")
        data[section][key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tiny_mlp() -> bytes:
    """A small float model built from ONNX nodes (no training): 512 -> 1024 -> 10 with a ReLU (0.5 M multiply-adds:
    the kernels, not the Python around each run, are most of what is counted)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((512, 1024)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((1024, 10)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["logits"])], "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 512])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


# ------------------------------------------------------------------------------------ no emulator needed

def test_shipped_cost_models_are_labelled_uncalibrated_with_their_source():
    for path in sorted(PROFILES.glob("*.yaml")):
        emu = load_profile(path).profile.emulation
        if emu is None or emu.cost_model is None:
            continue
        cm = emu.cost_model
        assert cm.calibrated is False, f"{path.name}: no board measurement calibrated this cost model"
        assert "clock" in cm.source and "assumption" in cm.source, path.name
        # the Raspberry Pis run on their CPU: counted; the Jetsons run on their GPU, which no count sees
        counted = "GPU" not in (emu.note or "")
        assert emu.latency == ("emulated-icount" if counted else "native-scaled"), path.name
    assert load_profile(PROFILES / "rpi5.yaml").profile.emulation.latency == "emulated-icount"


def test_without_counting_a_counted_profile_falls_back_to_native_scaled_and_says_so_once(tmp_path, monkeypatch):
    # a machine with qemu-user-static (no plugin support) and no C compiler: what Debian's plain setup has
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    static = shutil.which("qemu-aarch64-static")
    if static:
        (bin_dir / "qemu-aarch64-static").symlink_to(static)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CC", raising=False)
    from orchestrator.emulation.user import emulated_device_for_profile
    from orchestrator.fleet.choice import describe_devices

    profile = load_profile(RPI4).profile
    reason = icount.unavailable_reason()
    assert reason.startswith("no qemu-aarch64 with TCG plugin support")
    assert latency_source(profile) == "native-scaled" and latency_constraint(profile) == "unverified"
    line = fallback_line(profile)
    assert line == (f"emulation.latency asks for emulated-icount, but instructions cannot be counted here ({reason}): "
                    "latency falls back to native-scaled")
    block = describe_devices([emulated_device_for_profile("emu", profile, tmp_path)], "fallback", "test", None, profile)
    assert block["latency_source"] == "native-scaled" and block["latency_fallback"] == line
    assert block["latency_requested"] == "emulated-icount" and "calibrated" not in block
    assert block["note"].count(line) == 1 and "native measurement" in block["note"]


def test_a_cached_measurement_is_reused_only_if_taken_the_same_way(tmp_path):
    profile = load_profile(RPI4).profile
    if icount.unavailable_reason():
        pytest.skip(f"cannot count instructions here: {icount.unavailable_reason()}")
    counted = {"latency_source": "emulated-icount", "cost_model": asdict(icount.cost_model(profile))}
    assert is_current(counted, profile)
    assert not is_current({"latency_source": "native-scaled"}, profile)  # scaled when counting could not run
    refitted = {**counted, "cost_model": {**counted["cost_model"], "cpi": 1.3, "calibrated": True}}
    assert not is_current(refitted, profile)  # another cost model (a calibration stored since, or removed)


def test_icount_latency_needs_a_cost_model_and_an_uncalibrated_one_never_claims_calibration(tmp_path):
    with pytest.raises(ProfileError, match="needs a cost_model"):
        load_profile(_variant(tmp_path, "no-cost", **{"emulation.cost_model": None, "emulation.latency":
                                                      "emulated-icount"}))
    profile = load_profile(_variant(tmp_path, "counted", **{"emulation.latency": "emulated-icount"})).profile
    counting = icount.unavailable_reason() is None  # else native-scaled (the fallback test above)
    assert latency_source(profile) == ("emulated-icount" if counting else "native-scaled")
    assert latency_constraint(profile) == "unverified"
    assert ("NOT calibrated" in emulation_note(profile) and "cortex-a72" in emulation_note(profile)) or not counting
    model = icount.cost_model(profile)
    assert model.calibrated is False and model.milliseconds(3_000_000) == pytest.approx(2.0)  # 1 cpi, 1500 MHz
    calibrated = load_profile(_variant(tmp_path, "fitted", **{"emulation.latency": "emulated-icount",
                                                              "emulation.cost_model": {
                                                                  "cpi": 1.3, "clock_mhz": 1500, "calibrated": True,
                                                                  "source": "test: fitted to a board"}})).profile
    assert latency_constraint(calibrated) == ("emulated-icount" if counting else "unverified")


# ------------------------------------------------------------------------------------ with the emulator

@pytest.fixture(scope="module")
def counting_transport(qemu_sysroot):
    reason = icount.unavailable_reason()
    if reason:
        pytest.skip(f"cannot count instructions here: {reason}")
    from orchestrator.emulation.user import QemuUserTransport

    device = Device(name="icount-a72", transport="qemu", arch="aarch64", emulated=True)
    return QemuUserTransport(device, qemu_sysroot, "cortex-a72", 1)


@pytest.mark.slow
def test_count_is_the_same_with_a_spinning_process_on_the_other_core(counting_transport, tmp_path):
    profile = load_profile(_variant(tmp_path, "counted", **{"emulation.latency": "emulated-icount"})).profile
    model = _tiny_mlp()
    quiet = icount.count_bench(counting_transport, model, profile)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = icount.count_bench(counting_transport, model, profile)
    finally:
        spinner.kill()
        spinner.wait()
    a, b = quiet["instructions"]["median"], busy["instructions"]["median"]
    assert a > 100_000  # two matrix products were counted, not just the marks
    assert abs(a - b) / a < 0.01, (a, b)
    for result in (quiet, busy):
        assert result["latency_source"] == "emulated-icount" and result["calibrated"] is False
        assert result["cost_model"]["calibrated"] is False and result["count_protocol"]["threads"] == 1
        assert result["latency_ms"]["p50"] == pytest.approx(result["instructions"]["median"] / 1500e3)
        # runs in one process: the Python and allocator code around each run varies a little (about 0.7% of this
        # 0.29 M-instruction model, once 3.1%): the bound is on that noise, the determinism is the medians' 1% above
        assert result["instructions"]["spread"] < 0.05


@pytest.mark.slow
def test_an_emulated_device_in_counted_mode_labels_what_results_json_keeps(qemu_sysroot, tmp_path):
    # What a run writes: the device block of results.json (describe_devices) and each candidate's measurement
    # (the transport's bench, filtered by the trial's EMULATION_KEYS). A whole run is left to test_emulated.py.
    if icount.unavailable_reason():
        pytest.skip(f"cannot count instructions here: {icount.unavailable_reason()}")
    from orchestrator.emulation.rule import EmulatedDeviceTransport
    from orchestrator.emulation.user import emulated_device_for_profile
    from orchestrator.fleet.choice import describe_devices
    from orchestrator.search.trial import EMULATION_KEYS

    profile = load_profile(_variant(tmp_path, "rpi4-counted", **{"emulation.latency": "emulated-icount"})).profile
    device = emulated_device_for_profile("emu-counted", profile, qemu_sysroot)
    block = describe_devices([device], "fallback", "test", None, profile)
    assert block["latency_source"] == "emulated-icount" and block["latency_constraint"] == "unverified"
    assert block["calibrated"] is False and block["cost_model"]["calibrated"] is False
    assert "NOT calibrated" in block["note"]

    result = EmulatedDeviceTransport(device).bench(_tiny_mlp(), profile)
    assert result["latency_source"] == "emulated-icount" and result["calibrated"] is False
    assert result["latency_constraint"] == "unverified" and result["parity"]["passed"]
    assert result["arch"] == "aarch64" and result["qemu_cpu"] == "cortex-a72"
    assert result["latency_ms"]["p50"] == pytest.approx(result["instructions"]["median"] / 1500e3)
    assert "emulated-icount" in result["energy"]["method"]
    kept = {"latency_source", "latency_constraint", "calibrated", "cost_model", "instructions", "parity"}
    assert kept <= set(EMULATION_KEYS)
