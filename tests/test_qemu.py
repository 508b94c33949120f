"""The QEMU user-mode emulated aarch64 device: its sysroot build, and the real agent measuring inside it.

The sysroot is built once per session (25 s to a minute from nothing on 2 cores), kept
between sessions under $EDGE_ORCHESTRATOR_QEMU_CACHE when set. Tests that need it skip
with the reason when qemu-aarch64-static is missing or the Debian archive / PyPI cannot
be reached to build it; the tests of the build's pieces run everywhere.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from agents.info import parse_cpuinfo
from orchestrator.config.profile import load_profile
from orchestrator.emulation.sysroot import (
    MANIFEST,
    SysrootBuildError,
    SysrootRecipe,
    build_sysroot,
    cpuinfo_text,
    default_sysroot_dir,
    read_manifest,
    usr_merge,
    write_apt_config,
)
from orchestrator.emulation.user import (
    EMULATED_RUNS,
    QemuUserTransport,
    emulated_bench_args,
    emulated_device,
    emulated_device_for_profile,
    prepare_view,
    qemu_binary,
    resolve_qemu_cpu,
)
from orchestrator.errors import MeasurementError
from tests.helpers import ROOT


def _profile(name: str):
    return load_profile(ROOT / "device_profiles" / f"{name}.yaml").profile


# ------------------------------------------------------------------------ the build's pieces (fast)


def test_cpuinfo_is_arm_format_with_one_entry_per_core():
    text = cpuinfo_text("cortex-a72", 4)
    assert text.count("processor\t:") == 4 and "CPU part\t: 0xd08" in text and "model name" not in text
    assert parse_cpuinfo(text) == "ARM Cortex-A72"
    assert parse_cpuinfo(cpuinfo_text("cortex-a76", 6)) == "ARM Cortex-A76"
    with pytest.raises(SysrootBuildError, match="no /proc/cpuinfo template"):
        cpuinfo_text("cortex-x9", 1)


def test_qemu_cpu_is_never_max_and_missing_models_map_to_the_nearest():
    have = ("cortex-a57", "cortex-a72", "cortex-a76", "max", "neoverse-n1")
    assert resolve_qemu_cpu("cortex-a72", have) == ("cortex-a72", None)
    cpu, note = resolve_qemu_cpu("cortex-a78ae", have)
    assert cpu == "cortex-a76" and "cortex-a78ae is not in this QEMU" in note
    with pytest.raises(MeasurementError, match="-cpu max"):
        resolve_qemu_cpu("max", have)
    with pytest.raises(MeasurementError, match=r"not available .*cortex-a57"):
        resolve_qemu_cpu("cortex-x4", have)


def test_emulated_protocol_is_short_and_keeps_the_profile_budget():
    profile = _profile("rpi4")
    args = emulated_bench_args(profile, host_cpus=2)
    flag = dict(zip(args[::2], args[1::2], strict=True))
    assert flag["--runs"] == str(EMULATED_RUNS) and int(flag["--warmup"]) < profile.measurement.warmup_runs
    assert flag["--time-budget"] == str(profile.measurement.time_budget_s)
    assert flag["--threads"] == "2" and flag["--power-cores"] == "4"  # 4 profile threads on a 2-core host


def test_private_apt_configuration_lives_in_the_build_folder(tmp_path):
    conf = write_apt_config(tmp_path, "bookworm").read_text()
    assert 'APT::Architecture "arm64";' in conf and f'Dir::State "{tmp_path}/apt/state/";' in conf
    assert 'Dir::Etc::parts "apt.conf.d/";' in conf  # not /etc/apt/apt.conf.d
    assert (tmp_path / "apt/state/status").read_text() == ""
    sources = (tmp_path / "apt/etc/sources.list").read_text()
    assert "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg" in sources and "bookworm-security" in sources


def test_usr_merge_moves_lib_into_usr_lib_folder_by_folder(tmp_path):
    # bookworm's libc6 ships /lib/aarch64-linux-gnu/ld-linux-aarch64.so.1 next to /usr/lib/aarch64-linux-gnu/
    (tmp_path / "lib/aarch64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1").write_text("loader")
    (tmp_path / "usr/lib/aarch64-linux-gnu").mkdir(parents=True)
    (tmp_path / "usr/lib/aarch64-linux-gnu/libstdc++.so.6").write_text("lib")
    usr_merge(tmp_path)
    assert (tmp_path / "lib").is_symlink() and os.readlink(tmp_path / "lib") == "usr/lib"
    assert (tmp_path / "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1").read_text() == "loader"
    assert (tmp_path / "usr/lib/aarch64-linux-gnu/libstdc++.so.6").exists()


def test_a_crashed_build_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    import orchestrator.emulation.sysroot as qb

    def crash(root, work, recipe, log):  # a build that dies half way (a fault we cannot cause on cue)
        root.mkdir()
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/python3").write_text("half")
        raise SysrootBuildError("disk full")

    monkeypatch.setattr(qb, "_build_into", crash)
    dest = tmp_path / "sysroot"
    with pytest.raises(SysrootBuildError, match="disk full"):
        build_sysroot(dest)
    assert not dest.exists() and read_manifest(dest) is None
    assert [p.name for p in tmp_path.iterdir()] == [".sysroot.lock"]

    def finish(root, work, recipe, log):
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/python3").write_text("ok")
        return {"key": recipe.key()}

    monkeypatch.setattr(qb, "_build_into", finish)
    assert build_sysroot(dest) == dest.resolve() and read_manifest(dest)["key"] == SysrootRecipe().key()
    monkeypatch.setattr(qb, "_build_into", crash)
    assert build_sysroot(dest) == dest.resolve()  # finished: reused, not rebuilt


def test_recipe_key_follows_what_goes_in():
    assert SysrootRecipe().key() == SysrootRecipe().key()
    assert SysrootRecipe(wheels=("numpy==1.26.4",)).key() != SysrootRecipe().key()
    assert default_sysroot_dir().name == f"sysroot-{SysrootRecipe().key()}"


# ------------------------------------------------------------------------------ inside the emulator


@pytest.fixture(scope="module")
def emulated_rpi4(qemu_sysroot) -> QemuUserTransport:
    device = emulated_device_for_profile("emu-rpi4", _profile("rpi4"), qemu_sysroot)
    assert device.emulated and device.transport == "qemu" and device.arch == "aarch64"
    return QemuUserTransport.from_device(device)



@pytest.mark.slow
def test_sysroot_is_finished_and_its_manifest_names_what_went_in(qemu_sysroot):
    manifest = json.loads((qemu_sysroot / MANIFEST).read_text())
    assert any(w.startswith("onnxruntime-") and "aarch64" in w for w in manifest["wheels"])
    assert any(d.startswith("python3.11_") and d.endswith("_arm64.deb") for d in manifest["debs"])
    assert (qemu_sysroot / "proc/cpuinfo").exists() and os.readlink(qemu_sysroot / "lib") == "usr/lib"
    assert build_sysroot(qemu_sysroot) == qemu_sysroot  # idempotent: a finished sysroot is reused


@pytest.mark.slow
def test_info_inside_is_the_emulated_board(emulated_rpi4):
    from orchestrator.fleet.registration import check_fit

    info = emulated_rpi4.info()
    assert info["arch"] == "aarch64" and info["cpu_model"] == "ARM Cortex-A72"
    assert info["cores"] == 4 and info["memory_mb"] == 4096
    assert info["emulated"] is True and info["qemu_cpu"] == "cortex-a72" and info["qemu_mode"] == "user"
    assert "CPUExecutionProvider" in info["providers"] and info["onnxruntime"]
    assert info["energy_sensors"] == [] and info["thermal"] == []  # never the host's RAPL or thermal zones
    assert check_fit(info, _profile("rpi4")) == []  # registration would accept it


@pytest.mark.slow
def test_jetson_orin_cpu_is_emulated_by_the_nearest_model_and_says_so(qemu_sysroot):
    profile = _profile("jetson").model_copy(deep=True)
    profile.emulation.qemu_cpu = "cortex-a78ae"
    transport = QemuUserTransport.for_profile(emulated_device("emu-orin", "cortex-a78ae"), profile, qemu_sysroot)
    command = transport.command(["info"])
    assert command[command.index("-cpu") + 1] == "cortex-a76" and "max" not in command
    # what the agent's info reads inside (the same code path as the Pi 4's, tested above)
    assert parse_cpuinfo((transport.view / "proc/cpuinfo").read_text()) == "ARM Cortex-A76"
    assert (transport.view / "sys/devices/system/cpu/online").read_text() == "0-5\n"
    labels = transport._labels()
    assert labels["qemu_cpu"] == "cortex-a76" and labels["qemu_cpu_requested"] == "cortex-a78ae"
    assert "nearest" in labels["emulation_note"] and labels["emulated"] is True


@pytest.mark.slow
def test_bench_inside_returns_latency_percentiles_labelled_emulated(emulated_rpi4, eo_tiny_onnx):
    profile = _profile("rpi4").model_copy(deep=True)
    profile.measurement.time_budget_s = 5.0
    result = emulated_rpi4.bench(eo_tiny_onnx().SerializeToString(), profile)
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert result["emulated"] is True and result["qemu_cpu"] == "cortex-a72"
    assert 5 <= result["runs"] <= EMULATED_RUNS and result["emulated_protocol"]["profile_threads"] == 4
    assert result["energy"]["source"] == "estimated"  # the profile's power model, never the host's sensor


@pytest.mark.slow
def test_denormals_are_flushed_inside_for_a_model_that_asks(emulated_rpi4):
    """On the aarch64 agent (FPCR.FZ through the C library's fenv), under QEMU, which honours it."""
    from tests.test_session_settings import _tiny_product

    x = np.full(4, 1e-20, np.float32)
    flushed = emulated_rpi4.run_model(_tiny_product(True).SerializeToString(), {"x": x})["y"]
    plain = emulated_rpi4.run_model(_tiny_product(False).SerializeToString(), {"x": x})["y"]
    assert (flushed == 0).all() and (plain > 0).all(), (flushed, plain)


def _parity(transport: QemuUserTransport, model, data) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    model_bytes = model.SerializeToString()
    x = data["eval"].inputs[:96]
    host = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    emulated = transport.run_model(model_bytes, {"input": x})["logits"]
    return host, emulated


@pytest.mark.slow
def test_fp32_outputs_inside_match_the_host(emulated_rpi4, eo_tiny_onnx, eo_tiny_data):
    host, emulated = _parity(emulated_rpi4, eo_tiny_onnx(), eo_tiny_data)
    assert emulated.shape == host.shape == (96, 10)
    np.testing.assert_allclose(emulated, host, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_int8_static_qdq_outputs_inside_match_the_host(emulated_rpi4, eo_tiny_onnx, eo_tiny_data, eo_technique_context,
                                                        eo_plugin_registry):
    technique = eo_plugin_registry().technique("int8-static")
    params = technique.check_params({"per_channel": True, "activations": "int8", "calibration": "minmax"})
    int8 = technique.apply(eo_tiny_onnx(), params, eo_technique_context)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8.graph.node}
    host, emulated = _parity(emulated_rpi4, int8, eo_tiny_data)
    # ARM and x86 int8 kernels may round an accumulator differently: a quantization step, not more
    assert np.abs(emulated - host).max() <= 0.05 * np.abs(host).max() + 1e-3
    assert (emulated.argmax(1) == host.argmax(1)).mean() >= 0.97


@pytest.mark.slow
def test_a_crash_inside_is_one_clear_line(emulated_rpi4, tmp_path):
    # Without the view's ARM /proc/cpuinfo and cpu lists, onnxruntime reads the host's x86
    # /proc/cpuinfo and segfaults at import (QEMU 7.2).
    broken = tmp_path / "view"
    shutil.copytree(emulated_rpi4.view, broken, symlinks=True)
    (broken / "proc/cpuinfo").unlink()
    shutil.rmtree(broken / "sys")
    transport = QemuUserTransport(emulated_rpi4.device, emulated_rpi4.sysroot, "cortex-a72", 4)
    transport.view = broken
    with pytest.raises(MeasurementError) as err:
        transport.info()
    message = str(err.value)
    assert "\n" not in message and message.startswith("device emu-rpi4: agent under qemu-aarch64 -cpu cortex-a72")
    assert "signal 11" in message or "Segmentation" in message


def test_a_missing_sysroot_is_one_clear_line(tmp_path):
    if qemu_binary() is None:
        pytest.skip("qemu-aarch64-static is not installed")
    with pytest.raises(MeasurementError, match=r"is not a finished arm64 sysroot \(build it with deploy/qemu/"):
        QemuUserTransport(emulated_device("emu", "cortex-a72"), tmp_path, "cortex-a72", 4)


def test_an_emulated_device_without_its_sysroot_is_refused_in_one_line():
    with pytest.raises(MeasurementError, match="device emu: an emulated device needs sysroot, cores in its extra"):
        QemuUserTransport.from_device(emulated_device("emu", "cortex-a72"))
    with pytest.raises(MeasurementError, match="profile x86-host has no emulation section"):
        emulated_device_for_profile("emu", _profile("x86-host"), "/nowhere")


def test_views_are_made_once_and_reused(tmp_path):
    sysroot = tmp_path / "sysroot"
    (sysroot / "usr").mkdir(parents=True)
    view = prepare_view(sysroot, "cortex-a57", 4, 4096)
    assert (view / "usr").resolve() == (sysroot / "usr").resolve()
    assert (view / "proc/meminfo").read_text().split()[1] == str(4096 * 1024)
    assert (view / "sys/devices/system/cpu/online").read_text() == "0-3\n"
    assert parse_cpuinfo((view / "proc/cpuinfo").read_text()) == "ARM Cortex-A57"
    assert prepare_view(sysroot, "cortex-a57", 4, 4096) == view
