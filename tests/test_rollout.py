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
import threading
import time
from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.devices.registry import DeviceRegistry
from orchestrator.devices.ssh_deploy import DeployTarget
from orchestrator.errors import RolloutFailed, RolloutIncomplete
from orchestrator.models.modelfacts import model_precision
from orchestrator.rollout.deployments import DeploymentStore
from orchestrator.rollout.execute import deploy
from orchestrator.rollout.healthcheck import TOLERANCES
from orchestrator.rollout.plan import RolloutOptions, canary_count, chosen_models
from tests.helpers.rollout import (  # noqa: F401  fixtures, found by name
    FAST,
    PROFILE,
    agent_processes,
    cnn_model,
    deploy_run,
    fleet,
    profile,
    runs,
    sha_of,
    working_current,
)

# ------------------------------------------------------------------------------ host side, no device


def test_chosen_model_is_read_as_run_py_wrote_it(runs):
    from orchestrator.state.paths import store_path
    from orchestrator.state.store import RunStore

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
    a = sha_of(runs["a"])
    for name in f.servers:
        assert working_current(f.disk(name)) == a
        assert (f.disk(name) / "agent.pyz").resolve().name.startswith("agent-")  # for the systemd unit
    assert main(["deploy", runs["b"], "--max-parallel", "4", "--canary", "50%"]) == 0
    out = capsys.readouterr().out
    assert "wave 1 (canary): dev-3, dev-0\n" in out and f"installed (was {a[:12]})" in out
    b = sha_of(runs["b"])
    assert all(working_current(f.disk(n)) == b for n in f.servers)
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
    a = sha_of(runs["a"])
    assert main(["deploy", runs["a"], "--canary", "2", "--max-parallel", "3"]) == 0
    capsys.readouterr()
    code = main(["deploy", runs["bad"], "--canary", "2", "--max-parallel", "3"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "ROLLED BACK: health check failed: outputs differ from the reference" in out
    assert err.startswith("error: rollout ") and " stopped: canary " in err and "every canary was rolled back" in err
    assert "\n" not in err.strip()
    for name in f.servers:  # canaries rolled back, the third never touched
        assert working_current(f.disk(name)) == a
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
    a, b = sha_of(runs["a"]), sha_of(runs["b"])
    deploy_run(runs["a"], max_parallel=3)
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


def test_device_killed_mid_install_keeps_a_working_current_and_resume_finishes(fleet, runs, capsys):
    f = fleet(2)
    a, b = sha_of(runs["a"]), sha_of(runs["b"])
    deploy_run(runs["a"], max_parallel=2)
    victim = f.servers["dev-1"]

    def kill_during_install() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not agent_processes(f.disk("dev-1"), "install"):
            time.sleep(0.01)
        victim.stop()  # the device dies: sshd, its sessions and the agent mid-install, all SIGKILLed

    killer = threading.Thread(target=kill_during_install)
    killer.start()
    with pytest.raises(RolloutIncomplete, match=r"incomplete: dev-1 offline \(dev-1: device 'dev-1': connection "
                                                r"lost .*then unreachable"):
        deploy_run(runs["b"], canary="1")
    killer.join()
    assert working_current(f.disk("dev-0")) == b
    assert working_current(f.disk("dev-1")) == a  # the old version, complete and loadable
    assert DeviceRegistry().get("dev-1").status == "offline"

    victim.start()  # the device is back
    assert main(["deploy", "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resuming ") and "wave 2: dev-1\n" in out and "dev-0" not in out.split("\n", 2)[2]
    assert working_current(f.disk("dev-1")) == b
    assert not [p for p in (f.disk("dev-1") / "deploy").rglob("*") if ".tmp-" in p.name]


def test_offline_device_is_left_for_resume_then_rollback(fleet, runs, capsys):
    f = fleet(3)
    a, b = sha_of(runs["a"]), sha_of(runs["b"])
    deploy_run(runs["a"], max_parallel=3)
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
    assert [working_current(f.disk(n)) for n in ("dev-0", "dev-1", "dev-2")] == [b, a, b]
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
    from orchestrator.state.paths import store_path
    from orchestrator.state.store import RunStore

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


