"""A device: the `Device` record, how to reach it over SSH (`SshTarget`), and the agent's `bench` flags for a profile.

Every transport runs the same `agents/` code: the agent is what measures, the host only ships
the model and reads the JSON the agent prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.state.hashing import digest

if TYPE_CHECKING:  # pydantic stays out of `orchestrate --help`
    from orchestrator.config.profile import Profile

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
    args += axes_args(profile)
    if pinned_cpu is not None:
        args += ["--pin-cpu", str(pinned_cpu)]
    return args


def compare_args(profile: Profile, pinned_cpu: int | None) -> list[str]:
    """The agent's `compare` flags: the final round's interleaved rounds, with the profile's runtime settings.

    Many short blocks rather than few long ones: a burst of other work then hits a block or two
    of each model instead of all of one model's runs, and the paired bootstrap over rounds
    sees it as the noise it is.
    """
    m, r = profile.measurement, profile.runtime
    args = [
        "--rounds", str(m.final_rounds), "--block-runs", str(max(5, min(20, m.runs // 10))),
        "--warmup", str(m.warmup_runs), "--time-budget", str(m.final_time_budget_s), "--batch", str(m.batch_size),
        "--threads", str(r.intra_op_threads), "--inter-op-threads", str(r.inter_op_threads),
        "--providers", ",".join(r.execution_providers),
    ]
    args += axes_args(profile)
    if pinned_cpu is not None:
        args += ["--pin-cpu", str(pinned_cpu)]
    return args


def axes_args(profile: Profile) -> list[str]:
    """`--axes sequence=128,...`: the sizes of the model's named dynamic axes the agent times it at (none: [])."""
    axes = profile.measurement.axes
    return ["--axes", ",".join(f"{k}={v}" for k, v in sorted(axes.items()))] if axes else []


def settings_key(device: Device, profile: Profile) -> str:
    """Key of what a measurement on `device` depends on besides the model: transport, protocol, threads, pinning."""
    return digest({"transport": device.transport, "bench": bench_args(profile, device.pinned_cpu),
                   "emulation": profile.emulation.model_dump() if profile.emulation else None})
