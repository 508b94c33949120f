"""The agent's shared kernel: exit codes and errors, sha256, argparse bounds, model inputs, latency
statistics and onnxruntime sessions. Every other agent module builds on this one, and it imports
no other agent module.

DEPENDENCY NOTE: every module of ``agents/`` runs on the edge device itself (Raspberry Pi, Jetson, ...)
where only Python 3.9+, numpy and onnxruntime are installed (psutil is optional and its import is
guarded). Import ONLY the standard library, numpy, onnxruntime and ``agents.*``: no torch, ray,
pluggy, pydantic, yaml, and nothing from ``orchestrator`` (tests/test_agent_imports.py checks it,
and that the agent's modules import each other without a cycle). Keep the syntax Python 3.9
compatible. Do not spawn subprocesses (the agent may run under qemu-user, where child processes
cannot exec); the exceptions are the optional, guarded ``vcgencmd`` calls on Raspberry Pis.

The host imports this module too: ``make_inputs`` (the emulated devices' parity inputs) and
``reference_inputs`` (the reference data a device's health check compares against).

Every command prints exactly one JSON object on stdout (``schema_version`` 1) and returns an
``ExitCode``; errors are reported as ``{"schema_version": 1, "command": ..., "error": ..., "exit_code": N}``.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import hashlib
import io
import json
import platform
import time
from enum import IntEnum

import numpy as np

try:
    import onnxruntime as ort
except ImportError:  # reported as an error by the commands that need it
    ort = None

SCHEMA_VERSION = 1
REFERENCE_BATCH = 4  # rows of a symbolic batch dimension in the reference inputs of a health check
REFERENCE_SEED = 0

# ONNX element types the agent can feed, and the numpy dtype of each.
ELEMENT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
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


# ------------------------------------------------------------------------------------------ helpers


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


def bounded(kind, low: float, strict: bool = False):
    """An argparse `type=`: `kind(text)` that must be >= `low` (> `low` when `strict`)."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("invalid %s value: %r" % (kind.__name__, text))
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError("must be %s %s, got %s" % (">" if strict else ">=", low, text))
        return value
    return convert


# ------------------------------------------------------------------------------------------- inputs


def random_array(rng: np.random.Generator, shape: list, dtype) -> np.ndarray:
    """Random values of one input: normal floats, 0/1 bools, the full range of 8-bit integers
    (quantized data such as pixels), and 0..9 for wider integers (ids and indices: kept small so
    embedding lookups stay in range)."""
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype is np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype in (np.uint8, np.int8):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return rng.integers(0, 10, size=shape, dtype=dtype)


def input_dtype(meta):
    """The numpy dtype of one model input (an onnxruntime NodeArg); AgentError if the agent cannot feed it."""
    dtype = ELEMENT_TYPES.get(meta.type)
    if dtype is None:
        raise AgentError("input %s has unsupported type %s" % (meta.name, meta.type))
    return dtype


def parse_axes(text: str) -> dict:
    """``sequence=128,x:2=48`` -> {"sequence": 128, "x:2": 48} (argparse type of ``--axes``): a dynamic axis by
    its name in the model, or an unnamed one as INPUT:AXIS."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        if not sep or not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError("give NAME=SIZE[,NAME=SIZE...] with sizes >= 1, got %r" % text)
        out[name.strip()] = int(size)
    return out


#: The model metadata key of a real input sample the host attached for timing (orchestrator/models/modelfacts.py).
SAMPLE_METADATA = "edge_orchestrator.sample"


def model_sample(session, warnings: list):
    """{input name: array} of the real sample a model carries (SAMPLE_METADATA: base64 of an .npz), or None."""
    try:
        text = session.get_modelmeta().custom_metadata_map.get(SAMPLE_METADATA)
    except Exception:  # noqa: BLE001 - an onnxruntime without model metadata
        return None
    if not text:
        return None
    try:
        with np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:  # noqa: BLE001 - a damaged sample: time random inputs instead, and say so
        warnings.append("the model's input sample is unreadable (%s): random inputs timed" % one_line(exc))
        return None


def _sample_feeds(session, sample: dict, batch: int, warnings: list):
    """Feeds from a real sample (its rows repeated up to `batch` where the batch axis is symbolic), or None."""
    feeds = {}
    for meta in session.get_inputs():
        array = sample.get(meta.name)
        if array is None or array.dtype != np.dtype(input_dtype(meta)) or array.ndim != len(meta.shape):
            warnings.append("the model's input sample does not fit input %s: random inputs timed" % meta.name)
            return None
        first = meta.shape[0] if meta.shape else None
        rows = first if isinstance(first, int) and first > 0 else batch  # a fixed batch size wins over --batch
        if len(array) != rows:  # the sample's rows, repeated or cut to the rows fed
            array = np.concatenate([array] * (rows // len(array) + 1))[:rows]
        feeds[meta.name] = array
    return feeds


def make_inputs(session, batch: int, seed: int, warnings: list, axes: dict = None, source: list = None,
                sample: dict = None) -> dict:
    """Feeds for every model input: the real `sample` given, else the one the model carries, when it does
    (the host attaches the run's first held-out rows for timing); else random ones, dtype from metadata: the first symbolic dim
    -> batch, a symbolic dim named in `axes` -> its size there (a sequence length, say), any other symbolic
    dim -> 1 (warned). `source`, when given, gets "sample" or "random" appended."""
    source = source if source is not None else []
    sample = sample if sample is not None else model_sample(session, warnings)
    if sample is not None:
        feeds = _sample_feeds(session, sample, batch, warnings)
        if feeds is not None:
            source.append("sample")
            return feeds
    source.append("random")
    axes = axes or {}
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
            elif i == 0:
                shape.append(batch)
            elif "%s:%d" % (meta.name, i) in axes:  # an unnamed dynamic axis, by input and position
                shape.append(axes["%s:%d" % (meta.name, i)])
            elif dim in axes:
                shape.append(axes[dim])
            else:
                if axes or isinstance(dim, str):
                    warnings.append("input %s: dynamic axis %s timed at size 1 (give --axes %s=SIZE)"
                                    % (meta.name, dim, dim))
                shape.append(1)
        feeds[meta.name] = random_array(rng, shape, input_dtype(meta))
    return feeds


def reference_inputs(session, seed: int = REFERENCE_SEED, batch: int = REFERENCE_BATCH, sample: dict = None) -> dict:
    """The fixed inputs of a health check's reference data (the host computes the outputs on them):
    `make_inputs` with symbolic batch dimensions -> `batch` rows, other symbolic dims -> 1; with `sample`
    (the run's held-out rows, by input name), those real rows instead of random ones.

    `session` is anything with onnxruntime's `get_inputs()`; AgentError for an input type it cannot feed.
    """
    return make_inputs(session, batch, seed, [], sample=sample)


# ------------------------------------------------------------------------------------------ latency


def latency_stats(samples_ms: list) -> dict:
    """p50/p90/p99 (linear interpolation), mean, std (sample), min, max and cv of latencies in ms."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(arr, [50, 90, 99]))
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {
        "p50": p50, "p90": p90, "p99": p99, "mean": mean, "std": std,
        "min": float(arr.min()), "max": float(arr.max()), "cv": std / mean if mean > 0 else 0.0,
    }


def timed_runs(run, count: int, budget_s: float, min_runs: int) -> list:
    """Run `run()` up to `count` times or until `budget_s` passed (after at least `min_runs`); ms per run."""
    samples = []
    deadline = time.perf_counter_ns() + int(budget_s * 1e9)
    while len(samples) < count and (len(samples) < min_runs or time.perf_counter_ns() < deadline):
        t0 = time.perf_counter_ns()
        run()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


# ----------------------------------------------------------------------------------------- sessions


def require_ort() -> None:
    if ort is None:
        raise AgentError("onnxruntime is not installed on this device")


def choose_providers(requested: list, warnings: list) -> list:
    """The requested execution providers this onnxruntime has (a warning for each missing one), else CPU."""
    require_ort()
    available = ort.get_available_providers()
    chosen = [p for p in requested if p in available]
    for p in requested:
        if p not in available:
            warnings.append("execution provider %s is not available (available: %s)" % (p, ", ".join(available)))
    if not chosen:
        warnings.append("none of the requested providers is available; falling back to CPUExecutionProvider")
        chosen = ["CPUExecutionProvider"]
    return chosen


#: The model metadata key holding the session settings a model was measured with (plugins/session.py).
SESSION_METADATA = "edge_orchestrator.session"
GRAPH_LEVELS = ("disable", "basic", "extended", "all")


def create_session(path: str, threads: int, inter_op_threads: int, providers: list, warnings: list):
    """An InferenceSession with these threads, the available ones of `providers` (see choose_providers)
    and full graph optimisation, unless the model carries its own session settings (SESSION_METADATA:
    graph optimisation level, execution mode, threads, denormals flushed), which then win: a device
    runs a model as it was measured. The settings applied are the session's `eo_settings` ({} when
    none). MODEL_INVALID if the model does not load."""
    chosen = choose_providers(providers, warnings)
    session = _session(path, chosen, {"intra_op_threads": threads, "inter_op_threads": inter_op_threads})
    settings = model_session_settings(session, warnings)
    if settings.get("denormal_as_zero") and not denormals_supported():
        warnings.append("the model's session setting denormal_as_zero is not supported on %s: ignored"
                        % (platform.machine() or "this CPU"))
        del settings["denormal_as_zero"]
    if settings:
        session = _session(path, chosen, {"intra_op_threads": threads, "inter_op_threads": inter_op_threads,
                                          **settings})
    session.run = run_as_configured(session, settings)
    session.eo_settings = settings
    return session


def run_as_configured(session, settings: dict | None = None):
    """The session's `run`, with denormals flushed on the calling thread when the model's settings
    (`settings`, else read from the session's model) ask for it and this machine can: how the agent
    runs a model, and how the host scores it."""
    if settings is None:
        settings = model_session_settings(session, [])
    if settings.get("denormal_as_zero") and denormals_supported():
        return with_denormals_flushed(session.run)
    return session.run


# Flush-to-zero and denormals-are-zero, per thread: onnxruntime's `session.set_denormal_as_zero`
# sets them on its pool threads, but on the calling thread (where a 1-thread session computes) only
# for the first session a process creates. So the agent sets them itself around each run of a
# session that asks for them, through the C library's fenv (the bits fenv.h has no name for):
# x86-64 MXCSR FTZ|DAZ, AArch64 FPCR.FZ, 32-bit ARM FPSCR.FZ. Why it matters: exp() of a masked
# attention score underflows through denormals, 10x slower (docs/own_models.md).
_FENV = {  # machine: (fenv_t size, offset of the control word in it, the bits)
    "x86_64": (32, 28, 0x8040), "AMD64": (32, 28, 0x8040),
    "aarch64": (8, 0, 1 << 24), "arm64": (8, 0, 1 << 24),
    "armv7l": (4, 0, 1 << 24), "armv6l": (4, 0, 1 << 24),
}
_libm = None


def denormals_supported() -> bool:
    """Whether this agent can flush denormals on this machine (Linux glibc/musl fenv on x86-64 or ARM)."""
    global _libm
    if platform.machine() not in _FENV or not platform.system() == "Linux":
        return False
    if _libm is None:
        _libm = False
        # the symbols the process has already loaded (Python links the C maths library), else glibc's
        # libm by name: no ctypes.util.find_library, which runs ldconfig/gcc (the agent starts no process)
        for name in (None, "libm.so.6"):
            try:
                lib = ctypes.CDLL(name)
                lib.fegetenv, lib.fesetenv  # noqa: B018 - both must exist
            except (OSError, AttributeError):
                continue
            _libm = lib
            break
    return bool(_libm)


def with_denormals_flushed(run):
    """`run` with flush-to-zero/denormals-are-zero on the calling thread while it runs; the thread's
    floating-point environment is restored exactly after. About 3 us a call. The wrapper keeps its
    two fenv buffers: call it from one thread at a time (the agent runs a session from one)."""
    size, offset, bits = _FENV[platform.machine()]
    saved, flushed = ctypes.create_string_buffer(size), ctypes.create_string_buffer(size)
    word = ctypes.c_uint32.from_buffer(flushed, offset)
    get, put = _libm.fegetenv, _libm.fesetenv

    def flushed_run(*args, **kwargs):
        if get(saved) != 0:
            raise OSError("fegetenv failed")
        ctypes.memmove(flushed, saved, size)
        word.value |= bits
        if put(flushed) != 0:
            raise OSError("fesetenv failed")
        try:
            return run(*args, **kwargs)
        finally:
            put(saved)
    return flushed_run


def _session(path: str, providers: list, settings: dict):
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings["intra_op_threads"]
    options.inter_op_num_threads = settings["inter_op_threads"]
    level = settings.get("graph_optimization_level", "all")
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if settings.get("execution_mode") == "parallel":
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if settings.get("denormal_as_zero"):
        options.add_session_config_entry("session.set_denormal_as_zero", "1")  # its pool threads
    try:
        return ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
        raise AgentError("cannot load model %s: %s" % (path, one_line(exc)), ExitCode.MODEL_INVALID)


def model_session_settings(session, warnings: list) -> dict:
    """The session settings a model carries in its metadata, checked; {} when none (or unusable: warned)."""
    try:
        text = session.get_modelmeta().custom_metadata_map.get(SESSION_METADATA)
    except Exception:  # noqa: BLE001 - an onnxruntime without model metadata
        return {}
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError:
        warnings.append("the model's session settings are not JSON: ignored")
        return {}
    out = {}
    for key, value in (raw.items() if isinstance(raw, dict) else []):
        if key in ("intra_op_threads", "inter_op_threads") and isinstance(value, int) and not isinstance(value, bool) \
                and 0 <= value <= 1024:
            out[key] = value
        elif key == "graph_optimization_level" and value in GRAPH_LEVELS:
            out[key] = value
        elif key == "execution_mode" and value in ("sequential", "parallel"):
            out[key] = value
        elif key == "denormal_as_zero" and isinstance(value, bool):
            out[key] = value
        elif value is not None:
            warnings.append("the model's session setting %s=%r is not one the agent knows: ignored" % (key, value))
    return out
