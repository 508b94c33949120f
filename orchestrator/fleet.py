"""The fleet: registering devices (host key pinned, agent installed, fit to the profile checked),
registering emulated ones (QEMU), probing them, and choosing the reachable devices of a profile for a run.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.devices import CONNECT_TIMEOUT_S, DEFAULT_REMOTE_DIR, Device
from orchestrator.errors import (
    DeviceRefused,
    DeviceUnreachable,
    EmulationUnavailable,
    HostKeyMismatch,
    MeasurementError,
)
from orchestrator.paths import state_dir
from orchestrator.profile import Profile, load_profile
from orchestrator.registry import DeviceRegistry, RegisteredDevice

ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
# Kernels report less than the nominal RAM (firmware, GPU carve-outs): a 4 GB Pi 4 shows about 3.8 GB.
MEMORY_TOLERANCE = 0.85
# known_hosts names an RSA key "ssh-rsa"; the handshake asks for it by its signature algorithm.
_HANDSHAKE_TYPE = {"ssh-rsa": "rsa-sha2-512"}


@dataclass
class Registration:
    """What `orchestrate devices register` (or one inventory host) asks for."""

    name: str
    host: str
    user: str
    profile_path: str
    port: int = 22
    key_path: str | None = None
    tags: list[str] = field(default_factory=list)
    python: str = "python3"
    remote_dir: str = DEFAULT_REMOTE_DIR
    host_key_fingerprint: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    connect_timeout_s: float = CONNECT_TIMEOUT_S


def check_fit(info: dict[str, Any], profile: Profile) -> list[str]:
    """What keeps a device (its agent's `info`) from fitting a profile: arch, memory, runtime. [] if it fits."""
    problems = []
    arch = ARCH_ALIASES.get(info.get("arch") or "", info.get("arch"))
    if arch != profile.hardware.arch:
        problems.append(f"arch is {arch}, the profile needs {profile.hardware.arch}")
    memory, nominal = info.get("memory_mb"), profile.hardware.memory_mb
    if memory is not None and memory < MEMORY_TOLERANCE * nominal:
        problems.append(f"memory is {memory} MB, the profile needs {nominal} MB (at least {int(MEMORY_TOLERANCE * nominal)})")
    if not info.get("onnxruntime"):
        problems.append("onnxruntime is not installed for the device's Python (see --python)")
    else:
        have = info.get("providers") or []
        missing = [p for p in profile.runtime.execution_providers if p not in have]
        if missing:
            problems.append(f"onnxruntime {info['onnxruntime']} lacks {', '.join(missing)} (it has {', '.join(have) or 'none'})")
    return problems


def _normalise_fingerprint(text: str) -> str:
    text = text.strip()
    return text if text.startswith("SHA256:") else f"SHA256:{text}"


def pin_host_key(reg: Registration, confirm: Callable[[str], bool]) -> tuple[str, str]:
    """The host key to pin, as (`TYPE BASE64`, how it was vouched for).

    In order: the fingerprint given (`--host-key-fingerprint`), else the key known_hosts
    holds for the address, else the offered key if `confirm(question)` says yes.
    """
    from orchestrator.hostkeys import host_key_line, known_hosts_keys, offered_host_key, offered_host_keys

    where, t = f"{reg.host}:{reg.port}", reg.connect_timeout_s
    if reg.host_key_fingerprint:
        wanted = _normalise_fingerprint(reg.host_key_fingerprint)
        keys = [offered_host_key(reg.host, reg.port, t)]
        if keys[0].fingerprint != wanted:  # it may be another of the server's keys
            keys = offered_host_keys(reg.host, reg.port, t) or keys
        for key in keys:
            if key.fingerprint == wanted:
                return host_key_line(key), "matches the given fingerprint"
        offered = ", ".join(f"{k.get_name()} {k.fingerprint}" for k in keys)
        raise HostKeyMismatch(f"device {reg.name!r}: {where} offers {offered}, not {wanted} "
                              "(the fingerprint given); not registered")
    known = known_hosts_keys(reg.host, reg.port, reg.known_hosts)
    if known:
        for key in known:
            try:
                offered = offered_host_key(reg.host, reg.port, t, _HANDSHAKE_TYPE.get(key.get_name(), key.get_name()))
            except DeviceUnreachable:
                continue  # the server has no key of this type
            if offered == key:
                return host_key_line(key), f"matches {reg.known_hosts}"
            raise HostKeyMismatch(f"device {reg.name!r}: {where} offers {offered.get_name()} {offered.fingerprint}, "
                                  f"but {reg.known_hosts} has {key.fingerprint}; not registered")
        raise HostKeyMismatch(f"device {reg.name!r}: {where} offers none of the keys {reg.known_hosts} has for it; "
                              "not registered")
    key = offered_host_key(reg.host, reg.port, t)
    if not confirm(f"{where} offers host key {key.get_name()} {key.fingerprint}. Pin it for device {reg.name!r}?"):
        raise DeviceRefused(f"device {reg.name!r}: host key not confirmed; not registered")
    return host_key_line(key), "confirmed"


def register_device(reg: Registration, confirm: Callable[[str], bool],
                    registry: DeviceRegistry | None = None) -> tuple[RegisteredDevice, str]:
    """Pin the host key, connect with it, install the agent, run `info`, check the fit, store the device.

    Returns (the stored device, how its host key was vouched for). Refuses (DeviceRefused)
    a device that does not fit its profile, saying what does not fit.
    """
    from orchestrator.ssh import SshTransport

    registry = registry or DeviceRegistry()
    loaded = load_profile(reg.profile_path)
    if any(d.name == reg.name for d in registry.list()):
        raise DeviceRefused(f"a device named {reg.name!r} is already registered "
                            f"(orchestrate devices remove {reg.name} first)")
    host_key, how = pin_host_key(reg, confirm)
    device = RegisteredDevice(
        name=reg.name, host=reg.host, port=reg.port, user=reg.user, key_path=reg.key_path, host_key=host_key,
        profile=loaded.profile.name, profile_path=str(Path(reg.profile_path).resolve()), tags=list(reg.tags),
        python=reg.python, remote_dir=reg.remote_dir,
    )
    transport = SshTransport(device.device())
    try:
        info = transport.info()
    finally:
        transport.close()
    problems = check_fit(info, loaded.profile)
    if problems:
        raise DeviceRefused(f"device {reg.name!r} does not fit profile {loaded.profile.name!r}: "
                            f"{'; '.join(problems)}; not registered")
    device.info, device.arch, device.last_seen = info, info.get("arch"), time.time()
    registry.add(device)
    return device, how


def _agent_transport(device: RegisteredDevice) -> Any:
    """What runs the agent of a registered device: SSH, or the emulator itself for an emulated device."""
    if device.emulated:
        from orchestrator.qemu import QemuUserTransport

        return QemuUserTransport.from_device(device.device())
    from orchestrator.ssh import SshTransport

    return SshTransport(device.device())


def _close(transport: Any) -> None:
    close = getattr(transport, "close", None)  # an emulated device keeps nothing open
    if close is not None:
        close()


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

    The arm64 sysroot is shared and cached (orchestrator/qemu_build.py); the device owns only
    its device view (`emulated_view_dir`). Its agent's `info` under the emulator is checked
    against the profile like a real board's. Returns the stored device and notes on what
    emulation leaves out. Raises EmulationUnavailable (no emulation section, no QEMU, a mode not
    built) or DeviceRefused (name taken, does not fit).
    """
    from orchestrator.qemu import QemuUserTransport, emulated_device_for_profile, qemu_binary
    from orchestrator.qemu_build import SysrootBuildError, build_sysroot

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
        info = QemuUserTransport.from_device(device).info()
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
    from orchestrator.qemu import qemu_cpu_models, resolve_qemu_cpu
    from orchestrator.qemu_build import SysrootBuildError
    from orchestrator.qemu_system import (
        BOOT_TIMEOUT_S, GUEST_PYTHON, GUEST_USER, QemuSystemVM, build_system_image, qemu_system_binary)
    from orchestrator.ssh import SshTransport

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
        target = device.target()
        target.connect_timeout_s = reg.connect_timeout_s
        transport = SshTransport(Device(name=name, transport="ssh", arch="aarch64", ssh=target))
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


def _stop_vm(device: RegisteredDevice) -> str:
    """Stop a registered full-system VM by its recorded pid (checked to be its qemu); what was done."""
    from orchestrator.qemu_system import QemuSystemVM, VmError

    run_dir = Path(device.extra.get("vm_dir") or emulated_vm_dir(device.name))
    try:
        vm = QemuSystemVM.attach(run_dir)
    except VmError:
        return "its VM was not recorded"
    stopped = vm.stop()
    if run_dir.resolve().parent == (state_dir() / "emulated" / "vms").resolve():
        shutil.rmtree(run_dir, ignore_errors=True)
    return "its VM (pid {}) stopped".format(device.extra.get("vm_pid")) if stopped else "its VM was not running"


def remove_device(name: str, registry: DeviceRegistry | None = None) -> str:
    """Forget a device; an emulated one's own files (its device view) go with it, a VM is stopped. What was done."""
    registry = registry or DeviceRegistry()
    device = registry.get(name)
    registry.remove(name)
    if device.emulated_vm:
        return f"removed {name}: {_stop_vm(device)} (the cached VM image stays)"
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
        transport = _agent_transport(device)
    except MeasurementError as exc:  # an emulated device whose emulator or sysroot is gone
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
        _close(transport)
    registry.set_status(name, "online", info=info)
    problems = []
    if Path(device.profile_path).is_file():
        profile = load_profile(device.profile_path).profile
        emulated = device.emulated or device.emulated_vm
        problems = check_fit(info, emulated_fit_profile(profile)[0] if emulated else profile)
    return registry.get(name), problems


def reachable_devices(profile_name: str, registry: DeviceRegistry) -> tuple[list[Device], list[dict[str, str]]]:
    """The registered devices of a profile that answer now (agent installed), and those that do not.

    Each device gets one connection attempt, all at once, so this takes at most about
    one connect timeout. Raises DeviceUnreachable, naming every device, if none answers.
    Registered devices' statuses are updated. An emulated device is ready when its emulator,
    sysroot and CPU model are there (its agent starts with the first measurement).
    """
    from orchestrator.ssh import SshTransport

    registered = registry.list(profile_name)

    def check(device: RegisteredDevice) -> str | None:
        if device.emulated_vm:  # its latency is the emulator's: a run would take it for the board's
            return (f"device {device.name!r} is a full-system emulated VM: runs do not measure on it "
                    "(its latency is not the board's; docs/emulation.md)")
        if device.emulated:
            try:
                _agent_transport(device)
            except MeasurementError as exc:
                registry.set_status(device.name, "offline", str(exc))
                return str(exc)
            registry.set_status(device.name, "online")
            return None
        transport = SshTransport(device.device())
        try:
            transport.ready()
        except HostKeyMismatch as exc:
            registry.set_status(device.name, "host-key-changed", str(exc))
            return str(exc)
        except (DeviceUnreachable, MeasurementError) as exc:
            registry.set_status(device.name, "offline", str(exc))
            return str(exc)
        finally:
            transport.close()
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
