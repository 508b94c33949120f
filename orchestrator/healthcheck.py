"""What a device's health check after an install compares against, computed here on the host.

The host runs the run's chosen model with onnxruntime on fixed random inputs; the inputs and
the outputs travel with the model (`reference.npz`), and the agent's `health` runs the model
on the device on the same inputs and compares (agents/health.py). The tolerance depends on the
model's precision: an fp32 model must reproduce the host's outputs to float rounding, an int8
one only to a few quantization steps (int8 kernels differ between CPUs: VNNI, NEON dot
product, or none), fp16 in between.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

# precision -> (rtol, atol): |device - host| <= atol * max(1, max|host|) + rtol * |host|
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-3, 1e-4),
    "fp16": (1e-2, 1e-2),
    "int8": (5e-2, 5e-2),
}
REFERENCE_BATCH = 4  # rows of a symbolic batch dimension in the reference inputs (latency uses the profile's)
REFERENCE_SEED = 0
HEALTH_RUNS = 50
HEALTH_TIME_BUDGET_S = 3.0

_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool"}
_ELEMENT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


def model_precision(model_bytes: bytes) -> str:
    """"int8" if the graph quantizes (Q/DQ or integer ops), "fp16" if it holds float16 weights, else "fp32"."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    if any(node.op_type in _INT8_OPS for node in graph.node):
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
        return "fp16"
    return "fp32"


def reference_inputs(session: Any, seed: int = REFERENCE_SEED) -> dict[str, np.ndarray]:
    """Fixed random inputs for every model input (symbolic batch -> REFERENCE_BATCH, other symbolic dims -> 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for meta in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (REFERENCE_BATCH if i == 0 else 1)
                 for i, d in enumerate(meta.shape)]
        dtype = _ELEMENT_TYPES.get(meta.type)
        if dtype is None:
            raise ValueError(f"input {meta.name} has type {meta.type}, which the health check cannot feed")
        if np.issubdtype(dtype, np.floating):
            feeds[meta.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[meta.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:  # ids / indices: small, so lookups stay in range
            feeds[meta.name] = rng.integers(0, 10, size=shape).astype(dtype)
    return feeds


def reference_data(model_bytes: bytes, threads: int = 1) -> bytes:
    """`reference.npz`: `inputs/<name>` and the host's `outputs/<name>` for the model, as bytes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    feeds = reference_inputs(session)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feeds)))
    buf = io.BytesIO()
    np.savez(buf, **{f"inputs/{k}": v for k, v in feeds.items()}, **{f"outputs/{k}": v for k, v in outputs.items()})
    return buf.getvalue()


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
