"""Registering emulated devices (QEMU user mode or a full-system VM) as devices of a profile."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from orchestrator.config.profile import Profile, load_profile
from orchestrator.devices.base import Device
from orchestrator.devices.registry import DeviceRegistry, RegisteredDevice
from orchestrator.emulation.sysroot import SysrootBuildError, build_sysroot
from orchestrator.emulation.system_image import (
    GUEST_PYTHON,
    GUEST_USER,
    VmError,
    build_system_image,
    qemu_system_binary,
)
from orchestrator.emulation.system_vm import BOOT_TIMEOUT_S, QemuSystemVM
from orchestrator.emulation.user import (
    emulated_device_for_profile,
    qemu_binary,
    qemu_cpu_models,
    resolve_qemu_cpu,
)
from orchestrator.errors import (
    DeviceRefused,
    EmulationUnavailable,
    MeasurementError,
)
from orchestrator.fleet.registration import Registration, check_fit, pin_host_key
from orchestrator.fleet.transports import make_transport
from orchestrator.state.paths import state_dir


def emulated_fit_profile(profile: Profile) -> tuple[Profile, list[str]]:
    """The profile an emulated board is checked against, and what emulation leaves out.

    Only CPUExecutionProvider runs under emulation: GPU providers (a Jetson's CUDA, TensorRT)
    are not asked of the emulated device; the note says so.
    """
    providers = profile.runtime.execution_providers
    if providers == ["CPUExecutionProvider"]:
        return profile, []
    fit = profile.model_copy(deep=True)
    fit.runtime.execution_providers = ["CPUExecutionProvider"]
    left_out = [p for p in providers if p != "CPUExecutionProvider"]
    return fit, [f"{', '.join(left_out)} not emulated: only CPUExecutionProvider runs under emulation"]


def emulated_view_dir(name: str) -> Path:
    """The folder a registered emulated device owns (its device view), removed with it."""
    return state_dir() / "emulated" / "devices" / name


def emulate_device(profile_path: str | Path, name: str | None = None, mode: str = "user",
                   sysroot: str | Path | None = None, tags: list[str] | None = None,
                   registry: DeviceRegistry | None = None,
                   log: Callable[[str], None] | None = None) -> tuple[RegisteredDevice, list[str]]:
    """Build (or reuse) the emulated device of a profile's `emulation` section and register it.

    The arm64 sysroot is shared and cached (orchestrator/emulation/sysroot.py); the device owns only
    its device view (`emulated_view_dir`). Its agent's `info` under the emulator is checked
    against the profile like a real board's. Returns the stored device and notes on what
    emulation leaves out. Raises EmulationUnavailable (no emulation section, no QEMU, a mode not
    built) or DeviceRefused (name taken, does not fit).
    """
    registry = registry or DeviceRegistry()
    loaded = load_profile(profile_path)
    profile = loaded.profile
    if profile.emulation is None:
        raise EmulationUnavailable(f"profile {profile.name!r} ({profile_path}) has no emulation section: "
                                   "nothing says which board to emulate")
    if mode == "system":
        return emulate_system_device(profile_path, name, tags, registry, log)
    if mode != "user":
        raise EmulationUnavailable(f"--mode {mode}: unknown (user or system)")
    if qemu_binary() is None:
        raise EmulationUnavailable("qemu-aarch64-static is not installed (apt-get install qemu-user-static)")
    name = name or f"emulated-{profile.name}"
    if any(d.name == name for d in registry.list()):
        raise DeviceRefused(f"a device named {name!r} is already registered (orchestrate devices remove {name} first)")
    try:
        root = build_sysroot(sysroot, log=log)
    except SysrootBuildError as exc:
        raise EmulationUnavailable(f"cannot build the arm64 sysroot: {exc}") from None
    view = emulated_view_dir(name)
    shutil.rmtree(view, ignore_errors=True)  # a leftover of a device of this name removed by hand
    device = emulated_device_for_profile(name, profile, root, view)
    try:
        transport = make_transport(device)
        info = transport.info()
        fit, notes = emulated_fit_profile(profile)
        problems = check_fit(info, fit)
        if problems:
            raise DeviceRefused(f"emulated device {name!r} does not fit profile {profile.name!r}: "
                                f"{'; '.join(problems)}; not registered")
    except MeasurementError as exc:
        shutil.rmtree(view, ignore_errors=True)
        raise EmulationUnavailable(f"emulated device {name!r}: the agent does not run under the emulator: "
                                   f"{str(exc).removeprefix(f'device {name}: ')}; not registered") from None
    except DeviceRefused:
        shutil.rmtree(view, ignore_errors=True)
        raise
    stored = RegisteredDevice(
        name=name, host="", port=0, user="", key_path=None, host_key="", profile=profile.name,
        profile_path=str(Path(profile_path).resolve()), tags=list(tags or []), python="/usr/bin/python3",
        remote_dir="", arch=info.get("arch"), info=info, last_seen=time.time(), transport="qemu",
        extra=dict(device.extra),
    )
    registry.add(stored)
    return stored, notes


def emulated_vm_dir(name: str) -> Path:
    """The run folder of a registered full-system VM (vm.json, console.log), removed with it."""
    return state_dir() / "emulated" / "vms" / name


def emulate_system_device(profile_path: str | Path, name: str | None = None, tags: list[str] | None = None,
                          registry: DeviceRegistry | None = None, log: Callable[[str], None] | None = None,
                          image: str | Path | None = None,
                          boot_timeout_s: float | None = None) -> tuple[RegisteredDevice, list[str]]:
    """Build (or reuse) the full-system VM image, start the VM in the background, register it as an SSH device.

    The VM keeps running after this returns (its pid is in the row's `extra`); `remove_device`
    stops it. Its host key was generated on this host when the image was built, so it is pinned
    by fingerprint, never trusted on first use. Raises EmulationUnavailable or DeviceRefused.
    """
    registry = registry or DeviceRegistry()
    loaded = load_profile(profile_path)
    profile, emu = loaded.profile, loaded.profile.emulation
    if emu is None:
        raise EmulationUnavailable(f"profile {profile.name!r} ({profile_path}) has no emulation section: "
                                   "nothing says which board to emulate")
    binary = qemu_system_binary()
    if binary is None:
        raise EmulationUnavailable("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
    name = name or f"emulated-{profile.name}"
    if any(d.name == name for d in registry.list()):
        raise DeviceRefused(f"a device named {name!r} is already registered (orchestrate devices remove {name} first)")
    try:
        qemu_cpu, cpu_note = resolve_qemu_cpu(emu.qemu_cpu, qemu_cpu_models(binary))
    except MeasurementError as exc:
        raise EmulationUnavailable(str(exc)) from None
    try:
        built = Path(image) if image is not None else build_system_image(log=log)
    except SysrootBuildError as exc:
        raise EmulationUnavailable(f"cannot build the VM image: {exc}") from None
    run_dir = emulated_vm_dir(name)
    shutil.rmtree(run_dir, ignore_errors=True)
    vm = QemuSystemVM(built, run_dir, qemu_cpu, emu.cores, emu.memory_mb)
    if log:
        log(f"starting the VM (qemu-system-aarch64 -cpu {qemu_cpu} -smp {emu.cores} -m {emu.memory_mb}, no KVM); "
            "waiting for its sshd")
    try:
        vm.start(boot_timeout_s or BOOT_TIMEOUT_S)
    except SysrootBuildError as exc:
        raise EmulationUnavailable(f"emulated device {name!r}: {exc}") from None
    try:
        fit, notes = emulated_fit_profile(profile)
        if cpu_note:
            notes.append(cpu_note)
        reg = Registration(name=name, host="127.0.0.1", port=vm.port, user=GUEST_USER, key_path=str(vm.client_key),
                           profile_path=str(profile_path), tags=list(tags or []), python=GUEST_PYTHON,
                           host_key_fingerprint=vm.host_key_fingerprint, connect_timeout_s=60.0)
        host_key, _ = pin_host_key(reg, lambda question: False)  # by fingerprint: nothing is asked
        device = RegisteredDevice(
            name=name, host=reg.host, port=reg.port, user=reg.user, key_path=reg.key_path, host_key=host_key,
            profile=profile.name, profile_path=str(Path(profile_path).resolve()), tags=list(reg.tags),
            python=reg.python, remote_dir=reg.remote_dir,
            extra={"emulated": True, "mode": "system", "qemu_cpu": qemu_cpu, "cores": emu.cores,
                   "memory_mb": emu.memory_mb, "image": str(built), "vm_dir": str(run_dir), "vm_pid": vm.pid,
                   "ssh_seconds": vm.ssh_seconds},
        )
        target = device.ssh_target()
        target.connect_timeout_s = reg.connect_timeout_s
        transport = make_transport(Device(name=name, transport="ssh", arch="aarch64", ssh=target))
        try:
            info = transport.info()
        finally:
            transport.close()
        problems = check_fit(info, fit)
        if problems:
            raise DeviceRefused(f"emulated device {name!r} does not fit profile {profile.name!r}: "
                                f"{'; '.join(problems)}; not registered")
        device.info, device.arch, device.last_seen = {**info, "emulated": True, "qemu_mode": "system",
                                                      "qemu_cpu": qemu_cpu}, info.get("arch"), time.time()
        registry.add(device)
    except BaseException:
        vm.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return device, notes


def stop_vm(device: RegisteredDevice) -> str:
    """Stop a registered full-system VM by its recorded pid (checked to be its qemu); what was done."""
    run_dir = Path(device.extra.get("vm_dir") or emulated_vm_dir(device.name))
    try:
        vm = QemuSystemVM.attach(run_dir)
    except VmError:
        return "its VM was not recorded"
    stopped = vm.stop()
    if run_dir.resolve().parent == (state_dir() / "emulated" / "vms").resolve():
        shutil.rmtree(run_dir, ignore_errors=True)
    return "its VM (pid {}) stopped".format(device.extra.get("vm_pid")) if stopped else "its VM was not running"
