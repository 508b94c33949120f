"""Instruction-counted latency of an emulated board (`latency_source: emulated-icount`).

QEMU's wall-clock time under emulation does not rank candidates like the board would
(docs/emulation.md). What does not depend on the host is how many guest instructions the
board's own onnxruntime build executes for one inference, with the kernels it dispatches on
the profile's CPU model (`-cpu cortex-a72` has no dot-product instructions, `-cpu cortex-a76`
has them, and onnxruntime reads that from the emulated HWCAP). This module counts them:

    qemu-aarch64 -cpu CPU -plugin insncount.so,out=FILE -L VIEW python3 -m agents bench --count-marks ...

`insncount.c` (a TCG plugin, built here with the C compiler on first use and cached) adds
every executed block's instruction count to a counter; the agent marks each timed run with a
no-op system call, and the plugin writes one count per run. The count does not depend on the
host's load or clock. onnxruntime runs on one thread: with several, its worker threads spin
for a host-dependent time and the count would follow the host again.

Counts become milliseconds through the profile's `emulation.cost_model` (cycles per
instruction and the board's clock): `ms = instructions x cpi / clock_mhz / 1000`. The defaults
in the profiles are NOT calibrated against a board (`calibrated: false`): the ranking of
candidates comes from the counts, the absolute figure is an estimate of the cost model.
Debian's qemu-user-static is built without plugin support; the dynamic `qemu-aarch64`
(package qemu-user) has it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.kernel import latency_stats
from orchestrator.devices.base import axes_args
from orchestrator.emulation.calibration_store import stored_cost_model
from orchestrator.errors import MeasurementError
from orchestrator.state.paths import state_dir

if TYPE_CHECKING:
    from orchestrator.config.profile import Profile
    from orchestrator.emulation.user import QemuUserTransport

LATENCY_SOURCE = "emulated-icount"
PLUGIN_SOURCE = Path(__file__).with_name("insncount.c")
PLUGIN_QEMU_BINARIES = ("qemu-aarch64",)  # qemu-aarch64-static (Debian) has no -plugin
COUNT_WARMUP_RUNS = 1   # the first run allocates and packs weights: not counted
COUNT_RUNS = 3          # the count is deterministic: a few runs show it (and any drift between runs)
COUNT_TIMEOUT_S = 600


@dataclass(frozen=True)
class CostModel:
    """Instructions -> milliseconds for one board: `instructions x cpi / (clock_mhz x 1000)`."""

    cpi: float
    clock_mhz: float
    calibrated: bool
    source: str
    intercept_ms: float = 0.0  # a calibration's fixed cost per run, kept only where the fit justified it

    def milliseconds(self, instructions: float) -> float:
        return self.intercept_ms + instructions * self.cpi / (self.clock_mhz * 1e3)


def cost_model(profile: Profile) -> CostModel | None:
    """The cost model of the profile's emulated device: a calibration stored for the profile by
    `orchestrate devices calibrate` (orchestrator/emulation/calibrate.py, `calibrated: true`), else the profile's
    `emulation.cost_model`; None when it has neither."""
    stored = stored_cost_model(profile)
    if stored is not None:
        return CostModel(**stored)
    emu = profile.emulation
    cm = getattr(emu, "cost_model", None) if emu is not None else None
    if cm is None:
        return None
    return CostModel(cpi=cm.cpi, clock_mhz=cm.clock_mhz, calibrated=cm.calibrated, source=cm.source)


@functools.lru_cache(maxsize=4)
def _supports_plugins(binary: str) -> bool:
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError:
        return False
    return "-plugin" in out


def plugin_qemu_binary() -> str | None:
    """A qemu-aarch64 user-mode emulator that loads TCG plugins, or None."""
    for name in PLUGIN_QEMU_BINARIES:
        found = shutil.which(name)
        if found and _supports_plugins(found):
            return found
    return None


def build_plugin(dest_dir: Path | None = None) -> Path:
    """The compiled insncount plugin (built once per source version, cached under the state folder)."""
    source = PLUGIN_SOURCE.read_bytes()
    tag = hashlib.sha256(source).hexdigest()[:12]
    folder = Path(dest_dir) if dest_dir is not None else state_dir() / "emulated" / "plugins"
    target = folder / f"insncount-{tag}.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise MeasurementError("no C compiler to build the instruction-counting QEMU plugin (apt-get install gcc)")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".insncount-", suffix=".so", dir=folder)
    os.close(fd)
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-o", tmp, str(PLUGIN_SOURCE)],
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        os.unlink(tmp)
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MeasurementError(f"cannot build the instruction-counting QEMU plugin: {tail}")
    os.replace(tmp, target)
    return target


def unavailable_reason() -> str | None:
    """Why instruction counting cannot run here, or None when it can."""
    if plugin_qemu_binary() is None:
        return "no qemu-aarch64 with TCG plugin support (apt-get install qemu-user; qemu-user-static has none)"
    if not PLUGIN_SOURCE.exists():
        return f"{PLUGIN_SOURCE} is missing"
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler to build the counting plugin (apt-get install gcc)"
    return None


def read_counts(path: Path) -> tuple[int, list[int]]:
    """(whole-process count, region counts) from the plugin's output file."""
    lines = path.read_text().split()
    if len(lines) < 2 or lines[0] != "total":
        raise MeasurementError(f"the counting plugin wrote no counts to {path}")
    return int(lines[1]), [int(x) for x in lines[2:]]


def count_bench(transport: QemuUserTransport, model_bytes: bytes, profile: Profile,
                runs: int = COUNT_RUNS, warmup: int = COUNT_WARMUP_RUNS) -> dict[str, Any]:
    """Count the instructions of `runs` inferences of a model on the emulated CPU model; latency by the cost model.

    One onnxruntime thread, the profile's batch and axes. Returns `instructions` (per run, the
    marks' own cost taken off), `latency_ms` (the cost model's, labelled), `latency_source`,
    `calibrated`, `cost_model`, and `count_seconds` (wall time of the whole count, interpreter start included).
    """
    model = cost_model(profile)
    if model is None:
        raise MeasurementError(f"profile {profile.name} has no emulation.cost_model to turn counts into time")
    reason = unavailable_reason()
    if reason:
        raise MeasurementError(f"device {transport.device.name}: cannot count instructions: {reason}")
    binary = plugin_qemu_binary()
    plugin = build_plugin()
    args = ["--warmup", str(warmup), "--runs", str(runs), "--time-budget", str(COUNT_TIMEOUT_S),
            "--batch", str(profile.measurement.batch_size), "--threads", "1", "--inter-op-threads", "1",
            "--count-marks", *axes_args(profile)]
    with tempfile.TemporaryDirectory(prefix="eo-qemu-icount-") as tmp:
        path, out = Path(tmp) / "model.onnx", Path(tmp) / "counts.txt"
        path.write_bytes(model_bytes)
        command = transport.command(["bench", "--model", str(path), *args])
        command[0:1] = [binary, "-plugin", f"{plugin},out={out}"]
        start = time.monotonic()
        result = transport.run_command(command, COUNT_TIMEOUT_S)
        seconds = time.monotonic() - start
        total, regions = read_counts(out)
    if len(regions) < 2:
        raise MeasurementError(f"device {transport.device.name}: the counting plugin saw {len(regions)} marked "
                               "regions (an agent without --count-marks?)")
    overhead, counted = regions[0], [max(r - regions[0], 0) for r in regions[1:]]
    per_run = statistics.median(counted)
    ms = [model.milliseconds(c) for c in counted]
    spread = (max(counted) - min(counted)) / per_run if per_run else 0.0
    return {
        **result,
        "latency_ms": latency_stats(ms),  # the agent's statistics, of the cost model's figures
        "latency_source": LATENCY_SOURCE,
        "calibrated": model.calibrated,
        "cost_model": asdict(model),
        "instructions": {"per_run": counted, "median": per_run, "spread": spread, "marks_overhead": overhead,
                         "process_total": total},
        "count_protocol": {"warmup_runs": warmup, "runs": runs, "threads": 1,
                           "profile_threads": profile.runtime.intra_op_threads, "qemu": binary,
                           "plugin": plugin.name},
        "count_seconds": round(seconds, 2),
        "wall_latency_ms": result.get("latency_ms"),  # emulated wall clock: information only, host-dependent
    }
