"""One transport interface: what a run measures through (`Transport`), what a rollout drives (`Deployable`),
and the table of transport kinds (`TransportKinds`) the one factory reads.

A transport kind is a name (a device's `transport`: "local", "ssh", "qemu", or one a plugin
registers with the `register_transports` hook) and the callables that make its objects for a
device. Which kinds exist is decided in one place, orchestrator/fleet/transports.py (the
built-ins plus every plugin's); nothing else picks a class by the kind's name.

Every transport runs the same `agents/` code on the device: the host ships the model and
reads the JSON the agent prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from orchestrator.devices.base import Device
from orchestrator.errors import DeployError, MeasurementError

if TYPE_CHECKING:  # pydantic stays out of `orchestrate --help`
    from orchestrator.config.profile import Profile

#: The built-in kinds (orchestrator/fleet/transports.py): names no plugin may register.
BUILTIN_KINDS = ("local", "ssh", "qemu")


@runtime_checkable
class Transport(Protocol):
    """What a run measures a device through: the agent's `info`, `bench` and `compare`, then `close`.

    Failures raise `MeasurementError` (a device that cannot be reached: `DeviceUnreachable` or
    `DeviceOffline`; a changed host key: `HostKeyMismatch`).
    """

    def info(self) -> dict[str, Any]:
        """The agent's `info` for the device (arch, memory, onnxruntime and its providers, ...)."""
        ...

    def bench(self, model_bytes: bytes, profile: Profile) -> dict[str, Any]:
        """Measure one model with the profile's protocol (`bench_args`); the agent's JSON."""
        ...

    def compare(self, models: list[bytes], profile: Profile) -> dict[str, Any]:
        """Measure several models in interleaved rounds (`compare_args`); the agent's JSON."""
        ...

    def close(self) -> None:
        """Let go of whatever is open (a connection); the transport may be used again after."""
        ...


@runtime_checkable
class Deployable(Protocol):
    """What a rollout drives on a device (docs/rollout.md): the agent's `install`, `health`, `rollback`, `status`.

    `open` reaches the device (one attempt) and readies its agent; it raises `DeviceUnreachable`
    (the device is left for `deploy --resume`) or `HostKeyMismatch`. The other methods raise
    `MeasurementError` and return what orchestrator/devices/ssh_deploy.py's `DeployTarget` returns.
    """

    def open(self) -> Any:
        """Reach the device and ready its agent."""
        ...

    def install(self, model: bytes, sha256: str, reference: bytes, reference_sha256: str,
                meta: dict[str, Any], keep: int, health_timeout: float | None = None) -> dict[str, Any]:
        """Put the model and its reference data on the device and make it current (health-checked with a timeout)."""
        ...

    def health(self, timeout: float | None = None) -> dict[str, Any]:
        """The health check of the current version."""
        ...

    def rollback(self, from_version: str | None = None, allow_empty: bool = False) -> dict[str, Any]:
        """Back to the version before current (only if current is `from_version`, when given)."""
        ...

    def status(self) -> dict[str, Any]:
        """Current, previous and kept versions."""
        ...

    def close(self) -> None:
        """Let go of whatever is open."""
        ...


@dataclass(frozen=True)
class TransportKind:
    """One kind of transport, as registered: its name and how to make its objects for a device.

    `transport(device)` makes the `Transport` a run measures through. `deploy(device,
    command_timeout_s, connect_timeout_s)`, when given, makes the `Deployable` a rollout drives;
    a kind without it cannot be deployed to, and a rollout says so. `ready(transport)` is the
    check at the start of a run (default: the agent's `info`).
    """

    name: str
    transport: Callable[[Device], Transport]
    deploy: Callable[[Device, float, float | None], Deployable] | None = None
    ready: Callable[[Any], Any] | None = None
    description: str = ""


class TransportKinds:
    """The table of transport kinds: a name is registered once (a second registration is refused)."""

    def __init__(self) -> None:
        self.kinds: dict[str, TransportKind] = {}
        self.owners: dict[str, str] = {}

    def register(self, kind: TransportKind, owner: str = "edge-orchestrator") -> None:
        """Add a kind; ValueError for something not a named TransportKind or a name already taken."""
        if not isinstance(kind, TransportKind) or not kind.name or not callable(kind.transport):
            raise ValueError(f"{kind!r} is not a TransportKind with a name and a transport factory")
        if kind.name in self.kinds:
            raise ValueError(f"transport {kind.name!r} from {owner!r} is already registered by {self.owners[kind.name]!r}")
        self.kinds[kind.name] = kind
        self.owners[kind.name] = owner

    def kind(self, device: Device) -> TransportKind:
        """The kind of a device's transport; MeasurementError naming the known ones if there is none."""
        try:
            return self.kinds[device.transport]
        except KeyError:
            raise MeasurementError(f"device {device.name}: transport {device.transport!r} is not installed "
                                   f"(known: {', '.join(sorted(self.kinds))}; a plugin registers more)") from None

    def transport(self, device: Device) -> Transport:
        """The transport a run measures the device through."""
        return self.kind(device).transport(device)

    def ready(self, device: Device) -> None:
        """One check that the device answers now (the start of a run); raises what its transport raises."""
        kind = self.kind(device)
        transport = kind.transport(device)
        try:
            (kind.ready or (lambda t: t.info()))(transport)
        finally:
            transport.close()

    def deployable_reason(self, device: Device) -> str | None:
        """None when the device can be deployed to, else why not (one line)."""
        try:
            kind = self.kind(device)
        except MeasurementError as exc:
            return str(exc).removeprefix(f"device {device.name}: ")
        if kind.deploy is None:
            return f"transport {kind.name!r} has no deploy capability (install, health, rollback, status)"
        return None

    def deployable(self, device: Device, command_timeout_s: float = 120.0,
                   connect_timeout_s: float | None = None) -> Deployable:
        """What a rollout drives on the device; DeployError when its transport cannot deploy."""
        why = self.deployable_reason(device)
        if why is not None:
            raise DeployError(f"device {device.name}: {why}")
        kind = self.kind(device)
        assert kind.deploy is not None
        return kind.deploy(device, command_timeout_s, connect_timeout_s)
