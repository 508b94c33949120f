"""What this device is: CPU, memory, OS, runtime, sensors and thermal state (``info``), and the
sha256 of a file on it (``sha256``, the check of every upload). Runs on the device: see agents/kernel.py.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import shutil
import subprocess

from agents.kernel import AgentError, ExitCode, file_sha256, ort
from agents.sensors import energy_sensor_names, read_int_file, read_text_file, sys_path

# ARM "CPU part" codes (implementer 0x41) for the cores found on common edge boards.
ARM_CPU_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
}


def parse_cpuinfo(text: str) -> str | None:
    """CPU model from /proc/cpuinfo text: "model name", else "Hardware", else the ARM "CPU part"."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    if "model name" in fields:
        return fields["model name"]
    if "hardware" in fields:
        return fields["hardware"]
    part = fields.get("cpu part")
    if part:
        return "ARM " + ARM_CPU_PARTS[part.lower()] if part.lower() in ARM_CPU_PARTS else "ARM CPU part " + part
    return None


# CPU features that decide which int8/fp16 kernels are fast (what techniques' recommendations read).
ISA_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "f16c",  # x86-64
                "asimd", "asimddp", "asimdhp", "fphp", "i8mm", "sve", "bf16")  # aarch64


def parse_isa(text: str) -> list[str]:
    """The ISA_FEATURES present in /proc/cpuinfo text ("flags" on x86, "Features" on ARM), sorted."""
    found = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            found.update(value.split())
    return sorted(f for f in ISA_FEATURES if f in found)


def cpu_model() -> str | None:
    """Human-readable CPU model of this device."""
    return parse_cpuinfo(read_text_file("/proc/cpuinfo") or "") or platform.processor() or None


def memory_mb() -> int | None:
    """Total RAM in MiB from /proc/meminfo MemTotal (sysconf as a fallback)."""
    for line in (read_text_file("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            try:
                return int(line.split()[1]) // 1024
            except (IndexError, ValueError):
                break
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (AttributeError, ValueError, OSError):
        return None


def read_thermal() -> list[dict]:
    """[{zone, type, temp_c}] for every /sys/class/thermal/thermal_zone*."""
    zones = []
    for zone_dir in glob.glob(sys_path("/sys/class/thermal/thermal_zone*")):
        name = os.path.basename(zone_dir)
        millideg = read_int_file(os.path.join(zone_dir, "temp"))
        zones.append({
            "zone": name,
            "type": read_text_file(os.path.join(zone_dir, "type")),
            "temp_c": millideg / 1000.0 if millideg is not None else None,
        })
    return sorted(zones, key=lambda z: int("0" + "".join(c for c in z["zone"] if c.isdigit())))


def cpu_governor() -> str | None:
    """The cpufreq scaling governor of cpu0, if readable."""
    return read_text_file(sys_path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"))


def vcgencmd_throttled() -> str | None:
    """`vcgencmd get_throttled` value (e.g. "0x0") on Raspberry Pis; None if vcgencmd is absent or fails."""
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=2, check=False).stdout
    except Exception:  # noqa: BLE001 - cannot exec under qemu-user, timeouts, ...
        return None
    _, sep, value = out.strip().partition("=")
    return value.strip() if sep else None


def cmd_info(args: argparse.Namespace) -> dict:
    """Describe the device: CPU, memory, OS, runtime, execution providers, sensors, thermal state."""
    return {
        "arch": platform.machine(),
        "cpu_model": cpu_model(),
        "isa": parse_isa(read_text_file("/proc/cpuinfo") or ""),
        "cores": os.cpu_count(),
        "memory_mb": memory_mb(),
        "os": platform.platform(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__ if ort is not None else None,
        "providers": ort.get_available_providers() if ort is not None else [],
        "energy_sensors": energy_sensor_names(),
        "thermal": read_thermal(),
        "cpu_governor": cpu_governor(),
        "throttled": vcgencmd_throttled(),
    }


def cmd_sha256(args: argparse.Namespace) -> dict:
    """SHA-256 and size of a file on this device (the host checks every upload with it before renaming)."""
    if not os.path.isfile(args.file):
        raise AgentError("file not found: %s" % args.file, ExitCode.MODEL_NOT_FOUND)
    return {"path": args.file, "sha256": file_sha256(args.file), "size_bytes": os.path.getsize(args.file)}
