"""Devices and their transports. The `local` transport runs the agent on this machine as a separate process.

Every transport runs the same `agents/` code: the agent is what measures, the
host only ships the model and reads the JSON the agent prints.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import MeasurementError
from orchestrator.profile import Profile

AGENT_TIMEOUT_S = 300


@dataclass
class Device:
    """A device a profile's candidates are measured on."""

    name: str
    transport: str  # "local" | "ssh" | "qemu"
    arch: str
    emulated: bool = False
    pinned_cpu: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What results.json says of the device."""
        return {k: v for k, v in asdict(self).items() if k != "extra"}


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


def make_transport(device: Device) -> LocalTransport:
    """The transport object for a device."""
    if device.transport == "local":
        return LocalTransport(device)
    raise MeasurementError(f"device {device.name}: transport {device.transport!r} is not available yet")


class DeviceLease:
    """Owns one device: measurements on it run one at a time. Used as a Ray actor (one per device)."""

    def __init__(self, device: Device, profile: Profile) -> None:
        self.device = device
        self.profile = profile
        self.transport = make_transport(device)

    def measure(self, model_bytes: bytes) -> dict[str, Any]:
        """Benchmark a model on the leased device; a failure comes back as `{"error": reason}`."""
        try:
            return self.transport.bench(model_bytes, self.profile)
        except MeasurementError as exc:
            return {"error": str(exc)}

    def describe(self) -> dict[str, Any]:
        """The device's description for results."""
        return self.device.describe()
