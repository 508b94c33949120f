"""What a device's health check after an install compares against, computed here on the host.

The host runs the run's chosen model with onnxruntime on the run's held-out samples (`samples.npz`
in the run folder), or on fixed random inputs for a run without them (made by the agent's own
`agents.kernel.reference_inputs`, so host and device make inputs one way); the inputs and
the outputs travel with the model (`reference.npz`), and the agent's `health` runs the model
on the device on the same inputs and compares (agents/health.py). The tolerance depends on the
model's precision: an fp32 model must reproduce the host's outputs to float rounding, an int8
one only to a few quantization steps (int8 kernels differ between CPUs: VNNI, NEON dot
product, or none), fp16 in between.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from agents.kernel import reference_inputs, run_as_configured

# precision -> (rtol, atol): |device - host| <= atol * max(1, max|host|) + rtol * |host|
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-3, 1e-4),
    "fp16": (1e-2, 1e-2),
    "int8": (5e-2, 5e-2),
}
HEALTH_RUNS = 50
HEALTH_TIME_BUDGET_S = 3.0


def reference_data(model_bytes: bytes, threads: int = 1, sample: dict[str, np.ndarray] | None = None) -> bytes:
    """`reference.npz`: `inputs/<name>` and the host's `outputs/<name>` for the model, as bytes.

    With `sample` (the run's held-out rows, `samples.npz` beside its results), the check runs on
    real inputs (token ids in range, real masks); a sample that does not fit the model's inputs
    falls back to the fixed random ones.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    feeds = reference_inputs(session, sample=sample)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, run_as_configured(session)(None, feeds)))  # as the device runs it (settings)
    buf = io.BytesIO()
    np.savez(buf, **{f"inputs/{k}": v for k, v in feeds.items()}, **{f"outputs/{k}": v for k, v in outputs.items()})
    return buf.getvalue()


def read_samples(path: Path | None) -> dict[str, np.ndarray] | None:
    """A run's `samples.npz` (input name -> rows), or None when there is none or it cannot be read."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError):
        return None


def health_spec(precision: str, constraints: dict[str, Any], runtime: dict[str, Any], batch: int,
                runs: int = HEALTH_RUNS, time_budget_s: float = HEALTH_TIME_BUDGET_S) -> dict[str, Any]:
    """What the agent's `health` checks, stored with the version on the device (so a check needs no host)."""
    rtol, atol = TOLERANCES[precision]
    return {
        "precision": precision, "rtol": rtol, "atol": atol,
        "latency_percentile": constraints.get("latency_percentile") or "p90",
        "max_latency_ms": constraints.get("max_latency_ms"),
        "threads": runtime.get("intra_op_threads", 1), "inter_op_threads": runtime.get("inter_op_threads", 1),
        "providers": list(runtime.get("execution_providers") or ["CPUExecutionProvider"]),
        "batch": batch, "warmup": 3, "runs": runs, "time_budget_s": time_budget_s,
    }


def describe_health(health: dict[str, Any] | None) -> str:
    """One line for a health check result."""
    if not health:
        return "no health check"
    if not health.get("healthy"):
        return "UNHEALTHY: " + "; ".join(health.get("reasons") or ["?"])
    out, lat = health.get("outputs") or {}, health.get("latency") or {}
    text = f"healthy: outputs within tolerance ({health.get('precision')}, max |err| {out.get('max_abs_err', 0):.2g})"
    if lat:
        limit = f" <= {lat['max_ms']:g} ms" if lat.get("max_ms") is not None else " (no limit)"
        text += f", latency {lat.get('percentile')} {lat.get('value_ms', 0):.3g} ms{limit}"
    return text
