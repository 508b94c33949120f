"""`orchestrate devices calibrate NAME`: a registered real device, its profile and its emulated twin, handed to
the calibration (orchestrator/emulation/calibrate.py, docs/emulation.md)."""

from __future__ import annotations

from typing import Any, Callable

from orchestrator.config.profile import load_profile
from orchestrator.devices.registry import DeviceRegistry
from orchestrator.emulation.calibrate import FINAL_ROUNDS, calibrate
from orchestrator.emulation.sysroot import SysrootBuildError, build_sysroot
from orchestrator.emulation.user import emulated_device_for_profile
from orchestrator.errors import MeasurementError
from orchestrator.fleet.transports import make_transport


def calibrate_registered(name: str, registry: DeviceRegistry | None = None, jobs: int = 1,
                         rounds: int = FINAL_ROUNDS, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Calibrate the emulated twin of registered device `name` (a real one) and store it for its profile."""
    stored = (registry or DeviceRegistry()).get(name)
    if stored.emulated or stored.emulated_vm:
        raise MeasurementError(f"device {name} is emulated: calibrate a real board (its twin is emulated for it)")
    profile = load_profile(stored.profile_path).profile
    device = stored.device()
    emulated = None
    if (device.arch or "").lower() in ("aarch64", "arm64") and profile.emulation is not None:
        try:  # the board's twin: the profile's emulated device (the shared arm64 sysroot, built once)
            emulated = make_transport(emulated_device_for_profile(f"twin-{name}", profile, build_sysroot(None, log=log)))
        except SysrootBuildError as exc:
            raise MeasurementError(f"cannot build the arm64 sysroot of the emulated twin: {exc}") from None
    transport = make_transport(device)
    try:
        info = transport.info()
        return calibrate(transport, device, profile, info, jobs=jobs, rounds=rounds, log=log, emulated=emulated)
    finally:
        transport.close()
