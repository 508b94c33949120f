"""One rollout at a time (a newer one supersedes an unfinished one; a live one is locked; a host
killed mid-install is recorded right), a device cut off in its own network namespace, and the
systemd unit: real sshd devices on loopback, real `orchestrate deploy` processes killed for real.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from orchestrator.cli.main import main
from orchestrator.errors import RolloutIncomplete
from orchestrator.rollout.deployments import DeploymentStore
from orchestrator.rollout.execute import deploy
from orchestrator.rollout.plan import RolloutOptions, chosen_models
from tests.helpers.rollout import FAST, ROOT, agent_processes, deploy_run, sha_of, start_fleet, working_current
from tests.helpers.rollout import fleet, profile, runs  # noqa: F401  fixtures, found by name



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
    a, b = sha_of(runs["a"]), sha_of(runs["b"])
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
    _wait(lambda: not any(agent_processes(f.disk(n), "install") for n in f.servers), 60, "the devices to settle")
    assert DeploymentStore().get_rollout(x["id"])["status"] == "running"

    assert main(["deploy", runs["b"], "--max-parallel", "2"]) == 0
    capsys.readouterr()
    y = DeploymentStore().latest()
    assert all(working_current(f.disk(n)) == b for n in f.servers)
    old = DeploymentStore().get_rollout(x["id"])
    assert old["status"] == "superseded" and old["superseded_by"] == y["id"]

    assert main(["deploy", "--resume"]) == 1  # the newest resumable: none (B is done, A superseded)
    assert f"no rollout to resume (the newest, {y['id']}, is done)" in capsys.readouterr().err
    assert main(["deploy", "--resume", x["id"]]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: rollout {x['id']} was superseded by rollout {y['id']}: resuming it would put its older "
                   f"model back; deploy --resume {x['id']} --force does it anyway")
    assert all(working_current(f.disk(n)) == b for n in f.servers)  # nothing went back
    assert main(["deploy", runs["a"], "--force"]) == 2
    assert "--force goes with --resume only" in capsys.readouterr().err

    assert main(["deploy", "--resume", x["id"], "--force"]) == 0  # asked for explicitly: A goes on
    left = [n for n, d in old["devices"].items() if d["state"] != "healthy"]
    assert left and all(working_current(f.disk(n)) == a for n in left)


def test_a_live_rollout_is_locked_and_a_host_killed_mid_install_is_recorded_right(fleet, runs, capsys):
    """Items 1 and 3: while a deploy runs, `deploy --resume` and another rollout of the profile are refused;
    the host is then killed mid-install, the device's install goes on, and the resumed rollout records what the
    device ran before (A), not the version the device switched to meanwhile (B)."""
    f = fleet(2)
    a, b = sha_of(runs["a"]), sha_of(runs["b"])
    deploy_run(runs["a"], max_parallel=2)
    before = DeploymentStore().latest()
    host = _deploy_process(runs["b"], "--canary", "1")
    try:
        y = _wait(lambda: _new_rollout_of(runs["b"], before), 60, "rollout B to start", host)
        canary = y["waves"][0][0]
        _wait(lambda: agent_processes(f.disk(canary), "install"), 60, "the canary's install", host)
        assert main(["deploy", "--resume"]) == 1
        err = capsys.readouterr().err
        assert f"error: rollout {y['id']} is still running (pid {host.pid} on " in err and "not resumed" in err
        assert main(["deploy", runs["a"]]) == 1
        assert f"rollout {y['id']} is still running (pid {host.pid}" in capsys.readouterr().err
    finally:
        host.kill()  # mid-install: the device's own `install --health` goes on without it
        host.communicate()
    _wait(lambda: f.current(canary) == b and not agent_processes(f.disk(canary), "install"), 60,
          "the device's install to finish")
    stored = DeploymentStore().get_rollout(y["id"])
    assert stored["devices"][canary]["state"] == "installing" and stored["devices"][canary]["previous_version"] is None

    assert main(["deploy", "--resume"]) == 0  # its owner is dead: resumed at once
    out = capsys.readouterr().out
    assert f"{canary}: installed (was {a[:12]})" in out
    done = DeploymentStore().get_rollout(y["id"])
    assert done["status"] == "done" and done["owner_pid"] != host.pid
    assert {n: d["previous_version"] for n, d in done["devices"].items()} == {n: a for n in f.servers}
    assert all(working_current(f.disk(n)) == b for n in f.servers)


def test_a_rollback_is_refused_while_a_rollout_of_its_profile_is_live(fleet, runs, capsys):
    """Issue 31 item 1: `rollback --profile P` (or `--device D` of P) while `deploy` of P runs is refused, naming the
    live rollout's pid and host, and moves no device; the rollout then records the right previous version (A)."""
    f = fleet(2)
    a, b = sha_of(runs["a"]), sha_of(runs["b"])
    deploy_run(runs["a"], max_parallel=2)
    before = DeploymentStore().latest()
    host = _deploy_process(runs["b"], "--canary", "1")
    try:
        y = _wait(lambda: _new_rollout_of(runs["b"], before), 60, "rollout B to start", host)
        canary = y["waves"][0][0]
        _wait(lambda: agent_processes(f.disk(canary), "install"), 60, "the canary's install", host)
        for args in (["--profile", y["profile"]], ["--device", canary]):
            assert main(["rollback", *args]) == 1
            captured = capsys.readouterr()
            err = captured.err.strip()
            assert err.startswith(f"error: rollout {y['id']} is still running (pid {host.pid} on "), err
            assert "not rolled back" in err and len(err.splitlines()) == 1
            assert "rolled back" not in captured.out
        assert host.wait(timeout=180) == 0, host.communicate()[1][-2000:]
    finally:
        if host.poll() is None:
            host.kill()
        host.communicate()
    done = DeploymentStore().get_rollout(y["id"])
    assert done["status"] == "done"
    assert {n: d["previous_version"] for n, d in done["devices"].items()} == {n: a for n in f.servers}
    assert all(working_current(f.disk(n)) == b for n in f.servers)


def test_a_rollout_is_refused_while_a_rollback_of_its_profile_is_live(fleet, runs, capsys):
    """Issue 31 item 1, the other way: `deploy` of P while `rollback --profile P` runs is refused, naming the live
    rollback's pid and host, and starts no rollout; once the rollback has ended, the profile is free again.
    The devices' sshd are stopped (SIGSTOP) while the rollback connects, so that it is still running when deploy
    starts; they go on (SIGCONT) within its connect timeout."""
    import psutil

    from orchestrator.rollout.deployments import this_host

    f = fleet(2)
    a, b = sha_of(runs["a"]), sha_of(runs["b"])
    deploy_run(runs["a"], max_parallel=2)
    deploy_run(runs["b"], max_parallel=2)
    before = DeploymentStore().latest()
    sshds = [psutil.Process(server.proc.pid) for server in f.servers.values()]
    for sshd in sshds:
        sshd.suspend()
    back = subprocess.Popen([sys.executable, "-m", "orchestrator", "rollback", "--profile", before["profile"]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            held = _wait(lambda: DeploymentStore()._read("SELECT * FROM rollbacks WHERE status = 'running' AND "
                                                         "owner_pid = ?", (back.pid,)), 60, "the rollback", back)
            assert main(["deploy", runs["a"]]) == 1
        finally:
            for sshd in sshds:
                sshd.resume()
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith(f"error: rollback {held[0]['id']} is still running (pid {back.pid} on {this_host()}, "), err
        assert f"for profile {before['profile']!r}; not rolled out" in err and len(err.splitlines()) == 1
        assert DeploymentStore().latest()["id"] == before["id"]  # no rollout was started
        assert back.wait(timeout=60) == 0, back.communicate()[1][-2000:]
    finally:
        if back.poll() is None:
            back.kill()
        back.communicate()
    assert all(working_current(f.disk(n)) == a for n in f.servers)
    assert not DeploymentStore()._read("SELECT * FROM rollbacks WHERE status = 'running'")  # the lock is let go
    assert main(["deploy", runs["b"], "--max-parallel", "2"]) == 0
    capsys.readouterr()
    assert all(working_current(f.disk(n)) == b for n in f.servers)


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
        a, b = sha_of(runs["a"]), sha_of(runs["b"])
        deploy_run(runs["a"], max_parallel=3)
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
        assert working_current(f.disk("ns-1")) == a

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

