"""Devices over SSH with real parts: a real OpenSSH server on 127.0.0.1, real paramiko, the real agent zipapp.

The "devices" are this machine reached through sshd, each with its own remote folder.
Faults have real causes (a stopped or killed sshd, a new host key, a closed port) except
the corrupt upload, which a fake injects (named in its test).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from bench.sshd import free_port
from orchestrator.cli.main import main
from orchestrator.config.profile import load_profile
from orchestrator.devices.registry import DeviceRegistry, RegisteredDevice
from orchestrator.devices.ssh import SshTransport
from orchestrator.errors import MeasurementError
from orchestrator.fleet.lease import DeviceLease
from tests.helpers.agent import tiny_cnn


def _bench_processes(remote_dir: Path) -> list[psutil.Process]:
    """The agent bench processes running from a device's remote folder (found by command line, for watching only)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "bench" in cmd and any(str(remote_dir) in part for part in cmd):
            found.append(proc)
    return found


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------------ registration


def test_register_pins_the_host_key_installs_the_agent_and_lists_the_device(sshd_server, device_profile,
                                                                            register_device, capsys):
    profile = device_profile()
    out = register_device(sshd_server, "loop-1", profile, "--tag", "bench", "--yes")
    assert f"host key ssh-ed25519 {sshd_server.host_key_fingerprint} pinned (accepted with --yes)" in out

    device = DeviceRegistry().get("loop-1")
    assert device.host_key_fingerprint == sshd_server.host_key_fingerprint
    assert device.profile == profile.stem and device.tags == ["bench"] and device.status == "online"
    assert device.arch == os.uname().machine and device.info["providers"]
    remote = sshd_server.folder / "devices" / "loop-1"
    assert [p.name for p in remote.iterdir()] == [next(remote.glob("agent-*.pyz")).name]  # one file: the agent

    assert main(["devices", "list"]) == 0
    listing = capsys.readouterr().out
    for text in ("loop-1", profile.stem, f"127.0.0.1:{sshd_server.port}", device.arch, "online", "bench"):
        assert text in listing
    assert main(["devices", "show", "loop-1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["host_key_fingerprint"] == sshd_server.host_key_fingerprint
    assert "password" not in json.dumps(shown).lower()
    assert main(["devices", "probe", "loop-1"]) == 0
    assert capsys.readouterr().out.startswith("loop-1: online, ")
    assert main(["devices", "remove", "loop-1"]) == 0
    assert DeviceRegistry().list() == []


def test_register_from_known_hosts_without_asking(sshd_server, device_profile, register_device, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    key = (sshd_server.folder / "host_key.pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{sshd_server.port} {key[0]} {key[1]}\n")
    out = register_device(sshd_server, "loop-kh", device_profile(), "--known-hosts", str(known_hosts))
    assert f"pinned (matches {known_hosts})" in out


def test_host_key_must_be_vouched_for(sshd_server, device_profile, tmp_path, capsys):
    base = ["devices", "register", "loop-x", "--host", "127.0.0.1", "--port", str(sshd_server.port),
            "--user", sshd_server.user, "--key", str(sshd_server.client_key), "--profile", str(device_profile()),
            "--python", sys.executable, "--known-hosts", str(tmp_path / "none")]
    # no terminal to ask on, no --yes, no fingerprint: refused before anything is stored
    assert main(base) == 2
    assert "--host-key-fingerprint" in capsys.readouterr().err
    # a fingerprint that is not the server's
    assert main([*base, "--host-key-fingerprint", "SHA256:" + "A" * 43]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: device 'loop-x': ") and err.endswith("not registered") and "\n" not in err
    assert sshd_server.host_key_fingerprint in err  # what it does offer, to compare by hand
    assert DeviceRegistry().list() == []


def test_register_refuses_a_device_that_does_not_fit(sshd_server, device_profile, capsys):
    too_big = device_profile(**{"hardware.memory_mb": 10_000_000,
                                "runtime.execution_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]})
    code = main(["devices", "register", "loop-big", "--host", "127.0.0.1", "--port", str(sshd_server.port),
                 "--user", sshd_server.user, "--key", str(sshd_server.client_key), "--profile", str(too_big),
                 "--python", sys.executable, "--yes"])
    err = capsys.readouterr().err
    assert code == 1
    assert "does not fit profile" in err and "memory is" in err and "lacks CUDAExecutionProvider" in err
    assert DeviceRegistry().list() == []


def test_import_registers_the_inventory_hosts_and_reports_the_rest(sshd_server, device_profile, tmp_path, capsys):
    profile = device_profile()
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(textwrap.dedent(f"""\
        all:
          vars:
            ansible_host: 127.0.0.1
            ansible_port: {sshd_server.port}
            ansible_user: {sshd_server.user}
            ansible_ssh_private_key_file: {sshd_server.client_key}
            ansible_python_interpreter: {sys.executable}
          children:
            lab:
              vars:
                edge_profile: {profile}
              hosts:
                loop-inv:
                  edge_remote_dir: {sshd_server.folder / "devices" / "loop-inv"}
                  edge_host_key_fingerprint: {sshd_server.host_key_fingerprint}
            strays:
              hosts:
                no-profile-box:
        """))
    assert main(["devices", "import", str(inventory)]) == 1  # one host could not be registered
    out, err = capsys.readouterr()
    assert f"registered loop-inv: profile {profile.stem}" in out and "(matches the given fingerprint)" in out
    assert "failed no-profile-box: host 'no-profile-box' has no profile" in err
    assert "1 registered, 0 skipped, 1 failed" in out
    assert DeviceRegistry().get("loop-inv").tags == ["lab"]
    assert main(["devices", "import", str(inventory)]) == 1
    assert "skipped loop-inv: already registered" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- faults, real causes


def test_changed_host_key_is_refused_naming_the_device(own_sshd, device_profile, register_device, capsys):
    profile = device_profile()
    register_device(own_sshd, "loop-rekeyed", profile, "--yes")
    pinned = own_sshd.host_key_fingerprint
    own_sshd.restart(new_host_key=True)  # same address, another key: a reinstalled device, or an impostor

    assert main(["devices", "probe", "loop-rekeyed"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "device 'loop-rekeyed'" in err and "has changed" in err
    assert pinned in err and own_sshd.host_key_fingerprint in err
    assert DeviceRegistry().get("loop-rekeyed").status == "host-key-changed"

    assert main(["--profile", str(profile), "--trials", "2", "--out", str(own_sshd.folder / "runs")]) == 4
    assert "has changed" in capsys.readouterr().err


def test_unreachable_only_device_exits_4_within_the_connect_timeout(own_sshd, device_profile, register_device,
                                                                    capsys, tmp_path):
    profile = device_profile()
    register_device(own_sshd, "loop-gone", profile, "--yes")
    own_sshd.stop()  # nothing listens on its port now

    started = time.monotonic()
    code = main(["--profile", str(profile), "--trials", "2", "--out", str(tmp_path / "runs")])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert code == 4 and elapsed < 10  # the connect timeout
    assert err == (f"error: profile {profile.stem!r}: no registered device is reachable: device 'loop-gone': "
                   f"cannot connect to {own_sshd.user}@127.0.0.1:{own_sshd.port}: connection refused")
    assert not (tmp_path / "runs").exists()  # refused before any work
    assert DeviceRegistry().get("loop-gone").status == "offline"


def _lease(device_name: str, profile_path: Path) -> DeviceLease:
    from orchestrator.devices.registry import registry_path

    registered = DeviceRegistry().get(device_name)
    return DeviceLease(registered.device(), load_profile(profile_path).profile, str(registry_path()))


def test_measure_over_ssh_uploads_the_agent_and_the_model_once(sshd_server, device_profile, register_device, tmp_path):
    profile = device_profile(**{"measurement.runs": 50, "measurement.warmup_runs": 2})
    register_device(sshd_server, "loop-m", profile, "--yes")
    lease = _lease("loop-m", profile)
    model = tiny_cnn(tmp_path / "tiny.onnx").read_bytes()
    sha = hashlib.sha256(model).hexdigest()

    first = lease.measure(model)
    assert "error" not in first, first
    assert first["device"] == "loop-m" and first["model"]["sha256"] == sha
    assert 0 < first["latency_ms"]["p50"] <= first["latency_ms"]["p99"] and first["runs"] == 50
    stored = sshd_server.folder / "devices" / "loop-m" / "models" / f"{sha}.onnx"
    assert stored.read_bytes() == model
    before = stored.stat()

    second = lease.measure(model)
    assert "error" not in second, second
    assert stored.stat().st_ino == before.st_ino and stored.stat().st_mtime_ns == before.st_mtime_ns  # not sent again
    remote = sshd_server.folder / "devices" / "loop-m"
    assert len(list(remote.glob("agent-*.pyz"))) == 1 and not list(remote.rglob("*.part-*"))
    assert DeviceRegistry().get("loop-m").status == "online"


class _CorruptingTransport(SshTransport):
    """FAKE fault: after each real upload, flip one byte of the uploaded file on the "device's" disk
    (possible here because the device is this machine), before its sha256 is checked."""

    def _upload(self, sftp, data, path):
        super()._upload(sftp, data, path)
        if "/models/" in path:  # the agent's own upload stays intact
            raw = bytearray(Path(path).read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            Path(path).write_bytes(bytes(raw))


def test_corrupt_model_upload_is_caught_by_the_sha256_check(sshd_server, device_profile, register_device, tmp_path):
    profile = device_profile()
    register_device(sshd_server, "loop-c", profile, "--yes")
    transport = _CorruptingTransport(DeviceRegistry().get("loop-c").device())
    model = tiny_cnn(tmp_path / "tiny.onnx").read_bytes()
    with pytest.raises(MeasurementError, match=r"device 'loop-c': the model arrived corrupted \(sha256 on the device"):
        transport.bench(model, load_profile(profile).profile)
    models = sshd_server.folder / "devices" / "loop-c" / "models"
    assert list(models.iterdir()) == []  # neither renamed into place nor left behind
    transport.close()


def test_lost_connection_fails_the_measurement_then_reconnects_or_marks_offline(own_sshd, device_profile,
                                                                             register_device, tmp_path):
    long_bench = device_profile(**{"measurement.runs": 10_000_000, "measurement.time_budget_s": 30})
    register_device(own_sshd, "loop-k", long_bench, "--yes")
    lease = _lease("loop-k", long_bench)
    lease.transport.reconnect_delays_s = (1.0, 2.0)  # shorter back-off than the default, same logic
    model = tiny_cnn(tmp_path / "tiny.onnx").read_bytes()
    remote = own_sshd.folder / "devices" / "loop-k"

    answer: dict = {}
    worker = threading.Thread(target=lambda: answer.update(lease.measure(model)))
    worker.start()
    agent = _wait_for(lambda: _bench_processes(remote), 30, "the agent's bench to start")[0]
    time.sleep(0.5)
    own_sshd.restart(leave_commands=True)  # sshd and its sessions die mid-benchmark, then sshd is back
    worker.join(30)
    assert "connection lost during the agent's bench" in answer["error"] and answer["error"].endswith("reconnected")
    assert answer["device"] == "loop-k" and not answer.get("offline")
    # the orphaned agent notices its stdin closing and stops, instead of holding the device for 30 s
    gone, alive = psutil.wait_procs([agent], timeout=5)
    for proc in alive:
        proc.kill()
    assert not alive, "the agent kept running after its connection was lost"

    own_sshd.stop()
    lease.transport.close()
    started = time.monotonic()
    gone = lease.measure(model)
    assert gone["offline"] is True and "marked offline after 3 attempts" in gone["error"]
    assert time.monotonic() - started < 10
    assert DeviceRegistry().get("loop-k").status == "offline"
    # while offline, measurements fail at once instead of waiting out the back-off again
    started = time.monotonic()
    assert lease.measure(model)["offline"] is True and time.monotonic() - started < 0.5


# ---------------------------------------------------------------------------------- whole runs over SSH


@pytest.mark.slow
def test_orchestrate_measures_on_the_registered_devices_and_names_them(ray_local, sshd_server, device_profile,
                                                                       register_device, capsys, tmp_path):
    profile = device_profile(**{"measurement.runs": 100})
    register_device(sshd_server, "loop-a", profile, "--yes")
    register_device(sshd_server, "loop-b", profile, "--yes")  # same machine, its own remote folder
    good = DeviceRegistry().get("loop-a")
    DeviceRegistry().add(RegisteredDevice(  # registered earlier, now switched off: nothing listens on its port
        name="loop-off", host="127.0.0.1", port=free_port(), user=good.user, key_path=good.key_path,
        host_key=good.host_key, profile=good.profile, profile_path=good.profile_path, python=good.python,
        remote_dir=str(tmp_path / "off")))

    code = main(["--profile", str(profile), "--trials", "2", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"this run measures on the registered devices of profile {profile.stem!r}: loop-a" in err
    assert "skipped: device 'loop-off': cannot connect" in err

    results = json.loads(next((tmp_path / "runs").glob("*/results.json")).read_text())
    device = results["device"]
    assert device["name"] == "loop-a, loop-b" and device["transport"] == "ssh" and device["emulated"] is False
    assert device["source"] == "registry" and [u["name"] for u in device["unreachable"]] == ["loop-off"]
    assert {d["host"] for d in results["devices"]} == {f"{good.user}@127.0.0.1:{sshd_server.port}"}
    assert len(results["candidates"]) == 2
    for cand in results["candidates"]:
        assert cand["status"] == "ok", cand["error"]
        assert cand["device"] in ("loop-a", "loop-b")
    statuses = {d.name: d.status for d in DeviceRegistry().list()}
    assert statuses == {"loop-a": "online", "loop-b": "online", "loop-off": "offline"}


@pytest.mark.slow
def test_sshd_killed_mid_benchmark_fails_that_candidate_and_the_run_finishes(ray_local, own_sshd, device_profile,
                                                                            register_device, tmp_path):
    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.run import RunOptions, execute_run

    # Long enough benchmarks to be caught in the middle (a bench takes a few seconds here).
    profile = device_profile(**{"measurement.runs": 3000, "measurement.time_budget_s": 20})
    register_device(own_sshd, "loop-dies", profile, "--yes")
    remote = own_sshd.folder / "devices" / "loop-dies"

    def kill_during_first_bench() -> None:
        _wait_for(lambda: _bench_processes(remote), 240, "the first bench")
        time.sleep(0.3)
        own_sshd.restart(leave_commands=True)  # sshd dies mid-benchmark and comes back (same key)

    killer = threading.Thread(target=kill_during_first_bench, daemon=True)
    killer.start()
    outcome = execute_run(load_profile(profile), get_plugin_manager(), RunOptions(trials=2, out_dir=tmp_path / "runs"))
    killer.join(5)

    results = json.loads((outcome.out_dir / "results.json").read_text())
    cands = results["candidates"]
    assert len(cands) == 2 and all(c["device"] == "loop-dies" for c in cands)
    lost = [c for c in cands if c["status"] == "failed"]
    assert len(lost) == 1, [c["error"] for c in cands]
    assert lost[0]["error"].startswith("measurement failed: device 'loop-dies': connection lost during the agent's bench")
    assert lost[0]["error"].endswith("reconnected")
    other = next(c for c in cands if c is not lost[0])
    assert other["status"] == "ok" and other["metrics"]["latency_ms"]["p50"] > 0  # measured after the reconnect
    baseline_lost = lost[0]["pipeline"] == []
    assert results["status"] == ("failed" if baseline_lost else "finished"), results["message"]
