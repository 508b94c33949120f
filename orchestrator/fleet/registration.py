"""Registering a device: its host key pinned, the agent installed, its fit to the profile checked."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.config.profile import Profile, load_profile
from orchestrator.devices.base import CONNECT_TIMEOUT_S, DEFAULT_REMOTE_DIR
from orchestrator.devices.registry import DeviceRegistry, RegisteredDevice
from orchestrator.errors import (
    DeviceRefused,
    DeviceUnreachable,
    HostKeyMismatch,
)
from orchestrator.fleet.transports import make_transport

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
    from orchestrator.devices.hostkeys import host_key_line, known_hosts_keys, offered_host_key, offered_host_keys

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
    transport = make_transport(device.device())
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
