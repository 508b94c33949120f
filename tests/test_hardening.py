"""Hardening (issue 16): faults and careless use that must end in one clear line, with nothing lost or exposed.

Real parts throughout: a real OpenSSH server on 127.0.0.1 (bench/sshd.py), a real local
Ray, real `orchestrate` processes killed with real signals, real file locks.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from bench.sshd import Sshd, sshd_missing_reason
from orchestrator import hookimpl
from orchestrator.cli.main import main
from orchestrator.devices.registry import DeviceRegistry
from tests.helpers import ROOT

X86 = ROOT / "device_profiles" / "x86-host.yaml"


# ------------------------------------------------------------------ item 7: the agent zipapp on the device


def _info(name: str) -> dict:
    """The agent's `info` for a registered device, through a new transport (as each command makes one)."""
    from orchestrator.devices.ssh import SshTransport

    transport = SshTransport(DeviceRegistry().get(name).device())
    try:
        return transport.info()
    finally:
        transport.close()


def test_a_same_size_corrupt_agent_on_the_device_is_replaced(sshd_server, device_profile, register_device):
    register_device(sshd_server, "loop-zap", device_profile(), "--yes")
    [agent] = (sshd_server.folder / "devices" / "loop-zap").glob("agent-*.pyz")
    good = agent.read_bytes()
    agent.write_bytes(b"\0" * len(good))  # same size, nothing of a zip left
    assert _info("loop-zap")["arch"] == os.uname().machine
    [again] = (sshd_server.folder / "devices" / "loop-zap").glob("agent-*.pyz")
    assert again == agent and again.read_bytes()[:2] == b"PK" and len(again.read_bytes()) == len(good)
    assert not list(agent.parent.glob("*.part-*"))


def test_an_intact_agent_built_by_another_host_is_kept(sshd_server, device_profile, register_device):
    """Same agent code, other bytes (zip entries carry file times): not sent again."""
    import io
    import zipfile

    register_device(sshd_server, "loop-keep", device_profile(), "--yes")
    [agent] = (sshd_server.folder / "devices" / "loop-keep").glob("agent-*.pyz")
    rebuilt = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(agent.read_bytes())) as old, zipfile.ZipFile(rebuilt, "w") as new:
        for item in old.infolist():  # another host: the same files, other times
            item.date_time = (2001, 2, 3, 4, 5, 6)
            new.writestr(item, old.read(item.filename))
    assert len(rebuilt.getvalue()) == agent.stat().st_size
    agent.write_bytes(rebuilt.getvalue())
    before = agent.stat()
    assert _info("loop-keep")["arch"] == os.uname().machine
    assert agent.stat().st_ino == before.st_ino and agent.read_bytes() == rebuilt.getvalue()


# ------------------------------------------------------------------ item 18: a device without SFTP


def test_a_device_without_the_sftp_subsystem_is_told_as_such(tmp_path, device_profile, capsys):
    reason = sshd_missing_reason()
    if reason:
        pytest.skip(reason)
    server = Sshd(tmp_path / "sshd", sftp=False).start()
    try:
        code = main(["devices", "register", "no-sftp", "--host", "127.0.0.1", "--port", str(server.port),
                     "--user", server.user, "--key", str(server.client_key), "--profile", str(device_profile()),
                     "--python", sys.executable, "--remote-dir", str(server.folder / "devices" / "no-sftp"), "--yes"])
    finally:
        server.stop()
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.splitlines() == [(
        f"error: device 'no-sftp': the SSH server at 127.0.0.1:{server.port} offers no SFTP subsystem, which is "
        "needed to send the agent and models (enable `Subsystem sftp` in its sshd_config)")]
    assert DeviceRegistry().list() == []


# ------------------------------------------------------------------ items 5 + 19: Ray on loopback, reaped


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on an IPv6 socket
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def _exposed(procs: list[psutil.Process]) -> list[str]:
    """Every TCP listener or bound UDP socket of these processes that is not on loopback (IPv4 and IPv6)."""
    bad = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
            what = f"{proc.pid} {' '.join(proc.cmdline())[:60] or proc.name()}"
        except psutil.Error:
            continue
        for conn in conns:
            listening = conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr)
            if listening and conn.laddr and not _is_loopback(conn.laddr.ip):
                bad.append(f"{what}: {conn.laddr.ip}:{conn.laddr.port}")
    return bad


def _of_ray_tmp(ray_tmp: Path) -> list[psutil.Process]:
    """The processes of a run started with RAY_TMPDIR=ray_tmp: by environment, or (Ray's agents write their
    process title over their environment) by a file open under it; every Ray process logs there."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_TMPDIR") == str(ray_tmp) or \
                    any(f.path.startswith(str(ray_tmp)) for f in proc.open_files()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _names(procs: list[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        try:
            out.append((proc.cmdline() or [proc.name()])[0].rsplit("/", 1)[-1][:40])
        except psutil.Error:
            pass
    return sorted(out)


def test_the_session_ray_listens_on_loopback_only_with_token_auth(ray_local):
    """The tests' own Ray is started as a run starts it (ray_session): every socket of it on loopback."""
    me = psutil.Process()
    family = [me, *me.children(recursive=True)]
    assert "raylet" in _names(family) and "gcs_server" in _names(family)
    assert _exposed(family) == []
    assert {node["NodeManagerAddress"] for node in ray_local.nodes()} == {"127.0.0.1"}
    raylet = next(p for p in family if _names([p]) == ["raylet"])
    assert raylet.environ().get("RAY_AUTH_MODE") == "token"  # set explicitly, not Ray's default


TINY_TASK = """
from orchestrator import hookimpl
from orchestrator.testing import TinyDigitsTask


@hookimpl
def register_tasks(register):
    register(TinyDigitsTask())
"""


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory) -> dict[str, str]:
    """The environment of an `orchestrate` process with the tiny-digits task installed (a real distribution:
    a package and its .dist-info on PYTHONPATH): its base model trains in seconds, not minutes."""
    folder = tmp_path_factory.mktemp("tiny-task")
    (folder / "eo_tiny_task").mkdir()
    (folder / "eo_tiny_task" / "__init__.py").write_text(TINY_TASK)
    info = folder / "eo_tiny_task-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eo-tiny-task\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[edge_orchestrator]\ntiny-task = eo_tiny_task\n")
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


@pytest.fixture(scope="module")
def search_process(state_home, tiny_env):
    """A real `orchestrate` search in a process of its own, with a private Ray temp folder, measuring."""
    from orchestrator.state.paths import store_path
    from orchestrator.state.store import RunStore

    ray_tmp = Path(tempfile.mkdtemp(prefix="eo-ray-", dir="/tmp"))  # short: Ray's unix sockets live under it
    out = Path(tempfile.mkdtemp(prefix="eo-runs-"))
    log = (out / "stderr.txt").open("w")  # a file, not a pipe: nobody reads it while the run goes on
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "--profile", str(X86), "--task", "tiny-digits",
                             "--trials", "13", "--out", str(out)], cwd=ROOT, env={**tiny_env, "RAY_TMPDIR": str(ray_tmp)},
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        store = RunStore(store_path())  # made now if this is the session's first run
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            with sqlite3.connect(store.path) as db:
                row = db.execute("SELECT COUNT(c.id) FROM runs r JOIN candidates c ON c.run_id = r.id "
                                 "WHERE r.out_dir LIKE ?", (str(out) + "%",)).fetchone()
            if row and row[0] >= 1:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the run never stored a candidate: {(out / 'stderr.txt').read_text()[-2000:]}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    yield proc, ray_tmp
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()
    for folder in (ray_tmp, out):
        shutil.rmtree(folder, ignore_errors=True)


def test_a_runs_ray_listens_on_loopback_only(search_process):
    """Item 5: every process of a run (driver, GCS, raylet, workers, lease actors, agents) on loopback only."""
    _, ray_tmp = search_process
    family = _of_ray_tmp(ray_tmp)
    names = _names(family)
    assert {"gcs_server", "raylet", "ray::RuntimeEnvAgent", "ray::DashboardAgent"} <= set(names), names
    assert any(n.startswith("ray::DeviceLease") for n in names), names
    assert _exposed(family) == []


def test_nothing_of_a_run_outlives_a_kill_9_by_more_than_10_s(search_process):
    """Item 19: the driver SIGKILLed mid-search; within 10 s no process of its Ray is left (agents included)."""
    proc, ray_tmp = search_process
    assert proc.poll() is None
    before = _names(_of_ray_tmp(ray_tmp))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _of_ray_tmp(ray_tmp):
        time.sleep(0.2)
    left = _of_ray_tmp(ray_tmp)
    assert left == [], f"left running 10 s after kill -9: {_names(left)} (of {before})"


# ------------------------------------------------------------------ item 10: a Ray address where no Ray answers


def test_a_ray_address_where_nothing_answers_fails_fast_in_one_line(tmp_path, tiny_env):
    from orchestrator.state.paths import store_path
    from orchestrator.state.store import RunStore

    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "--profile", str(X86), "--task", "tiny-digits",
                           "--trials", "1", "--ray-address", "127.0.0.1:1", "--out", str(tmp_path)], cwd=ROOT,
                          env=tiny_env, capture_output=True, text=True, timeout=300, check=False)
    took = time.monotonic() - started
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert err[-1] == "error: cannot join the Ray cluster at 127.0.0.1:1: connection refused", err
    assert not [line for line in err if "rpc_client" in line or "gcs_client" in line]  # no Ray C++ retries
    [folder] = tmp_path.iterdir()
    run = RunStore(store_path()).get_run(folder.name)
    assert run["status"] == "failed" and run["message"] == "cannot join the Ray cluster at 127.0.0.1:1: connection refused"
    assert json.loads((folder / "results.json").read_text())["status"] == "failed"
    assert took < 180  # the base model (cached, or trained now), then at once: it hung over 300 s


def test_joining_waits_at_most_about_30_s_for_a_port_that_is_not_ray():
    """A port that accepts but never speaks Ray's protocol: bounded by Ray's own attempt settings."""
    code = textwrap.dedent("""
        import socket, sys, threading, time
        from orchestrator.search import searcher  # the quiet environment, before Ray
        from orchestrator.search.ray_runtime import ray_session
        from orchestrator.errors import OrchestratorError
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        threading.Thread(target=lambda: [server.accept() for _ in range(100)], daemon=True).start()
        started = time.monotonic()
        try:
            with ray_session(f"127.0.0.1:{port}"):
                print("joined?!")
        except OrchestratorError as exc:
            print(round(time.monotonic() - started), exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, check=False)
    took, _, message = proc.stdout.strip().partition(" ")
    assert message.startswith("cannot join the Ray cluster at 127.0.0.1:"), proc.stdout + proc.stderr[-2000:]
    assert int(took) <= 40


def test_a_port_that_answers_but_is_not_ray_is_said_to_be_no_ray_cluster(ray_local, tmp_path):
    """Issue 31 item 15: a port that answers but is not Ray was 8 lines about a missing authentication token.
    A silent server is no Ray cluster; a real Ray (the session's) joined without its token is told where one goes."""
    gcs = ray_local.get_runtime_context().gcs_address
    code = textwrap.dedent("""
        import socket, sys, threading
        from orchestrator.search import searcher  # the quiet environment, before Ray
        from orchestrator.search.ray_runtime import ray_session
        from orchestrator.errors import OrchestratorError
        server = socket.create_server(("127.0.0.1", 0))
        silent = server.getsockname()[1]
        threading.Thread(target=lambda: [server.accept() for _ in range(100)], daemon=True).start()
        for address in (f"127.0.0.1:{silent}", sys.argv[1]):
            try:
                with ray_session(address):
                    print("joined?!")
            except OrchestratorError as exc:
                print(exc)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    proc = subprocess.run([sys.executable, "-c", code, gcs], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HOME": str(tmp_path)},
                          check=False)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout + proc.stderr[-2000:]
    assert lines[0].startswith("cannot join the Ray cluster at 127.0.0.1:") and lines[0].endswith(
        ": not a Ray cluster (the port answers but does not speak Ray's protocol, gRPC)"), lines
    assert lines[1] == (f"cannot join the Ray cluster at {gcs}: it needs an authentication token (token auth is on): "
                        "put the cluster's token in $RAY_AUTH_TOKEN or in ~/.ray/auth_token ($RAY_AUTH_TOKEN_PATH "
                        "names another file), or set RAY_AUTH_MODE=disabled to join a cluster without tokens"), lines


# ------------------------------------------------------------------ item 4: one local core, two runs


CHILD_MEASURES = """
import json, sys, time
from pathlib import Path
from orchestrator.devices.base import Device
from orchestrator.devices.local import LocalTransport
from orchestrator.config.profile import Profile
profile = Profile.model_validate({
    "name": "lock-test", "hardware": {"arch": "x86_64", "cpu": "test", "cores": 2, "memory_mb": 1024},
    "objective": {"metric": "latency_p50"},
    "measurement": {"warmup_runs": 3, "runs": 100000, "time_budget_s": 1.0},
    "power": {"idle_watts": 1.0, "active_watts": 2.0, "source": "test profile, not a real board"},
})
model, go = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2])
transport = LocalTransport(Device(name="local:lock-test", transport="local", arch="x86_64", pinned_cpu=1))
while not go.exists():
    time.sleep(0.005)
windows = []
for _ in range(3):
    result = transport.bench(model, profile)
    windows.append((result["started_at"], result["finished_at"]))
print(json.dumps(windows))
"""


def test_two_processes_never_measure_on_the_same_local_core_at_once(tmp_path, eo_tiny_onnx):
    """Item 4: two runs on one state folder (two real processes) take turns on the pinned core."""
    model = tmp_path / "tiny.onnx"
    model.write_bytes(eo_tiny_onnx().SerializeToString())
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_MEASURES, str(model), str(go)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(3)  # both imported and waiting
    go.touch()
    windows = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        windows += json.loads(out.strip().splitlines()[-1])
    windows.sort()
    overlaps = [(a, b) for a, b in itertools.pairwise(windows) if b[0] < a[1]]
    assert len(windows) == 6 and overlaps == [], "two processes measured on one core at once"


def test_a_build_folder_left_by_a_killed_process_is_removed_by_the_next_one():
    """A trial killed mid-build (kill -9) leaves its scratch folder; the next process's first build removes it.

    A folder whose process still runs, one not named with a pid, and one of another pid namespace
    (a container sharing /tmp: its pid means nothing here) are left alone.
    """
    from orchestrator.state.paths import _pid_namespace, scratch_dir

    ns = _pid_namespace()

    prefix = f"eo-test-scratch-{os.getpid()}x-"  # a prefix of this test alone (the sweep is once per process)
    code = ("import sys, time; from orchestrator.state.paths import scratch_dir\n"
            f"held = scratch_dir({prefix!r}); d = held.name\n"
            "open(d + '/model.onnx', 'wb').write(b'x' * 1000); print(d, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    left = Path(proc.stdout.readline().strip())
    assert (left / "model.onnx").is_file() and left.name.startswith(f"{prefix}{ns}.{proc.pid}-")
    proc.kill()
    proc.wait(timeout=30)
    assert left.is_dir()  # what a kill -9 leaves
    live = Path(tempfile.mkdtemp(prefix=f"{prefix}{ns}.{os.getpid()}-"))
    unnamed = Path(tempfile.mkdtemp(prefix=f"{prefix}notapid-"))
    elsewhere = Path(tempfile.mkdtemp(prefix=f"{prefix}{ns}0.{proc.pid}-"))  # the dead pid, in another namespace
    try:
        with scratch_dir(prefix) as mine:
            assert Path(mine).name.startswith(f"{prefix}{ns}.{os.getpid()}-")
            assert not left.exists() and live.is_dir() and unnamed.is_dir() and elsewhere.is_dir()
        assert not Path(mine).exists()
    finally:
        for path in (live, unnamed, left, elsewhere):
            shutil.rmtree(path, ignore_errors=True)


# ================================================================== issue 31: hardening, third round


def _orchestrate(*args: str, home: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120,
                 stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """`orchestrate ARGS` as a process of its own, stdin not a terminal (a script's, cron's), on a state folder."""
    env = dict(env or os.environ)
    if home is not None:
        env["EDGE_ORCHESTRATOR_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=stdin)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ item 3: cache clear without a terminal


def test_cache_clear_without_a_terminal_or_yes_removes_nothing(tmp_path):
    home = tmp_path / "home"
    entry = home / "cache" / "stages" / "s1.json"
    entry.parent.mkdir(parents=True)
    entry.write_text("{}")
    done = _orchestrate("cache", "clear", home=home)
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr) == ("error: cache clear asks before removing, and stdin is not a terminal: "
                                      "pass --yes to remove without asking (nothing removed)")
    assert entry.is_file()
    done = _orchestrate("cache", "clear", "--yes", home=home)
    assert done.returncode == 0, done.stderr
    assert "removed 1 entries" in done.stdout and not entry.exists()


# ------------------------------------------------------------------ item 2: a state folder this user may not write


def _without_root_powers() -> list[str]:
    """The prefix that runs a command as this user without root's power to ignore file modes (root: setpriv
    drops CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH/CAP_FOWNER, so a mode of 0555 binds it as it binds anyone)."""
    if os.getuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and no setpriv to drop root's file-mode override")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def _stores(home: Path) -> None:
    from orchestrator.state.store import RunStore

    RunStore(home / "runs.sqlite").start_run("20250101-000000-x86-host-aaaaaa", "x86-host", str(X86), "digits",
                                             str(home / "out"))
    DeviceRegistry(home / "registry.sqlite")


@pytest.mark.parametrize(("name", "command"), [("runs.sqlite", ["runs", "list"]),
                                               ("registry.sqlite", ["devices", "list"])])
def test_a_read_only_state_folder_is_said_to_be_read_only_not_damaged(tmp_path, name, command):
    prefix = _without_root_powers()
    home = tmp_path / "home"
    _stores(home)
    home.chmod(0o555)
    try:
        done = subprocess.run([*prefix, sys.executable, "-m", "orchestrator", *command], cwd=ROOT,
                              env={**os.environ, "EDGE_ORCHESTRATOR_HOME": str(home)}, capture_output=True,
                              text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    finally:
        home.chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr) == (
        f"error: {home / name}: read-only: its folder {home} is not writable by this user (SQLite writes its "
        "journal beside it); the file is left as it is (give this user write access)")
    assert "move it away" not in done.stderr
    assert sqlite3.connect(home / name).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_an_unreadable_store_is_said_to_be_unreadable_not_damaged(tmp_path):
    prefix = _without_root_powers()
    home = tmp_path / "home"
    _stores(home)
    (home / "runs.sqlite").chmod(0)
    try:
        done = subprocess.run([*prefix, sys.executable, "-m", "orchestrator", "runs", "show", "2025"], cwd=ROOT,
                              env={**os.environ, "EDGE_ORCHESTRATOR_HOME": str(home)}, capture_output=True,
                              text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    finally:
        (home / "runs.sqlite").chmod(0o644)
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr) == (f"error: {home / 'runs.sqlite'}: permission denied: the file is not readable "
                                      "by this user (mode 0000); the file is left as it is")


# ------------------------------------------------------------------ item 12: a run id of 100,000 characters


@pytest.mark.parametrize("command", [["runs", "show", "HUGE"], ["runs", "compare", "HUGE", "2025"]])
def test_a_huge_run_id_is_one_short_line_and_a_usage_error(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("EDGE_ORCHESTRATOR_HOME", str(tmp_path / "home"))
    assert main([("2" * 100_000 if arg == "HUGE" else arg) for arg in command]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "an id of 100000 characters names nothing (ids are at most 1000)" in line, line[:300]
    assert len(line) < 300


# ------------------------------------------------------------------ item 13: stored rows that are not JSON


def _damaged_run(home: Path, run_id: str) -> None:
    """A run with two candidates in the store, then its device, its options and one candidate overwritten
    with text that is not JSON (a disk fault, a hand edit, a writer of another version)."""
    from orchestrator.state.store import RunStore

    store = RunStore(home / "runs.sqlite")
    store.start_run(run_id, "x86-host", str(X86), "digits", str(home / "out" / run_id), options={"trials": 2})
    for cid in ("c000", "c001"):
        store.add_candidate(run_id, {"id": cid, "status": "ok", "pipeline": [], "feasible": True,
                                     "metrics": {"accuracy": 0.9, "size_bytes": 2048, "latency_ms": {"p50": 1.0}}})
    store.finish_run(run_id, "interrupted", best_id="c000")  # stopped: --resume would take it up
    with sqlite3.connect(home / "runs.sqlite") as db:
        db.execute("UPDATE runs SET device = '{\"name\": ', options = 'NaN-ish' WHERE id = ?", (run_id,))
        db.execute("UPDATE candidates SET record = '{truncated' WHERE run_id = ? AND id = 'c001'", (run_id,))


def test_a_damaged_run_row_is_shown_as_damaged_and_the_rest_goes_on(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_ORCHESTRATOR_HOME", str(home))
    _damaged_run(home, "20250101-000000-x86-host-aaaaaa")
    _damaged_run(home, "20250101-000000-x86-host-bbbbbb")
    assert main(["runs", "show", "20250101-000000-x86-host-a"]) == 0
    out, err = capsys.readouterr()
    assert "internal error" not in err and "c000" in out and "c001" in out and "(damaged record)" in out
    assert "warning: run 20250101-000000-x86-host-aaaaaa: damaged in the run store: device: not valid JSON" in err
    assert "candidate c001: not valid JSON" in err
    assert main(["runs", "show", "20250101-000000-x86-host-a", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [c["status"] for c in shown["candidates"]] == ["ok", "damaged"] and shown["device"] is None
    assert main(["runs", "compare", "20250101-000000-x86-host-a", "20250101-000000-x86-host-b"]) == 0
    out, err = capsys.readouterr()
    assert "internal error" not in err and "same pick" in out and "damaged in run A" in out
    assert main(["--resume", "20250101-000000-x86-host-a"]) == 2
    assert "damaged in the run store" in _one_line(capsys.readouterr().err)


def test_a_damaged_registry_row_is_shown_as_damaged_and_the_rest_goes_on(tmp_path, monkeypatch, capsys):
    from orchestrator.devices.registry import RegisteredDevice

    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_ORCHESTRATOR_HOME", str(home))
    registry = DeviceRegistry()
    for name in ("pi-a", "pi-b"):
        registry.add(RegisteredDevice(
            name=name, host="10.0.0.1", port=22, user="pi", key_path=None,
            host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
            profile="x86-host", profile_path=str(X86), tags=["lab"], info={"arch": "x86_64"}))
    with sqlite3.connect(registry.path) as db:
        db.execute("UPDATE devices SET tags = '[\"lab\"', info = 'not json' WHERE name = 'pi-a'")
    assert main(["devices", "list"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "pi-a" in out and "damaged" in out and "pi-b" in out and "online" in out
    assert main(["devices", "list", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert listed["pi-a"]["status"] == "damaged" and listed["pi-b"]["tags"] == ["lab"]
    assert main(["devices", "show", "pi-a"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "status:         damaged: its registry row is damaged: tags not valid JSON" in out, out


# ------------------------------------------------------------------ item 17: one line, whatever its length


def test_a_long_error_line_is_one_line_when_stderr_is_not_a_terminal(tmp_path, tiny_env):
    """A real tiny run in which no candidate meets the profile (a latency limit nothing meets): its error,
    far over 80 columns, is the last line of stderr, whole, and the exit code is 3."""
    profile = tmp_path / "strict.yaml"
    profile.write_text(X86.read_text().replace("max_latency_ms: 20 ", "max_latency_ms: 0.000001 "))
    done = subprocess.run([sys.executable, "-m", "orchestrator", "--profile", str(profile), "--task", "tiny-digits",
                           "--trials", "1", "--out", str(tmp_path / "runs")], cwd=ROOT,
                          env={**tiny_env, "COLUMNS": "80"}, capture_output=True, text=True, timeout=400,
                          check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 3, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "latency" in last and len(last) > 100, done.stderr[-3000:]


# ------------------------------------------------------------------ item 18: a relative $XDG_DATA_HOME


@pytest.mark.parametrize("xdg", ["rel/data", "", None])
def test_a_relative_xdg_data_home_is_ignored(tmp_path, monkeypatch, xdg):
    from orchestrator.state.paths import state_dir, store_path

    monkeypatch.delenv("EDGE_ORCHESTRATOR_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    if xdg is None:
        monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_DATA_HOME", xdg)
    monkeypatch.chdir(tmp_path)
    assert state_dir() == tmp_path / "user" / ".local" / "share" / "edge-orchestrator"
    assert store_path().parent == state_dir() and not (tmp_path / "rel").exists()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "abs"))
    assert state_dir() == tmp_path / "abs" / "edge-orchestrator"


# ------------------------------------------------------------------ item 19: a device Python with a space in its path


def test_a_device_python_whose_path_has_a_space_runs(sshd_server, device_profile, register_device, tmp_path):
    """`--python "/opt/my py/bin/python"`: one path, quoted where the remote command is built (it was split
    at the space: `/bin/sh: /opt/my: not found`). The interpreter is a real one behind a path with a space."""
    folder = tmp_path / "my py" / "bin"
    folder.mkdir(parents=True)
    python = folder / "python"
    python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    python.chmod(0o755)
    out = register_device(sshd_server, "loop-space", device_profile(), "--python", str(python), "--yes")
    assert "registered loop-space" in out  # the last --python given wins (click)
    assert DeviceRegistry().get("loop-space").python == str(python)
    assert _info("loop-space")["arch"] == os.uname().machine


# ------------------------------------------------------------------ item 4: SIGTERM to a run, and runs whose process is gone


def test_a_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, tiny_env):
    """A real run (tiny task, real local Ray) sent SIGTERM once it has stored a candidate: it keeps its
    candidates, is marked interrupted (so --resume takes it up), and exits 143 with one line saying so; no
    Ray core dump, never left `running`."""
    from orchestrator.state.paths import store_path
    from orchestrator.state.store import RunStore

    ray_tmp = Path(tempfile.mkdtemp(prefix="eo-ray-", dir="/tmp"))
    out = tmp_path / "runs"
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "--profile", str(X86), "--task", "tiny-digits",
                             "--trials", "13", "--out", str(out)], cwd=ROOT, env={**tiny_env, "RAY_TMPDIR": str(ray_tmp)},
                            stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
    try:
        store = RunStore(store_path())
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            with sqlite3.connect(store.path) as db:
                row = db.execute("SELECT r.id, COUNT(c.id) FROM runs r JOIN candidates c ON c.run_id = r.id "
                                 "WHERE r.out_dir LIKE ? GROUP BY r.id", (str(out) + "%",)).fetchone()
            if row and row[1] >= 1:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the run never stored a candidate: {(tmp_path / 'stderr.txt').read_text()[-2000:]}")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    err = (tmp_path / "stderr.txt").read_text()
    run = store.get_run(row[0])
    assert code == 143, err[-3000:]
    assert run["status"] == "interrupted" and len(run["candidates"]) >= 1, (run["status"], err[-3000:])
    assert err.strip().splitlines()[-1] == (f"terminated (SIGTERM): {len(run['candidates'])} candidates kept in run "
                                            f"{run['id']}; go on with: orchestrate --resume {run['id']}")
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-3000:]
    assert json.loads((out / run["id"] / "results.json").read_text())["status"] == "interrupted"


def test_a_run_whose_process_is_gone_is_never_shown_running(tmp_path, monkeypatch, capsys):
    from orchestrator.state.store import RunStore

    monkeypatch.setenv("EDGE_ORCHESTRATOR_HOME", str(tmp_path / "home"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid whose process has ended (what kill -9 or a crash leaves in the store)
    store = RunStore(tmp_path / "home" / "runs.sqlite")
    store.start_run("20250101-000000-x86-host-dead00", "x86-host", str(X86), "digits", str(tmp_path / "out"))
    store.start_run("20250101-000000-x86-host-live00", "x86-host", str(X86), "digits", str(tmp_path / "out"))
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET pid = ? WHERE id LIKE '%dead00'", (gone.pid,))
    host = socket.gethostname()
    assert main(["runs", "list"]) == 0
    listed = capsys.readouterr().out
    assert "stopped" in listed and listed.count("running") == 1, listed  # the live one only
    assert main(["runs", "show", "20250101-000000-x86-host-dead"]) == 0
    assert (f"status stopped: its process (pid {gone.pid} on {host}) is gone; orchestrate --resume "
            "20250101-000000-x86-host-dead00 goes on") in capsys.readouterr().out
    assert main(["runs", "show", "20250101-000000-x86-host-live"]) == 0  # this process: alive
    assert f"status running (pid {os.getpid()} on {host})" in capsys.readouterr().out
    assert main(["runs", "show", "20250101-000000-x86-host-dead", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["owner_alive"] is False


# ------------------------------------------------------------------ item 14: a store locked by another process


HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA locking_mode=EXCLUSIVE")
db.execute("BEGIN EXCLUSIVE")
db.execute("UPDATE runs SET status = status")
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("command", [["runs", "list"], ["runs", "show", "2025"]])
def test_a_store_locked_by_another_process_is_one_line_naming_it(tmp_path, command):
    """Issue 31 item 14: a runs.sqlite another process holds locked past the busy timeout was
    `internal error: OperationalError: database is locked`; it is one line naming the file and the holder, exit 1."""
    home = tmp_path / "home"
    _stores(home)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(home / "runs.sqlite")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "orchestrator", *command], cwd=ROOT,
                              env={**os.environ, "EDGE_ORCHESTRATOR_HOME": str(home),
                                   "EDGE_ORCHESTRATOR_BUSY_TIMEOUT_S": "2"},
                              capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1, done.stderr
    line = _one_line(done.stderr)
    assert line.startswith(f"error: {home / 'runs.sqlite'}") and f"locked by another process (pid {holder.pid} (python" in line
    assert line.endswith("for more than 2 s; try again when it is done"), line
    assert took < 60


# ------------------------------------------------------------------ item 22: training the base model shows progress


class _ProgressRecorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    @hookimpl
    def base_model_progress(self, run_id, task, epoch, epochs, elapsed_s, left_s):
        self.events.append((run_id, task, epoch, epochs, elapsed_s, left_s))


def test_training_the_base_model_sends_base_model_progress_after_each_epoch(tmp_path, monkeypatch):
    """Issue 31 item 22: the base model trained for minutes with nothing said between 'loading' and 'ready'."""
    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.search.basemodel import get_base_model, progress_events
    from orchestrator.testing import TinyDigitsTask

    monkeypatch.setenv("EDGE_ORCHESTRATOR_HOME", str(tmp_path / "home"))  # nothing cached: it trains now
    registry, recorder = get_plugin_manager(), _ProgressRecorder()
    registry.add_plugin(recorder, "progress-recorder")
    task = TinyDigitsTask()
    base = get_base_model(task, task.load_data(0), 0, progress_events(registry, "r1", task.name))
    assert base.trained_now
    assert [e[:4] for e in recorder.events] == [("r1", "tiny-digits", i, 5) for i in range(1, 6)]
    assert all(e[4] >= 0 for e in recorder.events) and recorder.events[-1][5] == 0.0
    assert all(left is not None and left >= 0 for *_, left in recorder.events)
    recorder.events.clear()
    get_base_model(task, task.load_data(0), 0, progress_events(registry, "r2", task.name))
    assert recorder.events == []  # from the cache: no training, no progress


def test_the_terminal_shows_the_base_models_epochs_and_time_left(tmp_path, tiny_env):
    home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "--profile", str(X86), "--task", "tiny-digits",
                           "--trials", "1", "--ray-address", "127.0.0.1:1", "--out", str(tmp_path / "runs")], cwd=ROOT,
                          env={**tiny_env, "EDGE_ORCHESTRATOR_HOME": str(home)}, capture_output=True, text=True,
                          timeout=300, check=False)
    lines = [line.split("] ", 1)[-1] for line in proc.stderr.splitlines() if "training the base model" in line]
    assert len(lines) == 5, proc.stderr[-3000:]
    assert lines[0].startswith("training the base model: epoch 1/5, ") and " s so far, about " in lines[0]
    assert lines[-1].startswith("training the base model: epoch 5/5, ") and "left" not in lines[-1]


# ------------------------------------------------------------------ item 5: a full disk during a run


def test_a_full_disk_under_out_fails_the_run_in_one_line_naming_the_folder(tmp_path, tiny_env):
    """Issue 31 item 5: --out on a real 1 MB tmpfs filled to the last byte. It was `internal error: OSError: [Errno 28]`
    with the run left `running` and a half-written results.json; now one line naming the run's folder, exit 1, the
    run stored `failed` with that line, no half-written file left, and `runs list` reads."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.getuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                          capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and a kernel that lets this container mount)")
    try:
        (disk / "runs").mkdir()
        with open(disk / "filler", "wb") as fh:  # fill it
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
        env = {**tiny_env, "EDGE_ORCHESTRATOR_HOME": str(tmp_path / "home")}
        done = subprocess.run([sys.executable, "-m", "orchestrator", "--profile", str(X86), "--task", "tiny-digits",
                               "--trials", "1", "--ray-address", "127.0.0.1:1", "--out", str(disk / "runs")], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 1, done.stderr[-2000:]
        [folder] = (disk / "runs").iterdir()
        last = done.stderr.strip().splitlines()[-1]
        assert last == (f"error: {folder}: no space left on the device (samples.npz could not be written); the run "
                        "is marked failed: free some space and run again"), done.stderr[-2000:]
        assert "internal error" not in done.stderr and "wrote " not in done.stderr
        assert list(folder.iterdir()) == []  # nothing half-written
        (disk / "filler").unlink()  # space is back: the store says what happened
        listed = subprocess.run([sys.executable, "-m", "orchestrator", "runs", "show", folder.name], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert listed.returncode == 0 and "failed" in listed.stdout and "no space left" in listed.stdout, listed
        assert subprocess.run([sys.executable, "-m", "orchestrator", "runs", "list"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120, check=False).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


FILL_AT_FIRST_CANDIDATE = """
import contextlib, os
from orchestrator import hookimpl
from orchestrator.testing import TinyDigitsTask


@hookimpl
def register_tasks(register):
    register(TinyDigitsTask())


@hookimpl
def candidate_measured(run_id, candidate):
    # the test's own plugin fills the state folder's real tmpfs to the last byte, once the run is under way
    with open(os.path.join(os.environ["EDGE_ORCHESTRATOR_HOME"], "filler"), "ab") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\\0" * 65536)
            fh.flush()
"""


def test_a_full_state_folder_during_a_run_fails_it_in_one_line_and_the_store_still_reads(tmp_path):
    """Issue 31 item 5, the state folder: its disk (a real 16 MB tmpfs) fills while a run measures. It was
    `internal error: OperationalError: disk I/O error` (or Ray Tune's wrapped traceback), the run left `running`,
    `runs list` failing. Now one line naming the folder, exit 1; the run is stored `failed` with that line (the
    store gives up its ballast file to close it), and once space is back `runs show` and `runs list` read."""
    home = tmp_path / "home"
    home.mkdir()
    if os.getuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(home)],
                                          capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and a kernel that lets this container mount)")
    try:
        pkg = tmp_path / "pkg"
        (pkg / "eo_fill").mkdir(parents=True)
        (pkg / "eo_fill" / "__init__.py").write_text(FILL_AT_FIRST_CANDIDATE)
        info = pkg / "eo_fill-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eo-fill\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[edge_orchestrator]\nfill = eo_fill\n")
        env = {**os.environ, "EDGE_ORCHESTRATOR_HOME": str(home), "PYTHONPATH": str(pkg),
               "RAY_TMPDIR": tempfile.mkdtemp(prefix="eo-ray-", dir="/tmp")}
        out = tmp_path / "runs"
        done = subprocess.run([sys.executable, "-m", "orchestrator", "--profile", str(X86), "--task", "tiny-digits",
                               "--trials", "3", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 1, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {home}: no space left on the device ("), done.stderr[-3000:]
        assert "internal error" not in done.stderr and "Traceback" not in done.stderr
        [folder] = out.iterdir()
        assert json.loads((folder / "results.json").read_text())["status"] == "failed"  # the run's data is kept
        (home / "filler").unlink()  # space is back
        shown = subprocess.run([sys.executable, "-m", "orchestrator", "runs", "show", folder.name], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120, check=False)
        assert shown.returncode == 0 and "failed" in shown.stdout and "no space left" in shown.stdout, shown
        assert "running" not in shown.stdout
        assert subprocess.run([sys.executable, "-m", "orchestrator", "runs", "list"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120, check=False).returncode == 0
        with open(home / "filler", "wb") as fh, contextlib.suppress(OSError):  # full before a command starts
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        (home / "runs.sqlite-wal").unlink(missing_ok=True)
        listed = subprocess.run([sys.executable, "-m", "orchestrator", "devices", "list"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert "internal error" not in listed.stderr and "Traceback" not in listed.stderr, listed.stderr
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)
