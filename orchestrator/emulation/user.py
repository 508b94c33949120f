"""An emulated aarch64 device in QEMU user mode: the real agent on the real aarch64 onnxruntime build.

`QemuUserTransport` has the interface of `LocalTransport` (`info()`, `bench()`), and runs

    qemu-aarch64-static -cpu CPU -L VIEW VIEW/usr/bin/python3 -m agents ...

where VIEW is a small *device view* of the shared sysroot (orchestrator/emulation/sysroot.py): links
to the sysroot's folders plus the files that make the board what the profile says: an
ARM `/proc/cpuinfo` with one entry per emulated core, `/proc/meminfo` with its memory, and
`/sys/devices/system/cpu/{online,possible,present}` with its core count (qemu-user looks
every absolute path up under `-L` first). The work itself runs on this host's cores.

Under emulation latency is 60x to 650x slower than native and the factor depends on the
operator mix (docs/emulation.md): every result says `"emulated": true`, and `bench` uses a
short protocol (`EMULATED_WARMUP_RUNS`, `EMULATED_RUNS`, within the profile's time budget).
What emulation is good for: the model loads and runs in the aarch64 onnxruntime build, and
its outputs match the host's (`run_model`).

The agent runs in-process under qemu: nothing it does may start a child process (an
aarch64 child cannot exec without binfmt_misc, which would change the host).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import agents
from orchestrator.config.profile import load_profile
from orchestrator.devices.base import Device, bench_args
from orchestrator.emulation.sysroot import (
    CPU_MODELS,
    SYSROOT_PYTHON,
    SysrootBuildError,
    build_sysroot,
    cpuinfo_text,
    read_manifest,
)
from orchestrator.errors import MeasurementError
from orchestrator.state.paths import state_dir

if TYPE_CHECKING:
    import numpy as np

    from orchestrator.config.profile import Profile

QEMU_BINARIES = ("qemu-aarch64-static", "qemu-aarch64")
# CPU models QEMU 7.2 lacks -> the nearest it has (same Armv8.x level); the result names both.
QEMU_CPU_SUBSTITUTES = {
    "cortex-a78ae": "cortex-a76",  # Jetson Orin: Armv8.2-A like the A76
    "cortex-a78": "cortex-a76",
    "cortex-a77": "cortex-a76",
    "cortex-a55": "cortex-a53",
}
REFUSED_CPUS = {
    "max": "-cpu max enables every feature QEMU has (SVE, ...): its kernels are far slower and its results differ",
    "host": "-cpu host needs KVM, which user mode does not use",
}
EMULATED_WARMUP_RUNS = 3
EMULATED_RUNS = 20
START_TIMEOUT_S = 180  # the interpreter and onnxruntime's import under emulation, on a busy host
VIEW_LINKS = ("usr", "bin", "sbin", "lib", "etc", "var")


def qemu_binary() -> str | None:
    """Path of the qemu-aarch64 user-mode emulator, or None when it is not installed."""
    for name in QEMU_BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


@functools.lru_cache(maxsize=4)
def qemu_cpu_models(binary: str) -> tuple[str, ...]:
    """The CPU models this qemu-aarch64 accepts (`-cpu help`)."""
    out = subprocess.run([binary, "-cpu", "help"], capture_output=True, text=True, timeout=30, check=False).stdout
    return tuple(line.split()[0] for line in out.splitlines()[1:] if line.strip())


def resolve_qemu_cpu(requested: str, available: tuple[str, ...] | None = None) -> tuple[str, str | None]:
    """The CPU model to run for a profile's `emulation.qemu_cpu`, and a note when it is a substitute.

    Raises MeasurementError for `max`/`host` and for a model neither QEMU nor the table of
    substitutes knows.
    """
    cpu = requested.strip().lower()
    if cpu in REFUSED_CPUS:
        raise MeasurementError(f"qemu CPU {requested!r} refused: {REFUSED_CPUS[cpu]}")
    if available is None:
        binary = qemu_binary()
        available = qemu_cpu_models(binary) if binary else tuple(CPU_MODELS)
    if cpu in available:
        return cpu, None
    nearest = QEMU_CPU_SUBSTITUTES.get(cpu)
    if nearest and nearest in available:
        return nearest, f"{requested} is not in this QEMU; emulating the nearest model it has, {nearest}"
    raise MeasurementError(f"qemu CPU {requested!r} is not available (this QEMU has: {', '.join(available)})")


def prepare_view(sysroot: Path | str, qemu_cpu: str, cores: int, memory_mb: int | None = None,
                 dest: Path | str | None = None) -> Path:
    """The device view of a sysroot for one CPU model, core count and memory (made once, then reused).

    At `dest` when given (a registered emulated device owns its view there), else in a folder
    shared by every view of the same sysroot, CPU, cores and memory. Made in a temporary folder
    and renamed into place, so a half view is never used.
    """
    sysroot = Path(sysroot).resolve()
    tag = hashlib.sha256(str(sysroot).encode()).hexdigest()[:8]
    view = (Path(dest) if dest is not None else
            state_dir() / "emulated" / "views" / f"{sysroot.name}-{tag}-{qemu_cpu}-{cores}c-{memory_mb or 0}m")
    spec = {"sysroot": str(sysroot), "qemu_cpu": qemu_cpu, "cores": cores, "memory_mb": memory_mb}
    marker = view / "view.json"
    if marker.exists():
        return view
    try:
        cpuinfo = cpuinfo_text(qemu_cpu, cores)
    except SysrootBuildError as exc:
        raise MeasurementError(str(exc)) from None
    view.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{view.name}.tmp-", dir=view.parent))
    try:
        for name in VIEW_LINKS:
            if (sysroot / name).exists():
                (tmp / name).symlink_to(sysroot / name)
        (tmp / "proc").mkdir()
        (tmp / "proc" / "cpuinfo").write_text(cpuinfo)
        if memory_mb:
            (tmp / "proc" / "meminfo").write_text(f"MemTotal:       {memory_mb * 1024:>9d} kB\n")
        cpus = tmp / "sys" / "devices" / "system" / "cpu"
        cpus.mkdir(parents=True)
        for name in ("online", "possible", "present"):
            (cpus / name).write_text(f"0-{cores - 1}\n" if cores > 1 else "0\n")
        (tmp / "no-sensors").mkdir()  # the agent's sysfs root: no host RAPL or thermal zones under emulation
        (tmp / "view.json").write_text(json.dumps(spec) + "\n")
        try:
            tmp.rename(view)
        except OSError:  # another process made it first
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return view


def emulated_device(name: str, qemu_cpu: str, **extra: Any) -> Device:
    """The `Device` of an emulated aarch64 board (transport `qemu`, labelled emulated).

    `extra` may hold what `QemuUserTransport.from_device` needs: `sysroot`, `cores`, `memory_mb`, and
    `view` (a device view of its own; without it, the shared view of its CPU, cores and memory).
    """
    return Device(name=name, transport="qemu", arch="aarch64", emulated=True, extra={"qemu_cpu": qemu_cpu, **extra})


def emulated_device_for_profile(name: str, profile: Profile, sysroot: Path | str,
                                view: Path | str | None = None) -> Device:
    """The emulated device of a profile's `emulation` section, with everything `from_device` needs in `extra`."""
    emu = profile.emulation
    if emu is None:
        raise MeasurementError(f"profile {profile.name} has no emulation section")
    extra: dict[str, Any] = {"sysroot": str(sysroot), "cores": emu.cores, "memory_mb": emu.memory_mb, "mode": "user"}
    if view is not None:
        extra["view"] = str(view)
    return emulated_device(name, emu.qemu_cpu, **extra)


def emulated_bench_args(profile: Profile, pinned_cpu: int | None = None, host_cpus: int | None = None) -> list[str]:
    """The profile's `bench` flags with the short emulated protocol, threads capped at this host's cores.

    Fewer runs: one emulated run of a small CNN takes tens to hundreds of milliseconds, and
    the profile's time budget still bounds the warm-up and the timed runs. More threads than
    host cores would only add scheduling noise to numbers that are not absolute anyway.
    """
    args = bench_args(profile, pinned_cpu)
    m = profile.measurement
    caps = {"--warmup": min(m.warmup_runs, EMULATED_WARMUP_RUNS), "--runs": min(m.runs, EMULATED_RUNS)}
    if host_cpus:
        threads = profile.runtime.intra_op_threads
        caps["--threads"] = min(threads, host_cpus) if threads > 0 else host_cpus
    for flag, value in caps.items():
        args[args.index(flag) + 1] = str(value)
    if "--warmup-until-stable" in args:  # emulated timings are not the board's: no point waiting for them to settle
        args.remove("--warmup-until-stable")
    return args


class QemuUserTransport:
    """An emulated aarch64 device in QEMU user mode, used like `LocalTransport`: one agent run at a time."""

    def __init__(self, device: Device, sysroot: Path | str, qemu_cpu: str, cores: int,
                 memory_mb: int | None = None, view: Path | str | None = None) -> None:
        self.device = device
        self.sysroot = Path(sysroot)
        self.requested_cpu = qemu_cpu
        self.cores = cores
        self.memory_mb = memory_mb
        self.binary = qemu_binary()
        if self.binary is None:
            raise MeasurementError(f"device {device.name}: qemu-aarch64-static is not installed "
                                   "(apt-get install qemu-user-static)")
        try:
            self.qemu_cpu, self.cpu_note = resolve_qemu_cpu(qemu_cpu, qemu_cpu_models(self.binary))
        except MeasurementError as exc:
            raise MeasurementError(f"device {device.name}: {exc}") from None
        if read_manifest(self.sysroot) is None:
            raise MeasurementError(f"device {device.name}: {self.sysroot} is not a finished arm64 sysroot "
                                   "(build it with deploy/qemu/build-user-sysroot.sh)")
        self.view = prepare_view(self.sysroot, self.qemu_cpu, cores, memory_mb, view)
        self.host_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    @classmethod
    def for_profile(cls, device: Device, profile: Profile, sysroot: Path | str) -> QemuUserTransport:
        """The transport for a profile's `emulation` section (CPU model, cores, memory)."""
        emu = profile.emulation
        if emu is None:
            raise MeasurementError(f"profile {profile.name} has no emulation section")
        return cls(device, sysroot, emu.qemu_cpu, emu.cores, emu.memory_mb)

    @classmethod
    def from_device(cls, device: Device) -> QemuUserTransport:
        """The transport of a `Device` made by `emulated_device_for_profile` (what `make_transport` calls)."""
        extra = device.extra
        missing = [k for k in ("sysroot", "qemu_cpu", "cores") if k not in extra]
        if missing:
            raise MeasurementError(f"device {device.name}: an emulated device needs {', '.join(missing)} in its extra")
        return cls(device, extra["sysroot"], extra["qemu_cpu"], int(extra["cores"]), extra.get("memory_mb"),
                   extra.get("view"))

    def command(self, agent_args: list[str]) -> list[str]:
        """The qemu command line that runs the agent with these arguments."""
        python = str(self.view / SYSROOT_PYTHON)
        return [self.binary, "-cpu", self.qemu_cpu, "-L", str(self.view), python, "-m", "agents", *agent_args]

    def environment(self) -> dict[str, str]:
        """The agent's environment: a clean one (the host's PYTHON* variables and virtualenv mean nothing inside)."""
        return {
            "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/"),
            "PYTHONPATH": str(Path(agents.__file__).resolve().parents[1]),
            "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "EDGE_AGENT_SYSFS_ROOT": str(self.view / "no-sensors"),
        }

    def _agent(self, args: list[str], timeout_s: float) -> dict[str, Any]:
        return self.run_command(self.command(args), timeout_s)

    def run_command(self, command: list[str], timeout_s: float) -> dict[str, Any]:
        """Run a qemu command line of the agent (`command`, or one made from it); the agent's JSON."""
        name = self.device.name
        try:
            # A scratch working folder: qemu-user drops a guest core file there when the agent crashes
            # and core dumps are on; it goes away with the folder.
            with tempfile.TemporaryDirectory(prefix="eo-qemu-cwd-") as cwd:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                      env=self.environment(), stdin=subprocess.DEVNULL, cwd=cwd, check=False)
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"device {name}: agent under qemu timed out after {timeout_s:.0f} s") from None
        except OSError as exc:
            raise MeasurementError(f"device {name}: cannot start {self.binary}: {exc}") from None
        lines = proc.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1].strip()
            raise MeasurementError(f"device {name}: agent under qemu-aarch64 -cpu {self.qemu_cpu} exited "
                                   f"{proc.returncode}: {tail}") from None
        if proc.returncode != 0 or "error" in result:
            raise MeasurementError(f"device {name}: {result.get('error', 'agent failed')}")
        return result

    def _labels(self) -> dict[str, Any]:
        labels: dict[str, Any] = {"emulated": True, "qemu_cpu": self.qemu_cpu, "qemu_mode": "user",
                                  "host_cpus": self.host_cpus}
        if self.cpu_note:
            labels.update(qemu_cpu_requested=self.requested_cpu, emulation_note=self.cpu_note)
        return labels

    def info(self) -> dict[str, Any]:
        """The agent's `info` inside the emulator (arch aarch64, the emulated CPU, cores and memory), labelled."""
        return {**self._agent(["info"], START_TIMEOUT_S), **self._labels()}

    def bench(self, model_bytes: bytes, profile: Profile) -> dict[str, Any]:
        """Measure one model with the short emulated protocol; the agent's JSON, labelled emulated."""
        args = emulated_bench_args(profile, self.device.pinned_cpu, self.host_cpus)
        timeout = START_TIMEOUT_S + 3 * profile.measurement.time_budget_s
        with tempfile.TemporaryDirectory(prefix="eo-qemu-device-") as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(model_bytes)
            result = self._agent(["bench", "--model", str(path), *args], timeout)
        protocol = {"warmup_runs": int(args[args.index("--warmup") + 1]), "runs": int(args[args.index("--runs") + 1]),
                    "threads": int(args[args.index("--threads") + 1]),
                    "profile_threads": profile.runtime.intra_op_threads}
        return {**result, **self._labels(), "emulated_protocol": protocol}

    def run_model(self, model_bytes: bytes, inputs: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
        """Run a model once inside the emulator on `inputs` (by input name); its outputs by name."""
        import numpy as np

        with tempfile.TemporaryDirectory(prefix="eo-qemu-run-") as tmp:
            model, feeds, outs = Path(tmp) / "model.onnx", Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
            model.write_bytes(model_bytes)
            np.savez(feeds, **inputs)
            self._agent(["run", "--model", str(model), "--inputs", str(feeds), "--outputs", str(outs),
                         "--threads", str(threads)], START_TIMEOUT_S + 120)
            with np.load(outs) as saved:
                return {name: saved[name] for name in saved.files}


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.emulation.user --profile P [--sysroot DIR] info|bench MODEL|shell-command`: by hand.

    The `devices emulate` command is what registers an emulated device; this runs one directly
    (building or reusing the sysroot first) and prints the agent's JSON.
    """
    parser = argparse.ArgumentParser(prog="python -m orchestrator.emulation.user", description=main.__doc__.split("\n")[0])
    parser.add_argument("--profile", required=True, help="a device profile with an emulation section")
    parser.add_argument("--sysroot", help="arm64 sysroot (default: built or reused under the state folder)")
    parser.add_argument("what", choices=["info", "bench", "command"], help="agent info, a benchmark, or the qemu "
                                                                            "command line that runs the agent")
    parser.add_argument("model", nargs="?", help="the .onnx file to benchmark")
    args = parser.parse_args(argv)
    if (args.what == "bench") != bool(args.model):
        parser.error("bench needs a MODEL, and only bench takes one")
    try:
        profile = load_profile(args.profile).profile
        if profile.emulation is None:
            raise MeasurementError(f"profile {profile.name} has no emulation section")
        sysroot = build_sysroot(args.sysroot, log=lambda m: print(m, file=sys.stderr, flush=True))
        transport = QemuUserTransport.from_device(
            emulated_device_for_profile(f"emulated-{profile.name}", profile, sysroot))
        if args.what == "command":
            env = [f"{k}={v}" for k, v in transport.environment().items()]
            print(shlex.join(["env", "-i", *env, *transport.command(["info"])]))
            return 0
        result = transport.info() if args.what == "info" else transport.bench(Path(args.model).read_bytes(), profile)
    except Exception as exc:  # noqa: BLE001 - one clear line, as the CLI does
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
