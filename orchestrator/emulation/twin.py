"""This machine's emulated twin: its own onnxruntime, its instructions counted under qemu-x86_64 (issue 30 item 3).

The check that needs no board. The same instruction counting an emulated board gets
(orchestrator/emulation/icount.py, the insncount.c plugin) runs on this host's CPU:

    qemu-x86_64 -plugin insncount.so,out=FILE  <this Python>  -m agents bench --count-marks ...

in user mode, with this host's interpreter and onnxruntime, one thread. The count can then be
set against native latency measured here (bench/emulation_fidelity.py) and a cost model
calibrated from it (`orchestrate devices calibrate` with the local machine or a device on this
host's loopback: orchestrator/emulation/calibrate.py).

What the twin does not share with the CPU: QEMU 7.2's TCG implements x86 up to AVX2 (with
FMA and F16C), not AVX-512 or VNNI. On a CPU that has AVX-512 (this project's AMD EPYC
hosts do) onnxruntime natively runs its AVX-512 (and, for int8, AVX512-VNNI) kernels, while
the twin runs its AVX2 ones: the counts are those of the AVX2 path. `isa_note()` says so in
results. The twin of a remote x86 device is not built: its interpreter and onnxruntime are
not on this host.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import agents
from orchestrator.devices.base import axes_args
from orchestrator.emulation import icount
from orchestrator.errors import MeasurementError

TWIN_QEMU = "qemu-x86_64"
TWIN_CPU = "max"  # QEMU's default for x86-64 user mode: every feature TCG implements (up to AVX2)
COUNT_TIMEOUT_S = 600
ROOT = Path(agents.__file__).resolve().parents[1]
#: What the host may have that TCG does not: their presence makes the twin dispatch other kernels.
TCG_MISSING = ("avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "avx512_bf16", "avx512fp16")


@functools.lru_cache(maxsize=1)
def twin_binary() -> str | None:
    """qemu-x86_64 with TCG plugin support, or None."""
    found = shutil.which(TWIN_QEMU)
    if found and icount._supports_plugins(found):
        return found
    return None


def unavailable_reason() -> str | None:
    """Why this host's twin cannot count here, or None when it can."""
    if platform.machine() != "x86_64":
        return f"the twin is built for x86-64 hosts (this one is {platform.machine()})"
    if twin_binary() is None:
        return "no qemu-x86_64 with TCG plugin support (apt-get install qemu-user)"
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler to build the counting plugin (apt-get install gcc)"
    return None


def host_cpu() -> dict[str, Any]:
    """This host's CPU as /proc/cpuinfo names it: model, clock (MHz), cores, and the flags TCG lacks."""
    model, mhz, flags = platform.processor() or platform.machine(), None, set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            model = value
        elif key == "cpu MHz" and mhz is None:
            mhz = float(value)
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "mhz": mhz, "cores": os.cpu_count(),
            "tcg_missing": [f for f in TCG_MISSING if f in flags]}


def isa_note() -> str:
    """What the twin runs that this CPU does not (the kernels onnxruntime picks differ where it has AVX-512)."""
    missing = host_cpu()["tcg_missing"]
    if not missing:
        return "the twin's CPU (QEMU TCG, up to AVX2) has the ISA extensions onnxruntime uses on this CPU"
    return (f"this CPU has {', '.join(missing)}, which QEMU 7.2's TCG does not emulate: natively onnxruntime runs "
            "its AVX-512 kernels, the twin counts its AVX2 ones")


def count_model(model_bytes: bytes, profile: Any, runs: int = icount.COUNT_RUNS,
                warmup: int = icount.COUNT_WARMUP_RUNS) -> dict[str, Any]:
    """Instructions of one inference of a model on this host's twin (median of `runs`, one thread)."""
    reason = unavailable_reason()
    if reason:
        raise MeasurementError(f"this host's twin cannot count instructions: {reason}")
    plugin = icount.build_plugin()
    args = ["--warmup", str(warmup), "--runs", str(runs), "--time-budget", str(COUNT_TIMEOUT_S),
            "--batch", str(profile.measurement.batch_size), "--threads", "1", "--inter-op-threads", "1",
            "--count-marks", *axes_args(profile)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="eo-twin-") as tmp:
        path, out = Path(tmp) / "model.onnx", Path(tmp) / "counts.txt"
        path.write_bytes(model_bytes)
        command = [twin_binary(), "-cpu", TWIN_CPU, "-plugin", f"{plugin},out={out}", sys.executable, "-m", "agents",
                   "bench", "--model", str(path), *args]
        start = time.monotonic()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=COUNT_TIMEOUT_S, env=env,
                                  cwd=tmp, check=False)
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"the twin's count took over {COUNT_TIMEOUT_S} s") from None
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
            raise MeasurementError(f"the twin's agent failed (exit {proc.returncode}): {tail}")
        total, regions = icount.read_counts(out)
    if len(regions) < 2:
        raise MeasurementError(f"the counting plugin saw {len(regions)} marked regions on the twin")
    counted = [max(r - regions[0], 0) for r in regions[1:]]
    median = statistics.median(counted)
    return {"instructions": {"per_run": counted, "median": median, "marks_overhead": regions[0],
                             "spread": (max(counted) - min(counted)) / median if median else 0.0,
                             "process_total": total},
            "count_seconds": round(seconds, 2), "twin": twin_description()}


def twin_description() -> str:
    """One line: what the twin is."""
    return f"{TWIN_QEMU} -cpu {TWIN_CPU} (user mode, TCG) running this host's {Path(sys.executable).name} and " \
           "onnxruntime, one thread"


def count_models(models: list[bytes], profile: Any, jobs: int = 1, runs: int = icount.COUNT_RUNS,
                 log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """`count_model` of each model, `jobs` at a time (the counts do not depend on the host's load)."""
    def one(i: int) -> dict[str, Any]:
        result = count_model(models[i], profile, runs=runs)
        if log:
            log(f"twin: model {i + 1}/{len(models)}: {result['instructions']['median']:,.0f} instructions "
                f"({result['count_seconds']:.1f} s)")
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, range(len(models))))
