"""On-device measurement agent: describes the device (``info``), benchmarks one ONNX model (``bench``)
and runs one on given inputs (``run``, for output parity with the host).

DEPENDENCY NOTE: this module runs on the edge device itself (Raspberry Pi, Jetson, ...) where only
Python 3.9+, numpy and onnxruntime are installed (psutil is optional and its import is guarded).
Import ONLY the standard library, numpy and onnxruntime here: no torch, ray, pluggy, pydantic, yaml,
and nothing from ``orchestrator``. Keep the syntax Python 3.9 compatible. Do not spawn subprocesses
(the agent may run under qemu-user, where child processes cannot exec); the single exception is the
optional, guarded ``vcgencmd`` call on Raspberry Pis.

Every command prints exactly one JSON object on stdout (``schema_version`` 1) and returns an
``ExitCode``; errors are reported as ``{"schema_version": 1, "command": ..., "error": ..., "exit_code": N}``.
"""

from __future__ import annotations

import argparse
import gc
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from enum import IntEnum
from typing import NamedTuple

import numpy as np

from agents.sensors import (  # noqa: F401 - RaplSensor, SensorError: part of this module's API
    GPU_PROVIDERS, MIN_POWER_SAMPLES, SYSFS_ROOT_ENV, RaplSensor, SampledSensor, SensorError,
    discover_energy_sensor, energy_sensor_names, estimated_energy, measured_energy, read_int_file,
    read_text_file, sys_path, unavailable_energy,
)

try:
    import onnxruntime as ort
except ImportError:  # reported as an error by the commands that need it
    ort = None

try:
    import psutil
except ImportError:
    psutil = None

try:
    import resource
except ImportError:  # not on Windows
    resource = None

SCHEMA_VERSION = 1
MIN_TIMED_RUNS = 5
NOISY_CV = 0.05
STABLE_WINDOW = 10  # warm-up is stable when the CV of this many last runs is <= --stable-cv

ELEMENT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}

# ARM "CPU part" codes (implementer 0x41) for the cores found on common edge boards.
ARM_CPU_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
}


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    MODEL_INVALID = 3
    MODEL_NOT_FOUND = 4


class AgentError(Exception):
    """An error reported to the caller as one JSON line with this exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.ERROR):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------- helpers


def one_line(text: object) -> str:
    """Collapse any message (e.g. a multi-line onnxruntime error) to one line."""
    return " ".join(str(text).split())


def file_sha256(path: str) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def latency_stats(samples_ms: list[float]) -> dict:
    """p50/p90/p99 (linear interpolation), mean, std (sample), min, max and cv of latencies in ms."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(arr, [50, 90, 99]))
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {
        "p50": p50, "p90": p90, "p99": p99, "mean": mean, "std": std,
        "min": float(arr.min()), "max": float(arr.max()), "cv": std / mean if mean > 0 else 0.0,
    }


def _status_kib(field: str) -> int | None:
    for line in (read_text_file("/proc/self/status") or "").splitlines():
        if line.startswith(field + ":"):
            try:
                return int(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def current_rss_mb() -> float | None:
    """Resident set size of this process in MiB (/proc/self/status VmRSS, else psutil)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024.0
    if psutil is not None:
        return psutil.Process().memory_info().rss / 2**20
    return None


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (/proc/self/status VmHWM, else getrusage ru_maxrss).

    VmHWM first: on Linux ru_maxrss keeps the parent's high-water mark across execve, so an
    agent started from a big process (a Ray worker) would report that process's peak.
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024.0
    if resource is not None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0  # bytes on macOS, KiB else
    return None


# ------------------------------------------------------------------------------------ device probes


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
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=2).stdout
    except Exception:  # noqa: BLE001 - cannot exec under qemu-user, timeouts, ...
        return None
    _, sep, value = out.strip().partition("=")
    return value.strip() if sep else None


# Energy sensors (RAPL, Jetson INA3221, Raspberry Pi 5 PMIC, NVML) and the energy result: agents/sensors.py.


# ------------------------------------------------------------------------------------------ commands


def _require_ort() -> None:
    if ort is None:
        raise AgentError("onnxruntime is not installed on this device")


def cmd_info(args: argparse.Namespace) -> dict:
    """Describe the device: CPU, memory, OS, runtime, execution providers, sensors, thermal state."""
    return {
        "arch": platform.machine(),
        "cpu_model": cpu_model(),
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


def make_inputs(session, batch: int, seed: int, warnings: list[str]) -> dict:
    """Random feeds for every model input: symbolic dims -> batch (first dim) or 1, dtype from metadata."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for meta in session.get_inputs():
        shape = []
        for i, dim in enumerate(meta.shape):
            if isinstance(dim, int) and dim > 0:
                if i == 0 and batch != 1 and dim != batch:
                    warnings.append("input %s has a fixed batch dimension %d; --batch %d ignored"
                                    % (meta.name, dim, batch))
                shape.append(dim)
            else:
                shape.append(batch if i == 0 else 1)
        dtype = ELEMENT_TYPES.get(meta.type)
        if dtype is None:
            raise AgentError("input %s has unsupported type %s" % (meta.name, meta.type))
        if np.issubdtype(dtype, np.floating):
            feeds[meta.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[meta.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif dtype in (np.uint8, np.int8):
            info = np.iinfo(dtype)
            feeds[meta.name] = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
        else:  # ids/indices: keep them small so embedding lookups stay in range
            feeds[meta.name] = rng.integers(0, 10, size=shape, dtype=dtype)
    return feeds


def _choose_providers(requested: list[str], warnings: list[str]) -> list[str]:
    available = ort.get_available_providers()
    chosen = [p for p in requested if p in available]
    for p in requested:
        if p not in available:
            warnings.append("execution provider %s is not available (available: %s)" % (p, ", ".join(available)))
    if not chosen:
        warnings.append("none of the requested providers is available; falling back to CPUExecutionProvider")
        chosen = ["CPUExecutionProvider"]
    return chosen


def _pin_cpu(cpu: int | None, warnings: list[str]) -> int | None:
    if cpu is None:
        return None
    if not hasattr(os, "sched_setaffinity"):
        warnings.append("CPU pinning is not supported on this platform; --pin-cpu ignored")
        return None
    try:
        os.sched_setaffinity(0, {cpu})
    except (OSError, ValueError) as exc:
        raise AgentError("cannot pin to CPU %d: %s" % (cpu, one_line(exc)), ExitCode.USAGE)
    return cpu


def _timed_loop(run, count: int, budget_s: float, min_runs: int) -> list[float]:
    """Run `run()` up to `count` times or until `budget_s` passed (after at least `min_runs`); ms per run."""
    samples = []
    deadline = time.perf_counter_ns() + int(budget_s * 1e9)
    while len(samples) < count and (len(samples) < min_runs or time.perf_counter_ns() < deadline):
        t0 = time.perf_counter_ns()
        run()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def _create_session(path: str, args: argparse.Namespace, providers: list[str]):
    """InferenceSession with the requested threads and full graph optimisation; MODEL_INVALID if it fails."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = args.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
        raise AgentError("cannot load model %s: %s" % (path, one_line(exc)), ExitCode.MODEL_INVALID)


class WarmUp(NamedTuple):
    """How warm-up went: its latencies (ms), why it ended, and whether its last runs were stable."""

    samples: list
    ended: str  # "count" (the fixed count), "stable", "max-runs" or "time-budget"
    stable: bool | None  # CV of the last `window` runs <= the threshold; None with fewer runs than that
    cv: float | None  # that CV


def latency_cv(samples_ms: list[float]) -> float:
    """Coefficient of variation (sample std / mean) of latencies."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    mean = float(arr.mean())
    return float(arr.std(ddof=1)) / mean if arr.size > 1 and mean > 0 else 0.0


def warm_up(run, runs: int, budget_s: float, until_stable: bool = False, max_runs: int = 0,
            window: int = STABLE_WINDOW, max_cv: float = NOISY_CV, clock=time.perf_counter_ns) -> WarmUp:
    """Warm-up runs of `run()`: `runs` of them, or with `until_stable` at least `runs` and then on
    until the CV of the last `window` latencies is at most `max_cv`, `max_runs` runs were made, or
    `budget_s` seconds passed (after at least one run). `clock` (ns) is a parameter for the tests.
    """
    limit = max(runs, max_runs) if until_stable else runs
    samples = []

    def window_cv():
        return latency_cv(samples[-window:]) if len(samples) >= window else None

    deadline = clock() + int(budget_s * 1e9)
    while True:
        if until_stable and len(samples) >= runs:
            cv = window_cv()
            if cv is not None and cv <= max_cv:
                ended = "stable"
                break
        if len(samples) >= limit:
            ended = "max-runs" if until_stable else "count"
            break
        if len(samples) >= min(runs, 1) and clock() >= deadline:
            ended = "time-budget"
            break
        t0 = clock()
        run()
        samples.append((clock() - t0) / 1e6)
    cv = window_cv()
    return WarmUp(samples, ended, None if cv is None else cv <= max_cv, cv)


def _measure(run, args: argparse.Namespace, warnings: list[str], gpu: bool = False):
    """Warm-up, idle power, then timed runs (GC off) bracketed by the energy sensor if there is one.

    `gpu`: the model runs on an NVIDIA GPU, so NVML's GPU energy counts too.
    Returns (WarmUp, samples, energy_dict_or_None); None means no measured energy.
    """
    until_stable = getattr(args, "warmup_until_stable", False)
    window = getattr(args, "stable_window", STABLE_WINDOW)
    warmup = warm_up(run, args.warmup, args.time_budget, until_stable, getattr(args, "warmup_max", 0),
                     window, getattr(args, "stable_cv", NOISY_CV))
    if warmup.ended == "time-budget" and not until_stable:
        warnings.append("warm-up stopped after %d runs by --time-budget" % len(warmup.samples))
    elif until_stable and warmup.ended != "stable":
        warnings.append("warm-up did not become stable: stopped by %s after %d runs, CV of the last %d runs %s"
                        % ("--warmup-max" if warmup.ended == "max-runs" else "--time-budget", len(warmup.samples),
                           window, "n/a" if warmup.cv is None else "%.3f" % warmup.cv))
    sensor, idle_w = discover_energy_sensor(gpu=gpu), None
    if sensor is not None:
        try:
            idle_w = sensor.idle_watts()  # right before the timed runs: same temperature, same clocks
            sensor.start()
        except SensorError as exc:
            warnings.append("energy sensor failed: %s" % one_line(exc))
            sensor = None
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        samples = _timed_loop(run, args.runs, args.time_budget, min(args.runs, MIN_TIMED_RUNS))
    except BaseException:
        if sensor is not None:
            sensor.abort()  # stops a sampling thread
        raise
    finally:
        if gc_was_enabled:
            gc.enable()
    energy = None
    if sensor is not None:
        try:
            joules, seconds = sensor.stop()
            energy = measured_energy(sensor, joules, seconds, idle_w, len(samples))
        except SensorError as exc:
            warnings.append("energy sensor failed: %s" % one_line(exc))
        if energy is not None and isinstance(sensor, SampledSensor) and sensor.samples < MIN_POWER_SAMPLES:
            warnings.append("energy integrated from only %d power samples (%s reads every %.2f s): "
                            "more --runs or a longer --time-budget measure it better"
                            % (sensor.samples, sensor.name, sensor.interval_s))
    return warmup, samples, energy


def cmd_sha256(args: argparse.Namespace) -> dict:
    """SHA-256 and size of a file on this device (the host checks every upload with it before renaming)."""
    if not os.path.isfile(args.file):
        raise AgentError("file not found: %s" % args.file, ExitCode.MODEL_NOT_FOUND)
    return {"path": args.file, "sha256": file_sha256(args.file), "size_bytes": os.path.getsize(args.file)}


def _load_feeds(path: str, session) -> dict:
    """Feeds from a .npy (the model's one input) or a .npz (one array per input name), dtypes checked."""
    metas = session.get_inputs()
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AgentError("cannot read inputs %s: %s" % (path, one_line(exc)), ExitCode.USAGE)
    if isinstance(loaded, np.ndarray):
        if len(metas) != 1:
            raise AgentError("the model has %d inputs (%s): give them as a .npz"
                             % (len(metas), ", ".join(m.name for m in metas)), ExitCode.USAGE)
        feeds = {metas[0].name: loaded}
    else:
        with loaded:
            feeds = {name: loaded[name] for name in loaded.files}
        wanted = {m.name for m in metas}
        if set(feeds) != wanted:
            raise AgentError("inputs %s hold %s, the model wants %s"
                             % (path, ", ".join(sorted(feeds)), ", ".join(sorted(wanted))), ExitCode.USAGE)
    for meta in metas:
        dtype = ELEMENT_TYPES.get(meta.type)
        if dtype is not None and feeds[meta.name].dtype != np.dtype(dtype):
            raise AgentError("input %s is %s, the model wants %s"
                             % (meta.name, feeds[meta.name].dtype, np.dtype(dtype)), ExitCode.USAGE)
    return feeds


def cmd_run(args: argparse.Namespace) -> dict:
    """Run one ONNX model once on given inputs and save its outputs (for output parity with the host)."""
    _require_ort()
    if not os.path.isfile(args.model):
        raise AgentError("model file not found: %s" % args.model, ExitCode.MODEL_NOT_FOUND)
    if not os.path.isfile(args.inputs):
        raise AgentError("inputs file not found: %s" % args.inputs, ExitCode.USAGE)
    warnings = []
    requested = [p.strip() for p in args.providers.split(",") if p.strip()]
    session = _create_session(args.model, args, _choose_providers(requested, warnings))
    feeds = _load_feeds(args.inputs, session)
    names = [m.name for m in session.get_outputs()]
    t0 = time.perf_counter()
    try:
        outputs = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        raise AgentError("inference failed for model %s: %s" % (args.model, one_line(exc)))
    seconds = time.perf_counter() - t0
    if args.outputs.endswith(".npz"):
        with open(args.outputs, "wb") as fh:
            np.savez(fh, **dict(zip(names, outputs)))
    else:
        if len(outputs) > 1:
            warnings.append("the model has %d outputs; only %s saved (use a .npz for all)" % (len(outputs), names[0]))
        with open(args.outputs, "wb") as fh:  # a file object: np.save would append .npy to the name
            np.save(fh, outputs[0])
    return {
        "model": {"path": args.model, "sha256": file_sha256(args.model), "size_bytes": os.path.getsize(args.model)},
        "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in feeds.items()],
        "outputs": [{"name": n, "shape": list(np.shape(o)), "dtype": str(np.asarray(o).dtype)}
                    for n, o in zip(names, outputs)],
        "saved_to": args.outputs,
        "seconds": seconds,
        "execution_provider": session.get_providers()[0],
        "threads": {"intra_op": args.threads, "inter_op": args.inter_op_threads},
        "warnings": warnings,
    }


def _exit_when_stdin_closes() -> None:
    """Exit at once when stdin reaches end of file.

    Over SSH without a terminal, nothing signals the agent when the connection drops or the
    host gives up on it; its stdin closing is the one sign, so a lost host stops the benchmark
    instead of leaving it to hold the device's cores.
    """
    def watch():
        try:
            # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader aborts
            # the interpreter's shutdown ("could not acquire lock for <stdin>").
            while os.read(0, 1 << 16):
                pass
        except OSError:
            pass
        os._exit(int(ExitCode.ERROR))

    threading.Thread(target=watch, name="stdin-watchdog", daemon=True).start()


def cmd_bench(args: argparse.Namespace) -> dict:
    """Benchmark one ONNX model: latency distribution, memory, energy, thermal state."""
    _require_ort()
    if args.exit_on_stdin_eof:
        _exit_when_stdin_closes()
    path = args.model
    if not os.path.isfile(path):
        raise AgentError("model file not found: %s" % path, ExitCode.MODEL_NOT_FOUND)
    if (args.power_idle_w is None) != (args.power_active_w is None):
        raise AgentError("--power-idle-w and --power-active-w must be given together", ExitCode.USAGE)
    if args.power_idle_w is not None and args.power_active_w < args.power_idle_w:
        raise AgentError("--power-active-w must be >= --power-idle-w", ExitCode.USAGE)

    warnings = []
    requested = [p.strip() for p in args.providers.split(",") if p.strip()]
    saved_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        pinned = _pin_cpu(args.pin_cpu, warnings)  # before the session, so its thread pool inherits it
        rss_before = current_rss_mb()
        session = _create_session(path, args, _choose_providers(requested, warnings))
        feeds = make_inputs(session, args.batch, args.seed, warnings)
        try:
            started_at = time.time()  # wall clock: the host compares windows across devices and processes
            warmup, samples, energy = _measure(lambda: session.run(None, feeds), args, warnings,
                                               gpu=session.get_providers()[0] in GPU_PROVIDERS)
            finished_at = time.time()
        except Exception as exc:  # noqa: BLE001
            raise AgentError("inference failed for model %s: %s" % (path, one_line(exc)))
    finally:
        if saved_affinity is not None and args.pin_cpu is not None:
            try:
                os.sched_setaffinity(0, saved_affinity)  # matters when main() is called in-process
            except OSError:
                pass

    stats = latency_stats(samples)
    if energy is None and args.power_idle_w is not None:
        # busy cores: --threads (0 = onnxruntime default, all cores); a single one when pinned
        threads = 1 if pinned is not None else (args.threads or os.cpu_count() or 1)
        energy = estimated_energy(args.power_idle_w, args.power_active_w,
                                  args.power_cores or os.cpu_count() or 1, threads, stats["mean"])
    elif energy is None:
        energy = unavailable_energy()

    peak = peak_rss_mb()
    return {
        "model": {"path": path, "sha256": file_sha256(path), "size_bytes": os.path.getsize(path)},
        "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in feeds.items()],
        "batch": args.batch,
        "latency_ms": stats,
        "started_at": started_at,
        "finished_at": finished_at,
        "runs": len(samples),
        "warmup_runs": len(warmup.samples),
        "warmup_ended": warmup.ended,
        "warmup_stable": warmup.stable,
        "noisy": stats["cv"] > NOISY_CV,
        "peak_memory_mb": peak,
        "model_memory_mb": max(peak - rss_before, 0.0) if peak is not None and rss_before is not None else None,
        "execution_provider": session.get_providers()[0],
        "providers_requested": requested,
        "threads": {"intra_op": args.threads, "inter_op": args.inter_op_threads},
        "pinned_cpu": pinned,
        "niceness": os.nice(0),  # a niced agent is preempted by whatever else runs on the device
        "energy": energy,
        "cpu_governor": cpu_governor(),
        "thermal": read_thermal(),
        "throttled": vcgencmd_throttled(),
        "warnings": warnings,
    }


# -------------------------------------------------------------------------------------------- CLI


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that raises instead of exiting, so usage errors are reported as JSON too."""

    def error(self, message):
        self.print_usage(sys.stderr)
        raise _UsageError(message)


def _bounded(kind, low, strict=False):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("invalid %s value: %r" % (kind.__name__, text))
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError("must be %s %s, got %s" % (">" if strict else ">=", low, text))
        return value
    return convert


def build_parser() -> argparse.ArgumentParser:
    """The agent's command line: `info`, `bench`, `run`, `sha256`, and the rollout's commands (agents/deploy.py)."""
    from agents.deploy import COMMANDS_HELP, add_parsers as add_deploy_parsers

    parser = _Parser(prog="python -m agents", description="Edge measurement agent (prints one JSON object).")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,run,sha256,%s}" % COMMANDS_HELP)
    sub.required = True
    sub.add_parser("info", help="describe this device")
    h = sub.add_parser("sha256", help="SHA-256 and size of a file (checks an upload)")
    h.add_argument("--file", required=True, help="path of the file")
    r = sub.add_parser("run", help="run a model on given inputs, save its outputs")
    r.add_argument("--model", required=True, help="path to the .onnx file")
    r.add_argument("--inputs", required=True, help=".npy (the model's one input) or .npz (by input name)")
    r.add_argument("--outputs", required=True, help=".npy (first output) or .npz (all outputs, by name)")
    r.add_argument("--threads", type=_bounded(int, 0), default=1, help="intra-op threads, 0 = all (default 1)")
    r.add_argument("--inter-op-threads", type=_bounded(int, 0), default=1, help="inter-op threads (default 1)")
    r.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated execution providers")
    b = sub.add_parser("bench", help="benchmark one ONNX model")
    b.add_argument("--model", required=True, help="path to the .onnx file")
    b.add_argument("--warmup", type=_bounded(int, 0), default=20,
                   help="warm-up runs; with --warmup-until-stable the least of them (default 20)")
    b.add_argument("--warmup-until-stable", action="store_true",
                   help="go on warming up until the CV of the last --stable-window runs is <= --stable-cv, "
                        "--warmup-max runs or --time-budget seconds")
    b.add_argument("--warmup-max", type=_bounded(int, 0), default=1000,
                   help="most warm-up runs with --warmup-until-stable (default 1000)")
    b.add_argument("--stable-window", type=_bounded(int, 2), default=STABLE_WINDOW,
                   help="last warm-up runs whose CV judges stability (default %d)" % STABLE_WINDOW)
    b.add_argument("--stable-cv", type=_bounded(float, 0, strict=True), default=NOISY_CV,
                   help="stable when that CV is at most this (default %g)" % NOISY_CV)
    b.add_argument("--runs", type=_bounded(int, 1), default=200, help="timed runs (default 200)")
    b.add_argument("--time-budget", type=_bounded(float, 0, strict=True), default=10.0,
                   help="stop warm-up, and then timed runs, after this many seconds each, "
                        "after at least 1 and 5 runs (default 10)")
    b.add_argument("--threads", type=_bounded(int, 0), default=1, help="intra-op threads, 0 = all (default 1)")
    b.add_argument("--inter-op-threads", type=_bounded(int, 0), default=1, help="inter-op threads (default 1)")
    b.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated execution providers")
    b.add_argument("--batch", type=_bounded(int, 1), default=1, help="size of symbolic batch dimensions")
    b.add_argument("--pin-cpu", type=_bounded(int, 0), default=None, help="pin the process to this CPU")
    b.add_argument("--power-idle-w", type=_bounded(float, 0), default=None, help="power model: idle watts")
    b.add_argument("--power-active-w", type=_bounded(float, 0), default=None,
                   help="power model: watts with all --power-cores busy")
    b.add_argument("--power-cores", type=_bounded(int, 1), default=None,
                   help="power model: cores behind --power-active-w (default: this device's cores)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    b.add_argument("--exit-on-stdin-eof", action="store_true",
                   help="stop at once when stdin closes (the host's SSH connection is gone)")
    add_deploy_parsers(sub)
    return parser


def _deploy_command(name: str):
    """A rollout command of agents/deploy.py, imported when run (agents/deploy.py imports this module)."""
    def run(args: argparse.Namespace) -> dict:
        from agents.deploy import COMMANDS as DEPLOY_COMMANDS

        return DEPLOY_COMMANDS[name](args)
    return run


COMMANDS = {"info": cmd_info, "bench": cmd_bench, "run": cmd_run, "sha256": cmd_sha256,
            **{name: _deploy_command(name) for name in ("install", "health", "rollback", "status", "watch")}}


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the agent; prints one JSON object on stdout and returns an ExitCode value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        result = COMMANDS[command](args)
        _emit(dict({"schema_version": SCHEMA_VERSION, "command": command}, **result))
        return int(ExitCode.OK)
    except _UsageError as exc:
        code, message = ExitCode.USAGE, one_line(exc)
    except AgentError as exc:
        code, message = exc.code, one_line(exc)
    except KeyboardInterrupt:
        code, message = ExitCode.ERROR, "interrupted"
    except Exception as exc:  # noqa: BLE001 - never a traceback on the device
        code, message = ExitCode.ERROR, "%s: %s" % (type(exc).__name__, one_line(exc))
    _emit({"schema_version": SCHEMA_VERSION, "command": command, "error": message, "exit_code": int(code)})
    return int(code)
