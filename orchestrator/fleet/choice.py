"""Choosing the devices of a run: the profile's reachable registered devices, else an emulated or the local fallback."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from orchestrator.api import DeviceFacts
from orchestrator.config.profile import Profile
from orchestrator.devices.base import Device
from orchestrator.devices.local import local_device
from orchestrator.devices.registry import DeviceRegistry, RegisteredDevice
from orchestrator.errors import (
    DeviceUnreachable,
    HostKeyMismatch,
    MeasurementError,
    OrchestratorError,
)
from orchestrator.fleet.transports import check_ready, make_transport

log = logging.getLogger(__name__)


def reachable_devices(profile_name: str, registry: DeviceRegistry) -> tuple[list[Device], list[dict[str, str]]]:
    """The registered devices of a profile that answer now (agent installed), and those that do not.

    Each device gets one connection attempt, all at once, so this takes at most about
    one connect timeout. Raises DeviceUnreachable, naming every device, if none answers.
    Registered devices' statuses are updated. Each transport kind says what "answers" means
    (orchestrator/fleet/transports.py): an SSH device connects and has the agent installed; an
    emulated device has its emulator, sysroot and CPU model (its agent starts with the first
    measurement); a plugin's kind answers the agent's `info`, unless it says otherwise.
    """
    registered = registry.list(profile_name)

    def check(device: RegisteredDevice) -> str | None:
        if device.emulated_vm:  # its latency is the emulator's: a run would take it for the board's
            return (f"device {device.name!r} is a full-system emulated VM: runs do not measure on it "
                    "(its latency is not the board's; docs/emulation.md)")
        try:
            check_ready(device.device())
        except HostKeyMismatch as exc:
            registry.set_status(device.name, "host-key-changed", str(exc))
            return str(exc)
        except (DeviceUnreachable, MeasurementError) as exc:
            registry.set_status(device.name, "offline", str(exc))
            return str(exc)
        registry.set_status(device.name, "online")
        return None

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(registered)))) as pool:
        reasons = list(pool.map(check, registered))
    reachable = [d.device() for d, why in zip(registered, reasons) if why is None]
    unreachable = [{"name": d.name, "reason": why} for d, why in zip(registered, reasons) if why is not None]
    if not reachable:
        raise DeviceUnreachable(f"profile {profile_name!r}: no registered device is reachable: "
                                + "; ".join(u["reason"] for u in unreachable))
    return reachable, unreachable


def choose_devices(profile_name: str, fallback: str, cpus: int,
                   ray_address: str | None = None,
                   profile: Profile | None = None) -> tuple[list[Device], dict[str, Any]]:
    """The devices a run measures on, and what results.json says of them.

    The registered devices of the profile that answer now; with none registered, the
    profile's fallback device: this machine (`local`), or the profile's QEMU-emulated device
    (`emulated`, built on first use; this machine when QEMU or its sysroot is unavailable), which
    the description says. Registered devices that all fail to answer raise DeviceUnreachable
    (exit code 4). `profile` is needed for the emulated fallback and its labels.
    """
    from orchestrator.emulation.rule import emulated_fallback

    registry = DeviceRegistry()
    unreachable: list[dict[str, str]] = []
    if registry.list(profile_name):
        devices, unreachable = reachable_devices(profile_name, registry)
        names = ", ".join(f"{d.name} ({d.ssh.address if d.ssh else d.transport})" for d in devices)
        plural = "s" if len(devices) > 1 else ""
        note = f"this run measures on the registered device{plural} of profile {profile_name!r}: {names}"
        if unreachable:
            note += "; unreachable, skipped: " + ", ".join(u["name"] for u in unreachable)
        source = "registry"
    elif fallback in ("local", "emulated"):
        device, why = None, "the profile was not given"
        if fallback == "emulated" and profile is not None:
            device, why = emulated_fallback(profile, cpus, ray_address)
        if device is not None:
            note = (f"no device is registered for profile {profile_name!r}: this run measures on the profile's "
                    f"emulated device {device.name} (QEMU user mode, -cpu {device.extra['qemu_cpu']}){why}")
        else:
            device = local_device()
            # The local device measures on the last core; compression trials keep to the others.
            device.pinned_cpu = cpus - 1 if cpus > 1 and not ray_address else None
            note = (f"no device is registered for profile {profile_name!r}: this run measures on the fallback device "
                    f"{device.name} (this machine)")
            if fallback == "emulated":
                note += f", not on the profile's emulated device: {why}"
        devices, source = [device], "fallback"
    else:
        raise DeviceUnreachable(f"profile {profile_name!r}: no registered device and no fallback device")
    return devices, describe_devices(devices, source, note, unreachable, profile)


def describe_devices(devices: list[Device], source: str, note: str, unreachable: list[dict[str, str]] | None = None,
                     profile: Profile | None = None) -> dict[str, Any]:
    """What results.json says of a run's devices (`source`: registry, fallback or given)."""
    from orchestrator.emulation.icount import cost_model
    from orchestrator.emulation.rule import emulation_note, fallback_line, latency_constraint, latency_source

    described = [d.describe() for d in devices]
    archs = sorted({d["arch"] for d in described})
    info = {
        "name": ", ".join(d["name"] for d in described),
        "arch": ", ".join(archs),
        "transport": ", ".join(sorted({d["transport"] for d in described})),
        "emulated": any(d["emulated"] for d in described),
        "pinned_cpu": described[0]["pinned_cpu"] if len(described) == 1 else None,
        "source": source,
        "note": note,
        "devices": described,
        "unreachable": unreachable or [],
    }
    if info["emulated"]:
        info["note"] += ". " + emulation_note(profile)
        cpus_emulated = sorted({str(d.extra.get("qemu_cpu")) for d in devices if d.emulated})
        info.update(latency_source=latency_source(profile), qemu_cpu=", ".join(cpus_emulated))
        if profile is not None and profile.emulation is not None:
            info.update(latency_scale=profile.emulation.latency_scale, latency_constraint=latency_constraint(profile))
            if latency_source(profile) == "emulated-icount":
                model = cost_model(profile)  # a calibration stored for the profile, else the profile's
                info.update(calibrated=model.calibrated, cost_model=asdict(model))
            elif fallback_line(profile):  # the profile asked for counting, which cannot run here
                info.update(latency_requested=profile.emulation.latency, latency_fallback=fallback_line(profile))
    return info


def device_facts(device: Device, profile: Profile) -> DeviceFacts:
    """What techniques condition their recommendations on, asked of the device's agent (`info`).

    A device that does not answer is described by its registered arch only; the search then
    starts from the recommendations for that arch, and the measurement reports the failure.
    """
    transport = None
    try:
        transport = make_transport(device)
        info = transport.info()
    except (OrchestratorError, OSError) as exc:
        log.warning("device %s: no info for the recommendations (%s)", device.name, exc)
        info = {"arch": device.arch}
    finally:
        if transport is not None:
            transport.close()
    return DeviceFacts.from_info(info, profile.runtime.execution_providers)
