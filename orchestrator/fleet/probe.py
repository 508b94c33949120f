"""Probing and removing registered devices (an emulated VM is stopped and its folder removed)."""

from __future__ import annotations

import shutil
from pathlib import Path

from orchestrator.config.profile import load_profile
from orchestrator.devices.registry import DeviceRegistry, RegisteredDevice
from orchestrator.errors import DeviceUnreachable, HostKeyMismatch, MeasurementError
from orchestrator.fleet.emulated import emulated_fit_profile, emulated_view_dir, stop_vm
from orchestrator.fleet.registration import check_fit
from orchestrator.fleet.transports import make_transport
from orchestrator.state.paths import state_dir


def remove_device(name: str, registry: DeviceRegistry | None = None) -> str:
    """Forget a device; an emulated one's own files (its device view) go with it, a VM is stopped. What was done."""
    registry = registry or DeviceRegistry()
    device = registry.get(name)
    registry.remove(name)
    if device.emulated_vm:
        return f"removed {name}: {stop_vm(device)} (the cached VM image stays)"
    if not device.emulated:
        return f"removed {name} (its files under {device.remote_dir} on {device.host} are left in place)"
    view = Path(device.extra.get("view") or emulated_view_dir(name))
    # only a folder this code made for the device: under the state folder's emulated/devices/
    owned = view.resolve().parent == (state_dir() / "emulated" / "devices").resolve()
    if owned and view.exists():
        shutil.rmtree(view)
        return f"removed {name} and its device view {view} (the shared arm64 sysroot stays cached)"
    return f"removed {name} (nothing of its own on disk; the shared arm64 sysroot stays cached)"


def probe_device(name: str, registry: DeviceRegistry | None = None) -> tuple[RegisteredDevice, list[str]]:
    """Connect to a registered device, refresh its info and status; returns it and what no longer fits its profile."""
    registry = registry or DeviceRegistry()
    device = registry.get(name)
    try:
        transport = make_transport(device.device())
    except MeasurementError as exc:  # an emulated device whose emulator or sysroot is gone, an unknown kind
        registry.set_status(name, "offline", str(exc))
        raise
    try:
        info = transport.info()
    except HostKeyMismatch as exc:
        registry.set_status(name, "host-key-changed", str(exc))
        raise
    except (DeviceUnreachable, MeasurementError) as exc:
        registry.set_status(name, "offline", str(exc))
        raise
    finally:
        transport.close()
    registry.set_status(name, "online", info=info)
    problems = []
    if Path(device.profile_path).is_file():
        profile = load_profile(device.profile_path).profile
        emulated = device.emulated or device.emulated_vm
        problems = check_fit(info, emulated_fit_profile(profile)[0] if emulated else profile)
    return registry.get(name), problems
