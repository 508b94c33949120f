"""A device: the `Device` record, where it is (`Device.target`, one of the tagged `Target` kinds: `SshTarget`,
`LocalTarget`, `EmulatedTarget`, a plugin's `PluginTarget`), and the agent's `bench` flags for a profile.

Every transport runs the same `agents/` code: the agent is what measures, the host only ships
the model and reads the JSON the agent prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Union

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

    kind: ClassVar[str] = "ssh"
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
class LocalTarget:
    """This machine: the agent runs as a child process."""

    kind: ClassVar[str] = "local"


@dataclass
class EmulatedTarget:
    """A board emulated with QEMU user mode: what the emulator needs (CPU model, sysroot, cores, memory, mode)."""

    kind: ClassVar[str] = "qemu"
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class PluginTarget:
    """A transport kind a plugin registers (`register_transports`): its name and its own settings."""

    kind: str
    settings: dict[str, Any] = field(default_factory=dict)


#: Where a device is: one of these, told apart by `kind` (stored as such in the registry, docs/devices.md).
Target = Union[SshTarget, LocalTarget, EmulatedTarget, PluginTarget]
_KINDS: dict[str, type] = {"ssh": SshTarget, "local": LocalTarget, "qemu": EmulatedTarget}


def target_json(target: Target) -> dict[str, Any]:
    """`{"kind": ..., <the kind's fields>}`: how the registry stores a target."""
    return {"kind": target.kind, **{f.name: getattr(target, f.name) for f in fields(target) if f.name != "kind"}}


def target_from_json(data: dict[str, Any]) -> Target:
    """The target `target_json` stored; ValueError for one that is not a JSON object with a known kind's fields."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or not data["kind"]:
        raise ValueError("not an object with a `kind`")
    rest = {k: v for k, v in data.items() if k != "kind"}
    cls = _KINDS.get(data["kind"])
    try:
        return PluginTarget(data["kind"], **rest) if cls is None else cls(**rest)
    except TypeError as exc:  # a field missing or unknown
        raise ValueError(f"a {data['kind']} target: {exc}") from None


@dataclass
class Device:
    """A device a profile's candidates are measured on. `target` says where it is (its kind is `transport`);
    made from `transport`, `ssh` and `extra` when not given, so either form describes the same device."""

    name: str
    transport: str  # the target's kind: "local" | "ssh" | "qemu" | a plugin's
    arch: str
    emulated: bool = False
    pinned_cpu: int | None = None
    ssh: SshTarget | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    target: Target | None = None

    def __post_init__(self) -> None:
        if self.target is None:
            self.target = self.ssh if self.ssh is not None else \
                LocalTarget() if self.transport == "local" else \
                EmulatedTarget(dict(self.extra)) if self.transport == "qemu" else PluginTarget(self.transport, dict(self.extra))
        elif self.ssh is None and isinstance(self.target, SshTarget):
            self.ssh = self.target
        if self.target.kind != self.transport:
            raise ValueError(f"device {self.name}: its target is a {self.target.kind} one, its transport {self.transport}")

    def describe(self) -> dict[str, Any]:
        """What results.json says of the device (no key path, no host key)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("extra", "ssh", "target")}
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
