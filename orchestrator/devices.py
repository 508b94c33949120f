"""Devices, their transports and leases.

The `local` transport runs the agent on this machine as a separate process; the `ssh`
transport (orchestrator/ssh.py) runs it on a registered device. Every transport runs
the same `agents/` code: the agent is what measures, the host only ships the model and
reads the JSON the agent prints. One `DeviceLease` actor owns each device, and a
`LeasePool` actor hands each measurement to whichever lease is free.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
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
    if m.warmup_until_stable:
        args.append("--warmup-until-stable")
    if pinned_cpu is not None:
        args += ["--pin-cpu", str(pinned_cpu)]
    return args


def settings_key(device: Device, profile: Profile) -> str:
    """Key of what a measurement on `device` depends on besides the model: transport, protocol, threads, pinning."""
    from orchestrator.cache import digest

    return digest({"transport": device.transport, "bench": bench_args(profile, device.pinned_cpu),
                   "emulation": profile.emulation.model_dump() if profile.emulation else None})


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
    if device.transport == "qemu":
        # An emulated device measures by the rule of docs/emulation.md: the candidate is checked under
        # QEMU (QemuUserTransport.from_device), its latency is this host's, scaled by the profile.
        from orchestrator.emulated import EmulatedDeviceTransport

        return EmulatedDeviceTransport(device)
    raise MeasurementError(f"device {device.name}: transport {device.transport!r} is not available yet")


class DeviceLease:
    """Owns one device: measurements on it run one at a time. Used as a Ray actor (one per device).

    A registered device's status and last-seen time in the registry follow what its
    measurements find (online, offline, host key changed).
    """

    def __init__(self, device: Device, profile: Profile, registry_path: str | None = None,
                 cache_path: str | None = None, fresh: bool = False) -> None:
        self.device = device
        self.profile = profile
        self.registry_path = registry_path
        self._registry: Any = None
        self.transport = make_transport(device)
        self.cache: Any = None
        if cache_path is not None:
            from orchestrator.cache import MeasurementCache

            self.cache = MeasurementCache(Path(cache_path), read=not fresh)
        self._device_key: str | None = None

    def _cache_keys(self, model_sha: str) -> tuple[str, str, str]:
        """(model, device, settings) keys of a measurement; the device's identity comes from its agent's `info`."""
        from orchestrator.cache import device_key

        if self._device_key is None:
            self._device_key = device_key(self.device.name, self.transport.info())
        return model_sha, self._device_key, settings_key(self.device, self.profile)

    def measure(self, model_bytes: bytes) -> dict[str, Any]:
        """Benchmark a model on the leased device.

        Returns the agent's JSON plus `device` (this device's name). A failure comes back as
        `{"error": reason, "device": name}`, with `"offline": True` when the device could not
        be reached at all (so the measurement may go to another device).
        """
        name = self.device.name
        keys = None
        try:
            if self.cache is not None:
                keys = self._cache_keys(hashlib.sha256(model_bytes).hexdigest())
                hit = self.cache.get(*keys)
                if hit is not None:
                    return {**hit, "device": name, "cached": True}
            result = self.transport.bench(model_bytes, self.profile)
        except (DeviceOffline, HostKeyMismatch) as exc:
            self._record("host-key-changed" if isinstance(exc, HostKeyMismatch) else "offline", str(exc))
            return {"error": str(exc), "offline": True, "device": name}
        except MeasurementError as exc:
            if getattr(self.transport, "offline", False):  # the connection dropped and did not come back
                self._record("offline", str(exc))
            return {"error": str(exc), "device": name}
        self._record("online")
        if keys is not None:
            self.cache.put(*keys, name, result)
        return {**result, "device": name, "cached": False}

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


DISAGREE_RATIO = 0.25  # a device whose p50 is this far off the median of the others is flagged


def combine_measurements(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement from several devices' answers to the same model.

    Latency statistics, memory and energy are the medians over the devices that answered;
    `per_device` keeps each device's own figures; `flags` names a device whose p50 is more
    than DISAGREE_RATIO off the median of all (with two devices, both are named when they
    differ: two cannot say which one is right). Failures are kept in `per_device`; only when
    every device failed is the answer a failure (the first one's).
    """
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    per_device = [
        {"device": r.get("device"), "p50_ms": r["latency_ms"]["p50"], "cached": r.get("cached", False),
         "started_at": r.get("started_at"), "finished_at": r.get("finished_at"), "noisy": r.get("noisy"),
         "niceness": r.get("niceness")}
        for r in ok
    ] + [{"device": r.get("device"), "error": r["error"]} for r in results if "error" in r]
    if len(ok) == 1:
        return {**ok[0], "per_device": per_device, "flags": []}
    med = statistics.median
    combined = dict(ok[0])
    combined["latency_ms"] = {k: med(r["latency_ms"][k] for r in ok) for k in ok[0]["latency_ms"]}
    for key in ("peak_memory_mb", "model_memory_mb"):
        values = [r[key] for r in ok if r.get(key) is not None]
        combined[key] = med(values) if values else None
    energies = [r["energy"]["energy_mj"] for r in ok if (r.get("energy") or {}).get("energy_mj") is not None]
    if energies:
        combined["energy"] = {**ok[0]["energy"], "energy_mj": med(energies),
                              "method": f"median over {len(energies)} devices of: {ok[0]['energy'].get('method')}"}
    combined["noisy"] = any(r.get("noisy") for r in ok)
    combined["cached"] = all(r.get("cached") for r in ok)
    combined["device"] = ", ".join(str(r.get("device")) for r in ok)
    flags = []
    middle = combined["latency_ms"]["p50"]
    for r in ok:
        off = abs(r["latency_ms"]["p50"] - middle) / middle if middle else 0.0
        if off > DISAGREE_RATIO:
            flags.append(f"device {r.get('device')}: p50 {r['latency_ms']['p50']:.3g} ms is {off:.0%} off the "
                         f"median of the {len(ok)} devices ({middle:.3g} ms)")
    combined["per_device"], combined["flags"] = per_device, flags
    return combined


class LeasePool:
    """Hands each measurement to free `DeviceLease`s: one measurement per device at a time, all devices busy at once.

    Used as an async Ray actor (asyncio actor) in front of the lease actors; trials call
    `measure` and wait. With `replicas` > 1 a model is measured on that many distinct devices
    at once and the answers are combined (`combine_measurements`). A device found offline
    rests for `OFFLINE_RETRY_S` while the others take the measurements; when every device
    rests, a measurement fails at once.
    """

    def __init__(self, leases: list[Any], replicas: int = 1) -> None:
        self.leases = list(leases)
        self.replicas = max(1, min(replicas, len(self.leases)))
        self.free: asyncio.Queue | None = None  # made on the actor's event loop, at the first call
        self.resting: dict[int, tuple[float, dict[str, Any]]] = {}  # lease index -> (when, offline answer)

    async def measure(self, model_bytes: bytes) -> dict[str, Any]:
        """Measure on `replicas` free devices that are not resting; see `DeviceLease.measure` for what comes back."""
        if self.free is None:
            self.free = asyncio.Queue()
            for index, lease in enumerate(self.leases):
                self.free.put_nowait((index, lease))
        used: set[int] = set()
        results = await asyncio.gather(*(self._measure_one(model_bytes, used) for _ in range(self.replicas)))
        results = [r for r in results if r is not None]
        return combine_measurements(results) if self.replicas > 1 else results[0]

    async def _measure_one(self, model_bytes: bytes, used: set[int]) -> dict[str, Any] | None:
        """One measurement on a free device not in `used` (the other replicas' devices); None if none is left."""
        assert self.free is not None
        while True:
            now = time.monotonic()
            resting = {i: answer for i, (since, answer) in self.resting.items() if now - since < OFFLINE_RETRY_S}
            if len(resting) == len(self.leases):
                return next(iter(resting.values()))
            if len(set(resting) | used) == len(self.leases):
                return None  # every other device rests or already measures this model
            index, lease = await self.free.get()
            if index in resting or index in used:  # wait for another device rather than ask this one again
                self.free.put_nowait((index, lease))
                await asyncio.sleep(0.05)
                continue
            used.add(index)
            try:
                result = await lease.measure.remote(model_bytes)
            finally:
                self.free.put_nowait((index, lease))
            if result.get("offline"):
                self.resting[index] = (time.monotonic(), result)
                used.discard(index)
                continue
            self.resting.pop(index, None)
            return result
