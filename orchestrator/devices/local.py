"""The `local` transport: this machine as a device; the agent runs as a separate process, one benchmark at a time.

One benchmark at a time across processes too: each measurement holds a file lock (`fcntl.flock`)
in the state folder, one per pinned core (per device name when unpinned), for as long as the
agent measures. Two runs sharing a state folder take turns on the core instead of timing two
models on it at once; the lock goes with the process that held it, however it ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import agents
from orchestrator.devices.base import AGENT_TIMEOUT_S, Device, bench_args, compare_args
from orchestrator.errors import MeasurementError
from orchestrator.state.paths import state_dir

if TYPE_CHECKING:  # pydantic stays out of `orchestrate --help`
    from orchestrator.config.profile import Profile


log = logging.getLogger(__name__)

# The folder that holds the `agents` package, whichever way this project was installed.
AGENT_ROOT = str(Path(agents.__file__).resolve().parents[1])
#: How long a measurement waits for another process's measurement on the same core.
LOCK_WAIT_S = 2 * AGENT_TIMEOUT_S


def lock_path(device: Device) -> Path:
    """The lock file of a local device: one per pinned core, else one per device name."""
    key = f"cpu{device.pinned_cpu}" if device.pinned_cpu is not None else re.sub(r"[^A-Za-z0-9._-]", "_", device.name)
    folder = state_dir() / "locks"
    folder.mkdir(exist_ok=True)
    return folder / f"local-{key}.lock"


@contextlib.contextmanager
def measuring(device: Device, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the device's lock (see the module's docstring) while the body measures; wait for it up to `wait_s`."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one process at a time is up to the user
        yield
        return
    path = lock_path(device)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + wait_s
        waited = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info("device %s: another process is measuring on it; waiting (%s)", device.name, path)
                    waited = True
                if time.monotonic() > deadline:
                    raise MeasurementError(
                        f"device {device.name}: another process has been measuring on it for over {wait_s:.0f} s "
                        f"(lock {path}); not measured") from None
                time.sleep(0.05)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()} {platform.node()}\n")  # who holds it, for a person looking
            handle.flush()
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class LocalTransport:
    """This machine as a device: the agent runs as a child process, one benchmark at a time."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def _agent(self, args: list[str]) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "agents", *args]
        env = {**os.environ, "PYTHONPATH": AGENT_ROOT}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=AGENT_TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"device {self.device.name}: agent timed out after {AGENT_TIMEOUT_S} s") from None
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise MeasurementError(f"device {self.device.name}: agent exited {proc.returncode}: {tail}") from None
        if proc.returncode != 0 or "error" in result:
            raise MeasurementError(f"device {self.device.name}: {result.get('error', 'agent failed')}")
        return result

    def info(self) -> dict[str, Any]:
        """The agent's `info` for this machine."""
        return self._agent(["info"])

    def bench(self, model_bytes: bytes, profile: Profile) -> dict[str, Any]:
        """Measure one model with the profile's protocol; returns the agent's JSON."""
        with tempfile.TemporaryDirectory(prefix="eo-local-device-") as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(model_bytes)
            with measuring(self.device):
                return self._agent(["bench", "--model", str(path), *bench_args(profile, self.device.pinned_cpu)])

    def compare(self, models: list[bytes], profile: Profile) -> dict[str, Any]:
        """Measure several models together, in interleaved rounds (the final round); returns the agent's JSON."""
        with tempfile.TemporaryDirectory(prefix="eo-local-device-") as tmp:
            args = ["compare"]
            for i, data in enumerate(models):
                path = Path(tmp) / f"model{i}.onnx"
                path.write_bytes(data)
                args += ["--model", str(path)]
            with measuring(self.device):
                return self._agent([*args, *compare_args(profile, self.device.pinned_cpu)])

    def close(self) -> None:
        """Nothing stays open between agent runs."""


def local_device() -> Device:
    """This machine, as the fallback device of a profile."""
    return Device(name=f"local:{platform.node() or 'host'}", transport="local", arch=platform.machine())
