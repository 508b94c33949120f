"""Emulated devices used like real ones: `devices emulate`, the emulated fallback of a run, and the selection rule
(functional check on aarch64 onnxruntime under QEMU; latency counted on the emulated CPU model, as rpi4 ships, or
native x the profile's latency_scale).

The tests that run the emulator share the session's arm64 sysroot with tests/test_qemu.py (built once, cached
under $EDGE_ORCHESTRATOR_QEMU_CACHE when set) and skip with the reason when qemu-aarch64-static is missing or the
sysroot cannot be built here. Each emulated agent start costs 3 s to 30 s.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.cli.main import main
from orchestrator.config.profile import load_profile
from orchestrator.devices.registry import DeviceRegistry, RegisteredDevice
from orchestrator.emulation import icount
from orchestrator.emulation.rule import EmulatedDeviceTransport, compare_outputs
from orchestrator.errors import MeasurementError, ProfileError
from orchestrator.fleet.choice import choose_devices
from orchestrator.fleet.emulated import emulated_view_dir
from orchestrator.fleet.transports import make_transport
from tests.helpers import ROOT

RPI4 = ROOT / "device_profiles" / "rpi4.yaml"


def _variant(tmp_path: Path, name: str, base: Path = RPI4, **changes) -> Path:
    """A copy of a shipped profile under another name, with dotted changes (`emulation.latency_scale=3.0`)."""
    data = yaml.safe_load(base.read_text())
    data["name"] = name
    for dotted, value in changes.items():
        section, _, key = dotted.partition(".")
        if key:
            data[section][key] = value
        else:
            data[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------ no emulator needed


def test_parity_rule_float_within_tolerance_quantized_by_top1_agreement():
    rng = np.random.default_rng(0)
    host = {"logits": rng.standard_normal((100, 10)).astype(np.float32)}
    same = {"logits": host["logits"] + 1e-6}
    assert compare_outputs(host, same, "fp32")["passed"]
    drifted = {"logits": host["logits"] * 1.01}
    verdict = compare_outputs(host, drifted, "fp32")
    assert not verdict["passed"] and "of their range" in verdict["reason"] and verdict["argmax_agreement"] == 1.0
    assert compare_outputs(host, drifted, "int8")["passed"]  # same top-1 everywhere
    flipped = host["logits"].copy()
    flipped[:2] = -flipped[:2]  # 2 of 100 rows change their top-1: agreement 0.98 < 0.99
    verdict = compare_outputs(host, {"logits": flipped}, "int8")
    assert not verdict["passed"] and verdict["argmax_agreement"] == pytest.approx(0.98)
    assert "top-1 agreement with the host 0.980 < 0.99" in verdict["reason"]
    assert "missing" in compare_outputs(host, {}, "fp32")["reason"]


def test_emulated_fallback_needs_an_emulation_section(tmp_path):
    path = _variant(tmp_path, "no-emu", base=ROOT / "device_profiles" / "x86-host.yaml", fallback_device="emulated")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("fallback_device:"))
    with pytest.raises(ProfileError, match=rf":{line}: fallback_device: .*'emulated' needs an emulation section"):
        load_profile(path)
    profiles = {p.stem: load_profile(p).profile for p in (ROOT / "device_profiles").glob("*.yaml")}
    assert {n for n, p in profiles.items() if p.fallback_device == "emulated"} == {"rpi4", "rpi5", "jetson",
                                                                                    "jetson-nano"}
    assert profiles["x86-host"].fallback_device == "local"
    assert all(p.emulation.latency_scale == 1.0 for p in profiles.values() if p.emulation)


def test_registry_gains_the_extra_column_and_keeps_emulated_rows_off_ssh(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # a registry file from before the `extra` column
        db.execute("CREATE TABLE devices (name TEXT PRIMARY KEY, transport TEXT NOT NULL DEFAULT 'ssh', "
                   "host TEXT NOT NULL, port INTEGER NOT NULL, user TEXT NOT NULL, key_path TEXT, "
                   "host_key TEXT NOT NULL, profile TEXT NOT NULL, profile_path TEXT NOT NULL, tags TEXT NOT NULL, "
                   "python TEXT NOT NULL, remote_dir TEXT NOT NULL, arch TEXT, info TEXT, status TEXT NOT NULL, "
                   "status_reason TEXT, last_seen REAL, registered_at REAL NOT NULL, deployed_model TEXT)")
        db.execute("INSERT INTO devices VALUES ('pi', 'ssh', '192.0.2.1', 22, 'pi', NULL, "
                   "'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl', 'rpi4', "
                   "'/p/rpi4.yaml', '[]', 'python3', '.edge-orchestrator', 'aarch64', '{}', 'online', NULL, NULL, "
                   "1.0, NULL)")
    registry = DeviceRegistry(path)
    assert registry.get("pi").extra == {} and registry.get("pi").device().ssh.host == "192.0.2.1"
    extra = {"sysroot": "/s", "qemu_cpu": "cortex-a72", "cores": 4, "memory_mb": 4096, "mode": "user", "view": "/v"}
    registry.add(RegisteredDevice(name="emu", host="", port=0, user="", key_path=None, host_key="", profile="rpi4",
                                  profile_path="/p/rpi4.yaml", arch="aarch64", transport="qemu", extra=extra))
    emu = DeviceRegistry(path).get("emu")
    assert emu.emulated and emu.extra == extra and emu.host_key_fingerprint is None
    assert emu.address == "qemu-user -cpu cortex-a72" and emu.as_dict()["emulated"] is True
    device = emu.device()
    assert (device.transport, device.emulated, device.ssh, device.extra) == ("qemu", True, None, extra)
    with pytest.raises(ValueError, match="emulated"):
        emu.ssh_target()


def test_devices_emulate_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    assert main(["devices", "emulate", str(ROOT / "device_profiles" / "x86-host.yaml")]) == 1
    assert capsys.readouterr().err.strip().endswith("has no emulation section: nothing says which board to emulate")
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-aarch64-static nor qemu-system-aarch64 on it
    assert main(["devices", "emulate", str(RPI4), "--mode", "system"]) == 1
    assert capsys.readouterr().err.strip() == ("error: qemu-system-aarch64 is not installed "
                                               "(apt-get install qemu-system-arm)")
    assert main(["devices", "emulate", str(RPI4)]) == 1
    assert capsys.readouterr().err.strip() == ("error: qemu-aarch64-static is not installed "
                                               "(apt-get install qemu-user-static)")
    assert DeviceRegistry().list() == []


def test_without_qemu_the_emulated_fallback_is_this_machine_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    profile = load_profile(RPI4).profile
    devices, info = choose_devices(profile.name, profile.fallback_device, 2, profile=profile)
    assert [d.transport for d in devices] == ["local"] and info["source"] == "fallback" and not info["emulated"]
    assert info["note"].endswith("not on the profile's emulated device: qemu-aarch64-static is not installed "
                                 "(apt-get install qemu-user-static)")


# ------------------------------------------------------------------------------------ inside the emulator


@pytest.mark.slow
def test_emulate_registers_lists_probes_and_remove_cleans_up(qemu_sysroot, capsys):
    assert main(["devices", "emulate", str(RPI4), "--tag", "ci"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("registered emulated-rpi4: profile rpi4, emulated (QEMU user mode, -cpu cortex-a72)")
    assert "aarch64, ARM Cortex-A72, 4 cores, 4096 MB" in out

    assert main(["devices", "list"]) == 0
    listed = capsys.readouterr().out
    row = next(line for line in listed.splitlines() if "emulated-rpi4" in line)
    assert "qemu-user -cpu cortex-a72" in row and "aarch64 (emulated)" in row and "online" in row
    assert main(["devices", "list", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["transport"] == "qemu" and entry["emulated"] is True and entry["host_key_fingerprint"] is None
    assert entry["extra"]["qemu_cpu"] == "cortex-a72" and entry["extra"]["sysroot"] == str(qemu_sysroot)
    view = Path(entry["extra"]["view"])
    assert view == emulated_view_dir("emulated-rpi4") and (view / "proc/cpuinfo").exists()

    assert main(["devices", "show", "emulated-rpi4"]) == 0
    shown = capsys.readouterr().out
    assert "QEMU user mode, -cpu cortex-a72, 4 cores, 4096 MB" in shown and "host key" not in shown
    assert main(["devices", "probe", "emulated-rpi4"]) == 0
    assert capsys.readouterr().out.startswith("emulated-rpi4: online, aarch64, ARM Cortex-A72")

    # a run of the profile now measures on it (registry), like on any registered device
    profile = load_profile(RPI4).profile
    devices, info = choose_devices(profile.name, profile.fallback_device, 2, profile=profile)
    assert [d.name for d in devices] == ["emulated-rpi4"] and info["source"] == "registry"
    # rpi4 counts instructions (emulation.latency: emulated-icount) where qemu-user and a C compiler are here
    counted = "native-scaled" if icount.unavailable_reason() else "emulated-icount"
    assert info["emulated"] and info["transport"] == "qemu" and info["latency_source"] == counted
    assert info["latency_constraint"] == "unverified" and "EMULATED" in info["note"]

    assert main(["devices", "emulate", str(RPI4)]) == 1
    assert "already registered" in capsys.readouterr().err
    assert main(["devices", "remove", "emulated-rpi4"]) == 0
    assert "and its device view" in capsys.readouterr().out
    assert not view.exists() and qemu_sysroot.exists()  # the shared sysroot stays cached
    assert DeviceRegistry().list() == []


@pytest.fixture(scope="module")
def emulated_transport(qemu_sysroot) -> EmulatedDeviceTransport:
    from orchestrator.emulation.user import emulated_device_for_profile

    device = emulated_device_for_profile("emu-rpi4", load_profile(RPI4).profile, qemu_sysroot)
    transport = make_transport(device)
    assert isinstance(transport, EmulatedDeviceTransport)
    return transport


@pytest.mark.slow
def test_measurement_is_checked_on_aarch64_and_timed_natively_scaled(emulated_transport, eo_tiny_onnx, tmp_path):
    profile = load_profile(_variant(tmp_path, "rpi4-scaled", **{"emulation.latency_scale": 3.0,
                                                                "emulation.latency": "native-scaled",
                                                                "measurement.runs": 50})).profile
    result = emulated_transport.bench(eo_tiny_onnx().SerializeToString(), profile)
    assert result["arch"] == "aarch64" and result["native_arch"] != "aarch64"  # the check ran in the ARM build
    assert result["emulated"] is True and result["qemu_cpu"] == "cortex-a72"
    assert result["latency_source"] == "native-scaled" and result["latency_constraint"] == "native-scaled"
    for key in ("p50", "p90", "mean"):
        assert result["latency_ms"][key] == pytest.approx(3.0 * result["native_latency_ms"][key])
    assert result["emulated_latency_ms"]["p50"] > result["native_latency_ms"]["p50"]  # information only
    parity = result["parity"]
    assert parity["passed"] and parity["precision"] == "fp32" and parity["relative_diff"] <= 1e-4
    assert parity["samples"] == 32 and parity["inputs"].startswith("seeded random")
    energy = result["energy"]
    assert energy["source"] == "estimated" and "native-scaled" in energy["method"]
    assert energy["energy_mj"] == pytest.approx((6.4 - 2.7) * result["latency_ms"]["mean"])  # 4 of 4 cores busy


@pytest.mark.slow
def test_quantized_model_passes_by_top1_agreement_and_a_mismatch_fails_the_candidate(
        emulated_transport, eo_tiny_onnx, eo_technique_context, eo_plugin_registry, monkeypatch):
    technique = eo_plugin_registry().technique("int8-static")
    params = technique.check_params({"per_channel": True, "activations": "int8", "calibration": "minmax"})
    int8 = technique.apply(eo_tiny_onnx(), params, eo_technique_context).SerializeToString()
    parity = emulated_transport.parity(int8)
    assert parity["passed"] and parity["precision"] == "int8" and parity["argmax_agreement"] >= 0.99

    # An ARM kernel that disagrees with the host: a fault that cannot be caused on cue, so outputs are altered
    real_run = emulated_transport.emulator.run_model

    def disagreeing(model_bytes, inputs, threads=1):
        return {name: -out for name, out in real_run(model_bytes, inputs, threads).items()}

    monkeypatch.setattr(emulated_transport.emulator, "run_model", disagreeing)
    profile = load_profile(RPI4).profile
    with pytest.raises(MeasurementError, match=r"^device emu-rpi4: fails on aarch64 onnxruntime: top-1 agreement"):
        emulated_transport.bench(int8, profile)


@pytest.mark.slow
def test_orchestrate_without_a_board_measures_on_the_emulated_device(ray_local, qemu_sysroot, tmp_path,
                                                                    capsys):
    # the rpi4 profile as shipped (latency counted on the emulated cortex-a72, issue 30), cut to a search without
    # training (int8-dynamic); where qemu-user or a C compiler is missing it falls back to native-scaled, saying so
    profile = _variant(tmp_path, "rpi4-small", **{"search.techniques": ["int8-dynamic"], "measurement.runs": 50,
                                                  "measurement.warmup_runs": 5, "measurement.time_budget_s": 5})
    fallback = icount.unavailable_reason()
    source = "native-scaled" if fallback else "emulated-icount"
    code = main(["--profile", str(profile), "--trials", "2", "--out", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert ("this run measures on the profile's emulated device emulated-rpi4-small "
            "(QEMU user mode, -cpu cortex-a72)") in err
    assert "EMULATED" in err and source in err
    flat = " ".join(out.split())
    assert (f"EMULATED device emulated-rpi4-small: latency {source}"
            + (" (unverified" if fallback else " on cortex-a72, uncalibrated (unverified")) in flat

    run_dir = next((tmp_path / "runs").glob("*/"))
    assert f"wrote {run_dir}/ (results.json, report.html, best.onnx, samples.npz)" in flat
    results = json.loads((run_dir / "results.json").read_text())
    device = results["device"]
    assert device["emulated"] is True and device["transport"] == "qemu" and device["source"] == "fallback"
    assert device["latency_source"] == source and device["latency_constraint"] == "unverified"
    assert device["qemu_cpu"] == "cortex-a72" and device["arch"] == "aarch64"
    if fallback:
        assert device["latency_fallback"].endswith("latency falls back to native-scaled") and fallback in err
    else:  # no board: the cost model is the profile's, and nothing claims a calibration
        assert device["calibrated"] is False and device["cost_model"]["calibrated"] is False
        assert "NOT calibrated" in device["note"] and "latency_fallback" not in device
    assert len(results["candidates"]) == 2
    for cand in results["candidates"]:
        assert cand["status"] == "ok", cand["error"]
        m = cand["measurement"]
        assert m["emulated"] is True and m["arch"] == "aarch64" and m["latency_source"] == source
        assert m["parity"]["passed"]
        if fallback:
            assert m["emulated_latency_ms"]["p50"] > 0
            assert cand["metrics"]["latency_ms"]["p50"] == pytest.approx(m["native_latency_ms"]["p50"])  # scale 1.0
        else:  # instructions x cpi 1.0 / 1500 MHz, counted once on one thread
            assert m["calibrated"] is False and m["count_protocol"]["threads"] == 1
            assert cand["metrics"]["latency_ms"]["p50"] == pytest.approx(m["instructions"]["median"] / 1500e3)
    decision = results["decision"]
    if not fallback:  # the final round reuses each model's count: no rounds of noise
        assert decision["protocol"]["order"] == "counted" and decision["calibrated"] is False
        assert "one count per model" in decision["sentence"]
    report = (run_dir / "report.html").read_text()
    assert "Emulated device" in report and source in report and "aarch64 check" in report
