"""Devices, their transports and leases.

The `local` transport runs the agent on this machine as a separate process; the `ssh`
transport (orchestrator/ssh.py) runs it on a registered device. Every transport runs
the same `agents/` code: the agent is what measures, the host only ships the model and
reads the JSON the agent prints. One `DeviceLease` actor owns each device, and a
`LeasePool` actor hands each measurement to whichever lease is free.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import DeviceOffline, HostKeyMismatch, MeasurementError

if TYPE_CHECKING:  # pydantic stays out of `orchestrate --help`
    from orchestrator.profile import Profile

AGENT_TIMEOUT_S = 300
DEFAULT_REMOTE_DIR = ".edge-orchestrator"
CONNECT_TIMEOUT_S = 10.0
OFFLINE_RETRY_S = 30.0  # an offline device is tried again after this long


@dataclass
class SshTarget:
    """How to reach a device over SSH. Holds no secret: a key *path* (or none: ssh-agent) and the pinned host key."""

    host: str
    user: str
    host_key: str  # pinned public host key, "TYPE BASE64" as in known_hosts
    port: int = 22
    key_path: str | None = None
    python: str = "python3"  # the device's interpreter (needs numpy and onnxruntime)
    remote_dir: str = DEFAULT_REMOTE_DIR  # the agent's folder on the device; relative = under the login's home
    connect_timeout_s: float = CONNECT_TIMEOUT_S

    @property
    def address(self) -> str:
        """user@host:port, for messages."""
        return f"{self.user}@{self.host}:{self.port}"


@dataclass
class Device:
    """A device a profile's candidates are measured on."""

    name: str
    transport: str  # "local" | "ssh" | "qemu"
    arch: str
    emulated: bool = False
    pinned_cpu: int | None = None
    ssh: SshTarget | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What results.json says of the device (no key path, no host key)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("extra", "ssh")}
        if self.ssh is not None:
            out["host"] = self.ssh.address
        return out


def bench_args(profile: Profile, pinned_cpu: int | None) -> list[str]:
    """The agent's `bench` flags for a profile's measurement protocol and power model."""
    m, r, p = profile.measurement, profile.runtime, profile.power
    args = [
        "--warmup", str(m.warmup_runs), "--runs", str(m.runs), "--time-budget", str(m.time_budget_s),
        "--batch", str(m.batch_size), "--threads", str(r.intra_op_threads),
        "--inter-op-threads", str(r.inter_op_threads), "--providers", ",".join(r.execution_providers),
        "--power-idle-w", str(p.idle_watts), "--power-active-w", str(p.active_watts),
        "--power-cores", str(profile.hardware.cores),
    ]
    if pinned_cpu is not None:
        args += ["--pin-cpu", str(pinned_cpu)]
    return args


class LocalTransport:
    """This machine as a device: the agent runs as a child process, one benchmark at a time."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def _agent(self, args: list[str]) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "agents", *args]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
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
            return self._agent(["bench", "--model", str(path), *bench_args(profile, self.device.pinned_cpu)])


def local_device() -> Device:
    """This machine, as the fallback device of a profile."""
    return Device(name=f"local:{platform.node() or 'host'}", transport="local", arch=platform.machine())


def make_transport(device: Device) -> Any:
    """The transport object for a device."""
    if device.transport == "local":
        return LocalTransport(device)
    if device.transport == "ssh" and device.ssh is not None:
        from orchestrator.ssh import SshTransport  # paramiko only where SSH is used

        return SshTransport(device)
    raise MeasurementError(f"device {device.name}: transport {device.transport!r} is not available yet")


class DeviceLease:
    """Owns one device: measurements on it run one at a time. Used as a Ray actor (one per device).

    A registered device's status and last-seen time in the registry follow what its
    measurements find (online, offline, host key changed).
    """

    def __init__(self, device: Device, profile: Profile, registry_path: str | None = None) -> None:
        self.device = device
        self.profile = profile
        self.registry_path = registry_path
        self._registry: Any = None
        self.transport = make_transport(device)

    def measure(self, model_bytes: bytes) -> dict[str, Any]:
        """Benchmark a model on the leased device.

        Returns the agent's JSON plus `device` (this device's name). A failure comes back as
        `{"error": reason, "device": name}`, with `"offline": True` when the device could not
        be reached at all (so the measurement may go to another device).
        """
        name = self.device.name
        try:
            result = self.transport.bench(model_bytes, self.profile)
        except (DeviceOffline, HostKeyMismatch) as exc:
            self._record("host-key-changed" if isinstance(exc, HostKeyMismatch) else "offline", str(exc))
            return {"error": str(exc), "offline": True, "device": name}
        except MeasurementError as exc:
            if getattr(self.transport, "offline", False):  # the connection dropped and did not come back
                self._record("offline", str(exc))
            return {"error": str(exc), "device": name}
        self._record("online")
        return {**result, "device": name}

    def _record(self, status: str, reason: str | None = None) -> None:
        if self.registry_path is None:
            return
        if self._registry is None:
            from orchestrator.registry import DeviceRegistry

            self._registry = DeviceRegistry(self.registry_path)
        self._registry.set_status(self.device.name, status, reason)

    def describe(self) -> dict[str, Any]:
        """The device's description for results."""
        return self.device.describe()


class LeasePool:
    """Hands each measurement to a free `DeviceLease`: one measurement per device at a time, all devices busy at once.

    Used as an async Ray actor (asyncio actor) in front of the lease actors; trials call
    `measure` and wait. A device found offline rests for `OFFLINE_RETRY_S` while the others
    take the measurements; when every device rests, a measurement fails at once.
    """

    def __init__(self, leases: list[Any]) -> None:
        self.leases = list(leases)
        self.free: asyncio.Queue | None = None  # made on the actor's event loop, at the first call
        self.resting: dict[int, tuple[float, dict[str, Any]]] = {}  # lease index -> (when, offline answer)

    async def measure(self, model_bytes: bytes) -> dict[str, Any]:
        """Measure on the first free device that is not resting; see `DeviceLease.measure` for what comes back."""
        if self.free is None:
            self.free = asyncio.Queue()
            for index, lease in enumerate(self.leases):
                self.free.put_nowait((index, lease))
        while True:
            now = time.monotonic()
            resting = {i: answer for i, (since, answer) in self.resting.items() if now - since < OFFLINE_RETRY_S}
            if len(resting) == len(self.leases):
                return next(iter(resting.values()))
            index, lease = await self.free.get()
            if index in resting:  # others are busy: wait for one of them rather than ask this one again
                self.free.put_nowait((index, lease))
                await asyncio.sleep(0.2)
                continue
            try:
                result = await lease.measure.remote(model_bytes)
            finally:
                self.free.put_nowait((index, lease))
            if result.get("offline"):
                self.resting[index] = (time.monotonic(), result)
                continue
            self.resting.pop(index, None)
            return result
