"""Measuring one model on this device: ``bench`` (latency distribution, memory, energy, thermal state)
and ``run`` (outputs on given inputs, for output parity with the host). Runs on the device: see
agents/kernel.py.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from typing import NamedTuple

import numpy as np

from agents.info import cpu_governor, read_thermal, vcgencmd_throttled
from agents.kernel import (
    ELEMENT_TYPES,
    AgentError,
    ExitCode,
    create_session,
    file_sha256,
    latency_stats,
    make_inputs,
    one_line,
    require_ort,
    timed_runs,
)
from agents.sensors import (
    GPU_PROVIDERS,
    MIN_POWER_SAMPLES,
    SampledSensor,
    SensorError,
    discover_energy_sensor,
    estimated_energy,
    measured_energy,
    read_text_file,
    unavailable_energy,
)

try:
    import psutil
except ImportError:  # optional: /proc/self/status is read first
    psutil = None

try:
    import resource
except ImportError:  # not on Windows
    resource = None

MIN_TIMED_RUNS = 5
NOISY_CV = 0.05
STABLE_WINDOW = 10  # warm-up is stable when the CV of this many last runs is <= --stable-cv


# ------------------------------------------------------------------------------------------- memory


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


# ----------------------------------------------------------------------------------- warm-up, timing


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


# Instruction counting under QEMU (orchestrator/emulation/icount.py, its insncount.c plugin): lseek on fd -1
# with these offsets fails with EBADF and changes nothing, and the plugin sees it as a region mark.
COUNT_MARK_START = 0x1C0A7000
COUNT_MARK_STOP = COUNT_MARK_START + 1


def count_mark(offset: int) -> None:
    """One region mark for an instruction-counting QEMU plugin (a no-op system call anywhere else)."""
    try:
        os.lseek(-1, offset, os.SEEK_SET)
    except OSError:
        pass


def counted(run):
    """`run` bracketed by the counting plugin's marks; one empty region first, the marks' own cost."""
    count_mark(COUNT_MARK_START)
    count_mark(COUNT_MARK_STOP)

    def marked():
        count_mark(COUNT_MARK_START)
        try:
            return run()
        finally:
            count_mark(COUNT_MARK_STOP)

    return marked


def measure(run, args: argparse.Namespace, warnings: list[str], gpu: bool = False):
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
    if getattr(args, "count_marks", False):
        run = counted(run)
    try:
        samples = timed_runs(run, args.runs, args.time_budget, min(args.runs, MIN_TIMED_RUNS))
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


# ------------------------------------------------------------------------------------------ commands


def requested_providers(args: argparse.Namespace) -> list[str]:
    return [p.strip() for p in args.providers.split(",") if p.strip()]


def pin_cpu(cpu: int | None, warnings: list[str]) -> int | None:
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


def exit_when_stdin_closes() -> None:
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
    require_ort()
    if args.exit_on_stdin_eof:
        exit_when_stdin_closes()
    path = args.model
    if not os.path.isfile(path):
        raise AgentError("model file not found: %s" % path, ExitCode.MODEL_NOT_FOUND)
    if (args.power_idle_w is None) != (args.power_active_w is None):
        raise AgentError("--power-idle-w and --power-active-w must be given together", ExitCode.USAGE)
    if args.power_idle_w is not None and args.power_active_w < args.power_idle_w:
        raise AgentError("--power-active-w must be >= --power-idle-w", ExitCode.USAGE)

    warnings = []
    requested = requested_providers(args)
    saved_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        pinned = pin_cpu(args.pin_cpu, warnings)  # before the session, so its thread pool inherits it
        rss_before = current_rss_mb()
        session = create_session(path, args.threads, args.inter_op_threads, requested, warnings)
        source = []
        feeds = make_inputs(session, args.batch, args.seed, warnings, args.axes, source)
        try:
            started_at = time.time()  # wall clock: the host compares windows across devices and processes
            warmup, samples, energy = measure(lambda: session.run(None, feeds), args, warnings,
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
        "inputs_source": source[0],  # "sample": the real input the model carries; "random": made up
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
        "threads": {"intra_op": session.eo_settings.get("intra_op_threads", args.threads),
                    "inter_op": session.eo_settings.get("inter_op_threads", args.inter_op_threads)},
        "session_settings": session.eo_settings,  # what the model carried (plugins/session.py); {} when none
        "pinned_cpu": pinned,
        "niceness": os.nice(0),  # a niced agent is preempted by whatever else runs on the device
        "energy": energy,
        "cpu_governor": cpu_governor(),
        "thermal": read_thermal(),
        "throttled": vcgencmd_throttled(),
        "warnings": warnings,
    }


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
    require_ort()
    if not os.path.isfile(args.model):
        raise AgentError("model file not found: %s" % args.model, ExitCode.MODEL_NOT_FOUND)
    if not os.path.isfile(args.inputs):
        raise AgentError("inputs file not found: %s" % args.inputs, ExitCode.USAGE)
    warnings = []
    session = create_session(args.model, args.threads, args.inter_op_threads, requested_providers(args), warnings)
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
        "threads": {"intra_op": session.eo_settings.get("intra_op_threads", args.threads),
                    "inter_op": session.eo_settings.get("inter_op_threads", args.inter_op_threads)},
        "session_settings": session.eo_settings,  # what the model carried (plugins/session.py); {} when none
        "warnings": warnings,
    }
