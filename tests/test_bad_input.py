"""Bad input gets one clear line naming the file or the field and the documented exit code (issue 16).

Every test drives the real `orchestrate` entry (`orchestrator.cli.main.main([...])` in-process, or
`python -m orchestrator` where the process's environment matters) on real files in a state folder
of its own. Exit codes: 0 ok, 1 error, 2 usage/bad input (docs in ../shared/STYLE.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.cli.main import main
from orchestrator.config.profile import MAX_YAML_BYTES, load_profile
from orchestrator.devices.registry import DeviceRegistry, RegisteredDevice
from orchestrator.errors import ProfileError
from orchestrator.state.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
X86 = ROOT / "device_profiles" / "x86-host.yaml"
ESC = "\x1b"
EVIL = "../../evil name;$(id)\x1b[31mRED"
RUN_ID = "20250101-000000-x86-host-abc123"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state folder of this test's own (no runs, no devices)."""
    path = tmp_path / "home"
    monkeypatch.setenv("EDGE_ORCHESTRATOR_HOME", str(path))
    return path


def _one_error_line(err: str) -> str:
    """The CLI's error output is one line (no traceback, no internal error); returns it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    return lines[0]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`orchestrate ARGS` as its own process (for what a process's environment decides: the browser)."""
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _stored_run(home: Path, results: dict | None = None, report: bool = False) -> Path:
    """A finished run in the store, with the folder it wrote (results.json and report.html as asked)."""
    out = home.parent / "runs" / RUN_ID
    out.mkdir(parents=True)
    if results is not None:
        (out / "results.json").write_text(json.dumps(results))
    if report:
        (out / "report.html").write_text("<html><body>report</body></html>")
    store = RunStore(home / "runs.sqlite")
    store.start_run(RUN_ID, "x86-host", str(X86), "digits", str(out))
    store.finish_run(RUN_ID, "finished", best_id="c1")
    return out


# ------------------------------------------------------------ 6. terminal escapes from devices and plugins


def _inventory(tmp_path: Path, host: str) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(textwrap.dedent(f"""\
        all:
          hosts:
            {json.dumps(host)}:
              ansible_host: 127.0.0.1
              edge_profile: {X86}
        """))
    return path


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_inventory_host_named_with_a_terminal_escape_is_refused(home, tmp_path, capsys, dry_run):
    inventory = _inventory(tmp_path, EVIL)
    code = main(["devices", "import", str(inventory), *(["--dry-run"] if dry_run else []), "--yes"])
    out, err = capsys.readouterr()
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith(f"error: {inventory}:3: host ") and "not a device name" in line, line
    assert "\\x1b[31mRED" in line  # shown escaped, never sent to the terminal
    assert ESC not in out + err
    assert DeviceRegistry().list() == []


def test_a_device_named_before_the_rule_is_listed_and_shown_escaped(home, capsys):
    """A registry written before imports were checked (or by hand): what the device and the inventory
    said is printed with its control characters escaped, the table's `[...]` as text."""
    DeviceRegistry().add(RegisteredDevice(
        name=EVIL, host="10.0.0.1\x1b]0;pwned\x07", port=22, user="pi\x1b[2J", key_path=None,
        host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
        profile="x86-host", profile_path=str(X86), tags=["[red]tag\x1b[0m"], arch="x86_64\x1b[5m",
        info={"arch": "x86_64", "cpu_model": "cpu\x1b[31m", "cores": 4, "providers": ["CPU\x1b[1m"]},
        status="offline", status_reason="agent said \x1b[31mno\u202e"))
    assert main(["devices", "list"]) == 0
    listed, _ = capsys.readouterr()
    assert main(["devices", "show", EVIL]) == 0
    shown, _ = capsys.readouterr()
    for out in (listed, shown):
        assert ESC not in out and "\x07" not in out and "\u202e" not in out, out
    assert "evil name;$(id)\\x1b[31mRED" in shown and "agent said \\x1b[31mno\\u202e" in shown
    assert "cpu\\x1b[31m" in shown and "pi\\x1b[2J@10.0.0.1\\x1b]0;pwned\\x07:22" in shown
    assert "[red]tag" in listed  # rich markup in a tag is shown, not obeyed


def test_a_plugin_with_escapes_in_its_version_and_error_is_listed_escaped(tmp_path):
    """A real entry-point plugin (a dist-info on PYTHONPATH) whose version and import error carry escapes."""
    site = tmp_path / "site"
    dist = site / "evil_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-plugin\nVersion: 1.0\x1b[31mRED\n")
    (dist / "entry_points.txt").write_text("[edge_orchestrator]\nevil = evil_plugin_mod\n")
    (site / "evil_plugin_mod.py").write_text(
        'raise ImportError("boom \\x1b]0;owned\\x07 \\x1b[2J gone")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    done = _cli("plugins", env=env)
    assert done.returncode == 0, done.stderr
    assert "evil" in done.stdout and "broken" in done.stdout
    assert ESC not in done.stdout and "\x07" not in done.stdout, done.stdout
    assert "\\x1b" in done.stdout


# ------------------------------------------------------------------------- 11. --ray-address, up front


def test_a_ray_address_that_is_no_address_is_refused_before_anything_loads(home, capsys):
    started = time.monotonic()
    code = main(["--ray-address", "not-an-address", "--profile", str(X86), "--trials", "1"])
    took = time.monotonic() - started
    _, err = capsys.readouterr()
    assert code == 2
    assert "Error: Invalid value for '--ray-address': 'not-an-address': give host:port" in err
    assert "internal error" not in err
    assert took < 5  # nothing was loaded: no plugin, no base model, no Ray
    assert not (home / "runs.sqlite").exists() or RunStore(home / "runs.sqlite").list_runs() == []


@pytest.mark.parametrize("address", ["auto", "127.0.0.1:6379", "head-node.lan:6379", "ray://head:10001",
                                     "[::1]:6379"])
def test_ray_address_forms_that_ray_takes_pass_the_check(address):
    from orchestrator.cli.main import _ray_address

    assert _ray_address(None, None, address) == address  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["127.0.0.1", "host:0", "host:99999", "http://h:1", "ray://", "a b:1"])
def test_ray_address_forms_that_ray_does_not_take_are_refused(address, capsys):
    assert main(["--ray-address", address, "--profile", str(X86)]) == 2
    assert "Invalid value for '--ray-address'" in capsys.readouterr().err


# ---------------------------------------------------------------------- 12. inventories, validated


INVENTORIES = {
    "a port that is no number": ("all:\n  hosts:\n    pi-1:\n      ansible_port: abc\n", 4,
                                 "all.hosts.pi-1.ansible_port: Input should be a valid integer"),
    "vars a list": ("all:\n  vars: [a, b]\n  hosts:\n    pi-1:\n", 2, "all.vars: expected a mapping, got a list"),
    "hosts a list": ("all:\n  hosts: [pi-1, pi-2]\n", 2, "all.hosts: expected a mapping, got a list"),
    "host vars a scalar": ("all:\n  hosts:\n    pi-1: 5\n", 3, "all.hosts.pi-1: expected a mapping, got a number"),
    "children a list": ("all:\n  children: [rpi4]\n", 2, "all.children: expected a mapping, got a list"),
    "a self-referencing anchor": ("all: &top\n  children:\n    loop: *top\n", 3,
                                  "all.children.loop: an alias inside its own anchor"),
    "a port that is true": ("all:\n  hosts:\n    pi-1:\n      ansible_port: true\n", 4,
                            "all.hosts.pi-1.ansible_port: expected a port number, not true"),
    "edge_tags a string": ("all:\n  hosts:\n    pi-1:\n      edge_tags: lab\n", 4,
                           "all.hosts.pi-1.edge_tags: expected a list, got a string"),
    "an unknown group key": ("all:\n  host:\n    pi-1:\n", 2, "all.host: unknown field"),
    "a host given twice": ("all:\n  hosts:\n    pi-1:\n    pi-1:\n", 4, "all.hosts.pi-1: duplicate key (first on line 3)"),
}


@pytest.mark.parametrize("case", list(INVENTORIES))
def test_a_malformed_inventory_is_one_line_naming_file_line_and_field(home, tmp_path, capsys, case):
    text, line, message = INVENTORIES[case]
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(text)
    assert main(["devices", "import", str(inventory), "--dry-run"]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert err.startswith(f"error: {inventory}:{line}: {message}"), err


def test_a_binary_file_as_inventory_is_one_line(home, tmp_path, capsys):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert main(["devices", "import", str(inventory), "--dry-run"]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert err.startswith(f"error: {inventory}:1: (YAML): not UTF-8 text"), err


# ------------------------------------------------------------------------------ 14. LIKE wildcards


@pytest.mark.parametrize("wildcard", ["%", "_", "2025%", "2025_"])
def test_a_like_wildcard_matches_no_run(home, capsys, wildcard):
    _stored_run(home, results={"profile": "x86-host", "best": None})
    assert main(["runs", "show", wildcard]) == 2
    assert _one_error_line(capsys.readouterr().err) == \
        f"error: no run with id {wildcard!r} in {home.resolve() / 'runs.sqlite'}"
    assert main(["runs", "show", RUN_ID[:8]]) == 0  # a real prefix still finds it
    assert RUN_ID in capsys.readouterr().out


def test_an_empty_run_id_matches_no_run(home, capsys):
    _stored_run(home, results={"profile": "x86-host", "best": None})
    assert main(["runs", "show", ""]) == 2
    assert "an empty run id names no run" in _one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------- 15. deploy's options, --open


@pytest.mark.parametrize("canary", ["abc", "150%", "-1", "0%"])
def test_a_bad_canary_is_a_usage_error(home, capsys, canary):
    assert main(["deploy", "X", "--canary", canary]) == 2
    err = capsys.readouterr().err
    assert f"Invalid value for '--canary': {canary!r}" in err and "internal error" not in err


@pytest.mark.parametrize("args", [["--model", "pkg.mod:make"], ["--task", "digits"], ["--trials", "3"]])
def test_search_options_without_a_profile_say_the_profile_is_missing(home, capsys, args):
    assert main(args) == 2  # not the bare help text: the line names what is missing
    err = capsys.readouterr().err
    assert f"Error: {args[0]} needs --profile PROFILE.yaml: the device profile to search for" in err


def test_resuming_a_rollout_that_no_id_names_is_a_usage_error(home, capsys):
    assert main(["deploy", "--resume", "nonsense"]) == 2
    assert "'nonsense' is neither a rollout nor a run id" in capsys.readouterr().err


def _no_browser_env(home: Path, browser: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "TERM", "BROWSER")}
    return {**env, "EDGE_ORCHESTRATOR_HOME": str(home), "BROWSER": browser}


def test_open_with_no_browser_says_so_and_fails(home):
    out = _stored_run(home, results={"profile": "x86-host", "best": None}, report=True)
    done = _cli("runs", "show", RUN_ID, "--open", env=_no_browser_env(home, str(home / "no-such-browser")))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert _one_error_line(done.stderr) == \
        f"error: no browser could be started (set $BROWSER): open {out / 'report.html'} yourself"
    assert "open" not in done.stdout


def test_open_with_a_browser_opens_the_report(home, tmp_path):
    out = _stored_run(home, results={"profile": "x86-host", "best": None}, report=True)
    browser = tmp_path / "browser.sh"
    browser.write_text(f"#!/bin/sh\necho \"$1\" > {tmp_path / 'opened.txt'}\n")
    browser.chmod(0o755)
    done = _cli("runs", "show", RUN_ID, "--open", env=_no_browser_env(home, str(browser)))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "opened.txt").read_text().strip() == (out / "report.html").resolve().as_uri()
    assert f"opened {out / 'report.html'} in the browser" in done.stdout


# ------------------------------------------------------------------ 16. the state's own files


def test_results_json_whose_best_is_a_string_is_one_line_naming_it(home, capsys):
    out = _stored_run(home, results={"profile": "x86-host", "status": "finished", "best": "c1"})
    assert main(["deploy", RUN_ID, "--dry-run"]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: {out / 'results.json'}: best: expected an object (the chosen candidate) or null, got str: "
        "not a results.json as a run writes it")


def test_a_state_folder_that_is_a_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    not_a_folder = tmp_path / "state"
    not_a_folder.write_text("I am a file")
    monkeypatch.setenv("EDGE_ORCHESTRATOR_HOME", str(not_a_folder))
    for command in (["runs", "list"], ["devices", "list"]):
        assert main(command) == 2
        assert _one_error_line(capsys.readouterr().err) == (
            f"error: {not_a_folder}: the state folder ($EDGE_ORCHESTRATOR_HOME) is not a folder (a file is in the way)")


@pytest.mark.parametrize(("name", "command"), [("runs.sqlite", ["runs", "list"]),
                                               ("registry.sqlite", ["devices", "list"])])
def test_a_store_that_is_not_a_database_is_one_line_naming_it(home, capsys, name, command):
    home.mkdir(parents=True)
    (home / name).write_bytes(b"this is not a database, it is a note\n" * 100)
    assert main(command) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: {home.resolve() / name}: not an SQLite database (file is not a database); "
        "move it away and a new one is made")


# ------------------------------------------------------------------------------------ 17. profiles


def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_a_boolean_where_a_number_belongs_is_refused(home, tmp_path, capsys):
    text = X86.read_text().replace("  trials: ", "  trials: true  # was ", 1)
    path = _profile(tmp_path, text)
    assert main(["--profile", str(path)]) == 2
    assert _one_error_line(capsys.readouterr().err) == \
        f"error: {path}:{_line(text, 'trials: true')}: search.trials: expected a whole number, not true"


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path):
    text = X86.read_text() + "name: x86-host\n"  # the same value: before, silently accepted
    path = _profile(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    first = _line(text, "name: x86-host")
    assert str(info.value) == f"{path}:{len(text.splitlines())}: name: duplicate key (first on line {first})"


def test_an_unknown_execution_provider_is_refused_naming_the_known_ones(home, tmp_path, capsys):
    text = X86.read_text().replace("[CPUExecutionProvider]", "[FooExecutionProvider]")
    path = _profile(tmp_path, text)
    assert main(["--profile", str(path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {path}:{_line(text, 'FooExecutionProvider')}: runtime.execution_providers: "
                           "unknown execution provider 'FooExecutionProvider': onnxruntime knows "
                           "CPUExecutionProvider, CUDAExecutionProvider, TensorrtExecutionProvider"), line


def test_a_profile_over_the_size_cap_is_refused_before_it_is_parsed(tmp_path):
    padding = "# " + "x" * 98 + "\n"
    text = X86.read_text() + padding * (2 * MAX_YAML_BYTES // len(padding))  # valid YAML, 2 MB
    path = _profile(tmp_path, text)
    started = time.monotonic()
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert time.monotonic() - started < 0.5
    assert str(info.value) == f"{path}: {len(text)} bytes: a profile file is at most 1024 KB"


def test_a_profile_is_parsed_once(tmp_path, monkeypatch):
    loaders = []
    real_init = yaml.SafeLoader.__init__

    def counting(self, stream):
        loaders.append(stream)
        real_init(self, stream)

    monkeypatch.setattr(yaml.SafeLoader, "__init__", counting)
    load_profile(X86)
    assert len(loaders) == 1


def test_an_alias_bomb_is_refused(tmp_path):
    bomb = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['x'] * 10)}]\n"
                   for i in range(7))  # 10**7 values from 70 in the file
    text = X86.read_text() + bomb
    path = _profile(tmp_path, text)
    started = time.monotonic()
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert time.monotonic() - started < 2
    assert str(info.value) == \
        f"{path}:{_line(text, 'l6: ')}: l6: its aliases expand to 11111111 values (at most 200000)"


# ------------------------------------------------------- 20. tests do not depend on how they were started


def test_the_ctrl_c_test_passes_with_sigint_ignored():
    """`nohup make test &` starts pytest with SIGINT ignored: the test installs the handler it needs."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_searcher.py::test_a_ctrl_c_that_python_drops_is_raised_again"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert done.returncode == 0, done.stdout[-2000:]


# ---------------------------------------------- issue 31 item 11: numbers a profile may hold, strict results.json


@pytest.mark.parametrize(("field", "value", "message"), [
    ("active_watts", ".inf", "power.active_watts: expected a finite number, not inf"),
    ("idle_watts", ".nan", "power.idle_watts: expected a finite number, not nan"),
    ("memory_mb", "1.0e+51", "hardware.memory_mb: expected a number of magnitude at most 1e+12, not 1e+51"),
    ("max_latency_ms", "-.inf", "constraints.max_latency_ms: expected a finite number, not -inf"),
])
def test_a_profile_number_that_is_not_finite_and_bounded_is_refused(home, tmp_path, capsys, field, value, message):
    text = X86.read_text()
    if f"  {field}:" not in text:
        text = text.replace("constraints:\n", f"constraints:\n  {field}: 1\n", 1)
    lines = [f"  {field}: {value}" if line.startswith(f"  {field}:") else line for line in text.splitlines()]
    path = _profile(tmp_path, "\n".join(lines) + "\n")
    assert main(["--profile", str(path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {path}:{_line(path.read_text(), f'{field}: {value}')}: {message}"), line


def test_a_search_param_that_is_infinite_is_refused(tmp_path):
    data = yaml.safe_load(X86.read_text())
    data["search"]["params"] = {"pruning": {"amount": [0.5, float("inf")]}}
    path = _profile(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert "search.params: expected a finite number, not inf" in str(info.value)


def test_results_and_stored_records_are_strict_json(home):
    from orchestrator.state.store import strict_json

    record = {"id": "c1", "status": "ok", "pipeline": [],
              "metrics": {"accuracy": float("nan"), "energy_mj": float("inf"), "latency_ms": {"p50": 1.5}}}

    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(strict_json({"best": record}, indent=2), parse_constant=refuse)["best"]["metrics"] == \
        {"accuracy": None, "energy_mj": None, "latency_ms": {"p50": 1.5}}
    store = RunStore(home / "runs.sqlite")
    store.start_run(RUN_ID, "x86-host", str(X86), "digits", str(home))
    store.add_candidate(RUN_ID, record)
    import sqlite3

    with sqlite3.connect(home / "runs.sqlite") as db:
        [stored] = db.execute("SELECT record FROM candidates").fetchone()
    assert json.loads(stored, parse_constant=refuse)["metrics"]["accuracy"] is None


# ---------------------------------------------- issue 31 item 20: an inventory's line numbers in linear time


class _CountingEntries(list):
    """A mapping node's entries that count how many of them are looked at (iterated, forwards or back)."""

    looked_at = 0

    def __iter__(self):
        for item in super().__iter__():
            type(self).looked_at += 1
            yield item

    def __reversed__(self):
        for item in super().__reversed__():
            type(self).looked_at += 1
            yield item


@pytest.mark.parametrize("hosts", [1_000, 4_000])
def test_finding_every_hosts_line_looks_at_each_entry_a_bounded_number_of_times(tmp_path, hosts):
    """`devices import` finds each host's line: scanning the hosts mapping for each was quadratic
    (60,000 one-line hosts took minutes). Counted, not timed: each entry is looked at O(1) times."""
    from orchestrator.config.yamlfile import line_of, read_yaml
    from orchestrator.errors import InventoryError

    path = tmp_path / "inventory.yaml"
    path.write_text("all:\n  hosts:\n" + "".join(f"    pi-{i:05d}: {{ansible_host: 10.0.0.1}}\n" for i in range(hosts)))
    _, node, data = read_yaml(path, "inventory", InventoryError, 10 * 1024 * 1024)
    [(_, top)] = node.value
    [(_, mapping)] = top.value
    mapping.value = _CountingEntries(mapping.value)
    _CountingEntries.looked_at = 0
    lines = [line_of(node, ("all", "hosts", name)) for name in data["all"]["hosts"]]
    assert lines == list(range(3, hosts + 3))
    assert _CountingEntries.looked_at <= 2 * hosts, _CountingEntries.looked_at


# ---------------------------------------------- issue 31 item 10: --out that cannot hold a run's folder


@pytest.mark.parametrize(("make", "why"), [
    ("file", "not a folder (a file is in the way)"),
    ("under-a-file", "not a folder (a file is in the way)"),
])
def test_an_out_that_cannot_hold_runs_is_refused_before_anything_loads(home, tmp_path, capsys, make, why):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" if make == "file" else tmp_path / "a-file" / "runs"
    started = time.monotonic()
    assert main(["--profile", str(X86), "--trials", "1", "--out", str(out)]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: --out {out}: {why}"
    assert time.monotonic() - started < 5  # no plugin, base model or Ray was loaded
    assert not (home / "runs.sqlite").exists() or RunStore(home / "runs.sqlite").list_runs() == []


def test_an_out_this_user_cannot_write_is_refused(home, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    prefix = []
    if os.getuid() == 0:  # root ignores modes: drop its override, as a user has none
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    done = subprocess.run([*prefix, sys.executable, "-m", "orchestrator", "--profile", str(X86), "--trials", "1",
                           "--out", str(locked / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "EDGE_ORCHESTRATOR_HOME": str(home)}, check=False)
    assert done.returncode == 2, done.stderr
    assert _one_error_line(done.stderr) == f"error: --out {locked / 'runs'}: cannot be made: Permission denied"


# ---------------------------------------------- issue 31 item 16: one exit-code table for every command


def test_the_readme_exit_code_table_is_the_cli_s():
    """README's table lists exactly the codes `ExitCode` has, each once."""
    import re

    from orchestrator.errors import ExitCode

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("Exit codes, the same for every command"):]
    table = table[:table.index("\n\n", table.index("| code |"))]
    codes = [int(m) for m in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)]
    assert codes == sorted(int(c) for c in ExitCode)


EXIT_CASES = {  # command -> the code README's table gives it
    "rollback, a profile with no device": (["rollback", "--profile", "nope"], 4),
    "rollback, an unknown device": (["rollback", "--device", "nope"], 2),
    "devices show, an unknown device": (["devices", "show", "nope"], 2),
    "devices remove, an unknown device": (["devices", "remove", "nope"], 2),
    "runs show, an unknown run": (["runs", "show", "nope"], 2),
    "runs compare, an unknown run": (["runs", "compare", "nope", "nada"], 2),
    "deploy, an unknown run": (["deploy", "nope", "--dry-run"], 2),
    "resume, an unknown run": (["--resume", "nope"], 2),
    "an unknown option": (["runs", "list", "--bogus"], 2),
    "an unknown command": (["bogus"], 2),
    "a missing profile": (["--profile", "no-such.yaml"], 2),
    "cache clear, an unknown kind": (["cache", "clear", "--kind", "bogus", "--yes"], 2),
}


@pytest.mark.parametrize("case", list(EXIT_CASES))
def test_commands_exit_with_the_code_the_readme_gives(home, capsys, case):
    args, code = EXIT_CASES[case]
    assert main(args) == code
    err = capsys.readouterr().err
    assert "internal error" not in err and "Traceback" not in err, err


# ---------------------------------------------- issue 31 items 6-8: --inputs that cannot stand for the model's inputs


def _ocr_classifier() -> Path:
    from examples import own_models

    return own_models.ocr_classifier_file()  # a real pretrained ONNX CNN: x float32 (batch, 3, H, W)


def _bad_samples(tmp_path: Path, case: str) -> Path:
    import zipfile

    import numpy as np

    good = np.zeros((4, 3, 48, 192), np.float32)
    arrays = {
        "rank": {"x": np.zeros((4, 3, 48), np.float32)},
        "channels": {"x": np.zeros((4, 1, 48, 192), np.float32)},
        "no rows": {"x": np.zeros((0, 3, 48, 192), np.float32)},
        "nan": {"x": np.where(np.arange(4)[:, None, None, None] == 2, np.nan, good).astype(np.float32)},
        "inf": {"x": np.full((4, 3, 48, 192), np.inf, np.float32)},
        "a member that is no array": {"x": good},
    }[case]
    path = tmp_path / "samples.npz"
    np.savez(path, **arrays)
    if case == "a member that is no array":
        with zipfile.ZipFile(path, "a") as npz:
            npz.writestr("README.txt", "these are the OCR samples")
    return path


SAMPLE_PROBLEMS = {
    "rank": "x has shape (4, 3, 48), the model wants (batch, 3, x:2, x:3) (rows first)",
    "channels": "x has shape (4, 1, 48, 192), the model wants (batch, 3, x:2, x:3) (rows first)",
    "no rows": "holds 0 rows (at least 1 is needed)",
    "nan": "x holds NaN or infinite values (1 of 4 rows, the first row 2); inputs must be finite",
    "inf": "x holds NaN or infinite values (4 of 4 rows, the first row 0); inputs must be finite",
    "a member that is no array": "member 'README.txt' is not an array (an .npz holds .npy arrays only)",
}


@pytest.mark.parametrize("case", list(SAMPLE_PROBLEMS))
def test_inputs_that_cannot_stand_for_the_models_inputs_are_one_line(tmp_path, case):
    from orchestrator.errors import ExitCode
    from orchestrator.models.ownmodel import ModelSourceError, OwnModelTask

    path = _bad_samples(tmp_path, case)
    with pytest.raises(ModelSourceError) as info:
        OwnModelTask(str(_ocr_classifier()), str(path)).load_data(0)
    assert str(info.value) == f"--inputs {path}: {SAMPLE_PROBLEMS[case]}"
    assert info.value.exit_code == ExitCode.USAGE


def test_a_wrong_input_shape_ends_the_command_with_one_line_and_exit_2(home, tmp_path, capsys):
    path = _bad_samples(tmp_path, "channels")
    code = main(["--profile", str(ROOT / "examples" / "own-model.yaml"), "--model", str(_ocr_classifier()),
                 "--inputs", str(path), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1] == f"error: --inputs {path}: {SAMPLE_PROBLEMS['channels']}"
    assert "internal error" not in err and "Traceback" not in err and "ONNXRuntimeError" not in err
