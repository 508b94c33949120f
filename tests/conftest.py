"""Test session setup: a private state folder, one real local Ray, and the fixtures several test modules share.

Helpers (plain functions and classes) that several test modules import live in tests/helpers/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests never touch the user's real state: EDGE_ORCHESTRATOR_HOME points at a session folder."""
    home = tmp_path_factory.mktemp("eo-home")
    os.environ["EDGE_ORCHESTRATOR_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (2 CPUs), started as a run starts it (ray_session: loopback only,
    token auth, no dashboard, reaped if this process dies), shut down at the end."""
    from orchestrator.search import searcher  # noqa: F401  (sets Ray's quiet environment before Ray is imported)
    from orchestrator.search.ray_runtime import ray_session

    with ray_session(None, num_cpus=2) as ray:
        yield ray


# ------------------------------------------------------------------ emulated devices: the arm64 sysroot


@pytest.fixture(scope="session")
def qemu_sysroot(state_home) -> Path:
    """The arm64 sysroot, built once (cached under $EDGE_ORCHESTRATOR_QEMU_CACHE when set); skips when it cannot be."""
    from tests.helpers.qemu import sysroot_or_skip

    return sysroot_or_skip()


# ------------------------------------------------------------------ devices: a real sshd on loopback


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory):
    """One real OpenSSH server on 127.0.0.1 for the session (own config, host key, client key); stopped by pid."""
    from bench.sshd import Sshd, sshd_missing_reason

    reason = sshd_missing_reason()
    if reason:
        pytest.skip(reason)
    server = Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture
def own_sshd(tmp_path):
    """A real sshd of the test's own, for tests that stop it, kill it or change its host key."""
    from bench.sshd import Sshd, sshd_missing_reason

    reason = sshd_missing_reason()
    if reason:
        pytest.skip(reason)
    server = Sshd(tmp_path / "sshd").start()
    yield server
    server.stop()


@pytest.fixture
def device_profile(tmp_path, request):
    """Write a variant of the x86-host profile under a name of this test's own (so its devices are its own).

    Call it with dotted changes, e.g. device_profile(**{"measurement.runs": 5000}); returns the file.
    """
    import re

    import yaml

    def make(name: str | None = None, **changes) -> Path:
        data = yaml.safe_load((ROOT / "device_profiles" / "x86-host.yaml").read_text())
        data["name"] = name or re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:60]
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            data[section][key] = value
        path = tmp_path / f"{data['name']}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


@pytest.fixture
def register_device(capsys):
    """Register an sshd as a device through the real CLI; returns the CLI's stdout. Remote dir: its own folder."""
    import sys

    from orchestrator.cli.main import main

    def register(server, name: str, profile: Path, *extra: str) -> str:
        code = main(["devices", "register", name, "--host", "127.0.0.1", "--port", str(server.port),
                     "--user", server.user, "--key", str(server.client_key), "--profile", str(profile),
                     "--python", sys.executable, "--remote-dir", str(server.folder / "devices" / name), *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    return register


@pytest.fixture(autouse=True)
def _forget_devices():
    """Each test starts with an empty device registry, and leaves one."""
    from orchestrator.devices.registry import DeviceRegistry

    def clear() -> None:
        registry = DeviceRegistry()
        for device in registry.list():
            registry.remove(device.name)

    clear()
    yield
    clear()
