"""The device registry, the profile fit check, Ansible-style inventories and the agent zipapp (no network)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agents.info import cmd_info
from orchestrator.cli.main import main
from orchestrator.config.profile import load_profile
from orchestrator.devices.bundle import agent_bundle
from orchestrator.devices.registry import DeviceRegistry, RegisteredDevice, key_fingerprint
from orchestrator.errors import DeviceNotFound, DeviceRefused, InventoryError
from orchestrator.fleet.inventory import ignored_secrets, read_inventory, to_registration
from orchestrator.fleet.registration import check_fit

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "device_profiles"


def _device(name: str = "pi-1", **changes) -> RegisteredDevice:
    fields = {"name": name, "host": "192.0.2.10", "port": 22, "user": "pi", "key_path": "/home/me/.ssh/fleet",
              "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
              "profile": "rpi4", "profile_path": str(PROFILES / "rpi4.yaml"), "tags": ["kitchen"]}
    return RegisteredDevice(**{**fields, **changes})


def test_registry_round_trip_and_status(tmp_path):
    registry = DeviceRegistry(tmp_path / "registry.sqlite")
    registry.add(_device("pi-1"))
    registry.add(_device("pi-2", profile="rpi5"))
    with pytest.raises(DeviceRefused, match="already registered"):
        registry.add(_device("pi-1"))
    assert [d.name for d in registry.list()] == ["pi-1", "pi-2"]
    assert [d.name for d in registry.list("rpi4")] == ["pi-1"]
    got = registry.get("pi-1")
    assert got.tags == ["kitchen"] and got.port == 22 and got.deployed_model is None and got.registered_at > 0

    registry.set_status("pi-1", "offline", "connection refused")
    assert (registry.get("pi-1").status, registry.get("pi-1").status_reason) == ("offline", "connection refused")
    registry.set_status("pi-1", "online", info={"arch": "aarch64", "cores": 4})
    back = registry.get("pi-1")
    assert back.status == "online" and back.status_reason is None and back.last_seen and back.arch == "aarch64"
    with pytest.raises(ValueError):
        registry.set_status("pi-1", "asleep")

    registry.remove("pi-2")
    with pytest.raises(DeviceNotFound, match=r"no device named 'pi-2' .* \(registered: pi-1\)"):
        registry.get("pi-2")


def test_registry_holds_no_secret_columns(tmp_path):
    DeviceRegistry(tmp_path / "r.sqlite")
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(devices)")}
    assert not {c for c in columns if "pass" in c or "secret" in c or c == "private_key"}
    assert {"name", "host", "port", "user", "key_path", "host_key", "profile", "tags", "python", "arch", "info",
            "status", "last_seen", "deployed_model"} <= columns


def test_key_fingerprint_matches_ssh_keygen(tmp_path):
    from bench.sshd import fingerprint, keygen

    keygen(tmp_path / "k")
    assert key_fingerprint((tmp_path / "k.pub").read_text()) == fingerprint(tmp_path / "k.pub")


def test_device_description_has_no_key_material():
    described = _device().device().describe()
    assert described["host"] == "pi@192.0.2.10:22" and described["transport"] == "ssh"
    assert "fleet" not in json.dumps(described) and "AAAA" not in json.dumps(described)


# -------------------------------------------------------------------------------------------- fit


def _this_machine() -> dict:
    return cmd_info(None)


def test_this_machine_fits_the_x86_host_profile():
    assert check_fit(_this_machine(), load_profile(PROFILES / "x86-host.yaml").profile) == []


def test_fit_names_what_does_not_fit():
    rpi4 = load_profile(PROFILES / "rpi4.yaml").profile
    pi = {"arch": "aarch64", "memory_mb": 3796, "onnxruntime": "1.18.0", "providers": ["CPUExecutionProvider"]}
    assert check_fit(pi, rpi4) == []  # a 4 GB Pi 4 reports less than 4096 MB
    assert check_fit({**pi, "arch": "arm64"}, rpi4) == []  # macOS-style name
    assert check_fit({**pi, "arch": "armv7l"}, rpi4) == ["arch is armv7l, the profile needs aarch64"]
    assert check_fit({**pi, "memory_mb": 1870}, rpi4) == [
        "memory is 1870 MB, the profile needs 4096 MB (at least 3481)"]
    assert check_fit({**pi, "onnxruntime": None, "providers": []}, rpi4) == [
        "onnxruntime is not installed for the device's Python (see --python)"]
    jetson = load_profile(PROFILES / "jetson.yaml").profile
    orin = {"arch": "aarch64", "memory_mb": 7620, "onnxruntime": "1.17.0",
            "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    assert check_fit(orin, jetson) == [
        "onnxruntime 1.17.0 lacks TensorrtExecutionProvider (it has CUDAExecutionProvider, CPUExecutionProvider)"]


# -------------------------------------------------------------------------------------- inventory

INVENTORY = """\
all:
  vars:
    ansible_user: pi
    ansible_ssh_private_key_file: ~/.ssh/fleet_ed25519
  children:
    rpi4:
      hosts:
        pi-kitchen:
          ansible_host: 192.168.1.20
        pi-garage:
          ansible_host: 192.168.1.21
          ansible_port: 2222
          ansible_password: hunter2
    jetsons:
      vars:
        edge_profile: {jetson}
        ansible_user: ubuntu
        ansible_python_interpreter: /opt/venv/bin/python
      hosts:
        orin-1:
          ansible_host: 10.0.0.5
          edge_host_key_fingerprint: SHA256:abc
          edge_tags: [lab]
    outdoor:
      hosts:
        pi-garage:
"""


@pytest.fixture
def inventory(tmp_path) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY.format(jetson=PROFILES / "jetson.yaml"))
    return path


def test_inventory_groups_become_profiles_and_tags(inventory):
    hosts = {h.name: h for h in read_inventory(inventory)}
    assert list(hosts) == ["pi-kitchen", "pi-garage", "orin-1"]
    regs = {name: to_registration(h, inventory, PROFILES) for name, h in hosts.items()}

    kitchen = regs["pi-kitchen"]
    assert (kitchen.host, kitchen.port, kitchen.user, kitchen.key_path) == ("192.168.1.20", 22, "pi", "~/.ssh/fleet_ed25519")
    assert kitchen.profile_path == str(PROFILES / "rpi4.yaml") and kitchen.tags == [] and kitchen.python == "python3"

    garage = regs["pi-garage"]
    assert garage.port == 2222 and garage.tags == ["outdoor"]
    assert ignored_secrets(hosts["pi-garage"]) == ["ansible_password"]
    assert "hunter2" not in repr(garage)

    orin = regs["orin-1"]
    assert orin.user == "ubuntu" and orin.python == "/opt/venv/bin/python"  # the group's vars win over all's
    assert orin.profile_path == str(PROFILES / "jetson.yaml") and orin.tags == ["jetsons", "lab"]
    assert orin.host_key_fingerprint == "SHA256:abc"


def test_inventory_host_without_a_profile_or_with_two(tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_text(textwrap.dedent("""\
        lonely:
          hosts:
            box-1:
        rpi4:
          hosts:
            both:
        rpi5:
          hosts:
            both:
        """))
    hosts = {h.name: h for h in read_inventory(path)}
    with pytest.raises(InventoryError, match="host 'box-1' has no profile"):
        to_registration(hosts["box-1"], path, PROFILES)
    with pytest.raises(InventoryError, match=r"in several profile groups \(rpi4, rpi5\)"):
        to_registration(hosts["both"], path, PROFILES)


def test_inventory_that_is_not_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(InventoryError, match="a YAML mapping of groups"):
        read_inventory(bad)


def test_devices_import_dry_run(inventory, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # --profiles-dir defaults to ./device_profiles
    assert main(["devices", "import", str(inventory), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "would register pi-kitchen: pi@192.168.1.20:22, profile device_profiles/rpi4.yaml, tags -" in out
    assert "would register pi-garage: pi@192.168.1.21:2222" in out and "tags outdoor" in out
    assert "warning: pi-garage: ansible_password ignored (devices are reached with keys only)" in err
    assert DeviceRegistry().list() == []


# ------------------------------------------------------------------------------------ agent bundle


def test_agent_zipapp_is_named_by_its_code_and_runs_with_exit_codes(tmp_path):
    bundle = agent_bundle()
    assert bundle.name.startswith("agent-") and bundle.name.endswith(".pyz")
    agent_bundle.cache_clear()
    assert agent_bundle().name == bundle.name  # same code, same name
    path = tmp_path / bundle.name
    path.write_bytes(bundle.data)
    ok = subprocess.run([sys.executable, str(path), "sha256", "--file", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["sha256"] == bundle.sha256
    missing = subprocess.run([sys.executable, str(path), "sha256", "--file", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 4 and json.loads(missing.stdout)["exit_code"] == 4


#: The devices table as every release before the `target` column wrote it (issue 28: flat SSH columns).
OLD_SCHEMA = """
CREATE TABLE devices (name TEXT PRIMARY KEY, transport TEXT NOT NULL DEFAULT 'ssh', host TEXT NOT NULL,
    port INTEGER NOT NULL, user TEXT NOT NULL, key_path TEXT, host_key TEXT NOT NULL, profile TEXT NOT NULL,
    profile_path TEXT NOT NULL, tags TEXT NOT NULL, python TEXT NOT NULL, remote_dir TEXT NOT NULL, arch TEXT,
    info TEXT, status TEXT NOT NULL, status_reason TEXT, last_seen REAL, registered_at REAL NOT NULL,
    deployed_model TEXT, extra TEXT);
"""


def test_a_registry_from_before_the_target_column_is_migrated_to_tagged_targets(tmp_path):
    from orchestrator.devices.base import EmulatedTarget, SshTarget, target_json

    path = tmp_path / "registry.sqlite"
    pi = _device("pi-1")
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        for name, transport, host, port, extra in (("pi-1", "ssh", pi.host, 22, None),
                                                   ("emu", "qemu", "", 0, json.dumps({"qemu_cpu": "cortex-a72"}))):
            db.execute("INSERT INTO devices VALUES (?, ?, ?, ?, 'pi', NULL, ?, 'rpi4', 'p.yaml', '[]', 'python3', "
                       "'.eo', 'aarch64', '{}', 'online', NULL, NULL, 1.0, NULL, ?)",
                       (name, transport, host, port, pi.host_key if transport == "ssh" else "", extra))
    registry = DeviceRegistry(path)  # opening it migrates
    with sqlite3.connect(path) as db:
        stored = dict(db.execute("SELECT name, target FROM devices").fetchall())
    assert json.loads(stored["pi-1"]) == {"kind": "ssh", "host": "192.0.2.10", "user": "pi", "host_key": pi.host_key,
                                          "port": 22, "key_path": None, "python": "python3", "remote_dir": ".eo",
                                          "connect_timeout_s": 10.0}
    assert json.loads(stored["emu"]) == {"kind": "qemu", "settings": {"qemu_cpu": "cortex-a72"}}
    assert isinstance(registry.get("pi-1").device().target, SshTarget)
    emu = registry.get("emu").device()
    assert emu.target == EmulatedTarget({"qemu_cpu": "cortex-a72"}) and emu.emulated and emu.ssh is None
    # the stored target is what is true: a flat column an old version changed does not move the device
    with sqlite3.connect(path) as db:
        db.execute("UPDATE devices SET host = '198.51.100.1' WHERE name = 'pi-1'")
    assert registry.get("pi-1").ssh_target().host == "192.0.2.10"
    assert target_json(registry.get("pi-1").target)["host"] == "192.0.2.10"


def test_a_plugin_kind_is_stored_as_its_own_tagged_target_and_a_damaged_one_is_shown_as_damaged(tmp_path):
    from orchestrator.devices.base import PluginTarget

    registry = DeviceRegistry(tmp_path / "registry.sqlite")
    registry.add(_device("board", transport="serial", host="", port=0, host_key="", extra={"port": "/dev/ttyUSB0"}))
    board = registry.get("board")
    assert board.target == PluginTarget("serial", {"port": "/dev/ttyUSB0"})
    assert board.device().target == board.target and board.device().transport == "serial"
    with pytest.raises(ValueError, match="a serial device: it has no SSH target"):
        board.ssh_target()
    with sqlite3.connect(registry.path) as db:
        db.execute("UPDATE devices SET target = '{\"kind\": \"ssh\", \"hots\": 1}' WHERE name = 'board'")
    damaged = registry.get("board")
    assert damaged.status == "damaged" and "target not a device target" in damaged.status_reason
