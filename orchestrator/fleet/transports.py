"""The transport object for a device: local, SSH (orchestrator/devices/ssh.py) or emulated (orchestrator/emulation/rule.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.devices.base import Device
from orchestrator.devices.local import LocalTransport
from orchestrator.errors import MeasurementError

if TYPE_CHECKING:  # pydantic stays out of `orchestrate --help`
    pass


def make_transport(device: Device) -> Any:
    """The transport object for a device."""
    if device.transport == "local":
        return LocalTransport(device)
    if device.transport == "ssh" and device.ssh is not None:
        from orchestrator.devices.ssh import SshTransport  # paramiko only where SSH is used

        return SshTransport(device)
    if device.transport == "qemu":
        # An emulated device measures by the rule of docs/emulation.md: the candidate is checked under
        # QEMU (QemuUserTransport.from_device), its latency is this host's, scaled by the profile.
        from orchestrator.emulation.rule import EmulatedDeviceTransport

        return EmulatedDeviceTransport(device)
    raise MeasurementError(f"device {device.name}: transport {device.transport!r} is not available yet")
