"""The one place a device's transport kind is chosen: the built-in kinds and every plugin's, in one table.

Built in: `local` (this machine, orchestrator/devices/local.py), `ssh` (orchestrator/devices/ssh.py; it
can be deployed to, orchestrator/devices/ssh_deploy.py) and `qemu` (an emulated board,
orchestrator/emulation/rule.py). A plugin adds a kind with the `register_transports` hook
(docs/plugins.md); the plugins are loaded only when a device's kind is not a built-in one.
"""

from __future__ import annotations

from orchestrator.devices.base import Device
from orchestrator.devices.local import LocalTransport
from orchestrator.devices.registry import RegisteredDevice
from orchestrator.devices.transport import BUILTIN_KINDS, Deployable, Transport, TransportKind, TransportKinds
from orchestrator.hooks.manager import get_plugin_manager


def _ssh(device: Device) -> Transport:
    from orchestrator.devices.ssh import SshTransport  # paramiko only where SSH is used

    return SshTransport(device)


def _ssh_deploy(device: Device, command_timeout_s: float, connect_timeout_s: float | None) -> Deployable:
    from orchestrator.devices.ssh_deploy import DeployTarget

    return DeployTarget(device, command_timeout_s, connect_timeout_s)


def _qemu(device: Device) -> Transport:
    # An emulated device measures by the rule of docs/emulation.md: the candidate is checked under
    # QEMU, its latency is this host's, scaled by the profile.
    from orchestrator.emulation.rule import EmulatedDeviceTransport

    return EmulatedDeviceTransport(device)


BUILTIN = (
    TransportKind("local", LocalTransport, description="this machine; the agent runs as a child process"),
    TransportKind("ssh", _ssh, deploy=_ssh_deploy, ready=lambda t: t.ready(),
                  description="a device reached over SSH with a pinned host key"),
    # making the transport checks the emulator, the sysroot and the CPU model: that is the whole check
    TransportKind("qemu", _qemu, ready=lambda t: None, description="an aarch64 board emulated with QEMU user mode"),
)
assert tuple(k.name for k in BUILTIN) == BUILTIN_KINDS  # the names plugins may not take


def transport_kinds(kind: str | None = None) -> TransportKinds:
    """The table: the built-in kinds, plus the plugins' when `kind` is not a built-in one (or None)."""
    table = TransportKinds()
    for builtin in BUILTIN:
        table.register(builtin)
    if kind is None or kind not in table.kinds:
        registry = get_plugin_manager()  # it refused a plugin's kind under a name already taken
        for plugin_kind, plugin in registry.transports.values():
            table.register(plugin_kind, plugin)
    return table


def make_transport(device: Device) -> Transport:
    """The transport a run measures the device through."""
    return transport_kinds(device.transport).transport(device)


def check_ready(device: Device) -> None:
    """One check that the device answers now (connect and install the agent, or its kind's own check)."""
    transport_kinds(device.transport).ready(device)


def deployable_reason(device: Device) -> str | None:
    """None when a rollout can drive the device, else why not."""
    return transport_kinds(device.transport).deployable_reason(device)


def deploy_target(device: Device | RegisteredDevice, command_timeout_s: float = 120.0,
                  connect_timeout_s: float | None = None) -> Deployable:
    """What a rollout drives on a device (registered or not); DeployError when its kind cannot deploy."""
    target = device.device() if isinstance(device, RegisteredDevice) else device
    return transport_kinds(target.transport).deployable(target, command_timeout_s, connect_timeout_s)
