"""Facts read from an ONNX model's bytes, shared by the wings (emulation's parity rule, rollout's health check)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from agents.kernel import SAMPLE_METADATA, SESSION_METADATA  # the agent reads what these keys hold

#: Op types that make a graph a quantized (int8) one: Q/DQ pairs and the integer kernels.
QUANTIZED_OPS: frozenset[str] = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
    "ConvInteger", "MatMulInteger",
})


def model_precision(model_bytes: bytes) -> str:
    """"int8" if the graph quantizes (Q/DQ or integer ops), "fp16" if it holds float16 weights, else "fp32"."""
    import onnx  # only when a model is looked at: `orchestrate --help` stays fast

    graph = onnx.load_from_string(model_bytes).graph
    if any(node.op_type in QUANTIZED_OPS for node in graph.node):
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
        return "fp16"
    return "fp32"


def model_ops(onnx_bytes: bytes) -> frozenset[str]:
    """The operator types of an ONNX graph."""
    import onnx

    return frozenset(node.op_type for node in onnx.load_from_string(onnx_bytes).graph.node)


def session_settings(path: Path) -> dict[str, Any] | None:
    """The onnxruntime session settings a model carries in its metadata (plugins/session.py), or None."""
    import onnx

    for prop in onnx.load(str(path), load_external_data=False).metadata_props:
        if prop.key == SESSION_METADATA:
            return json.loads(prop.value)
    return None



def samples_npz(feeds: dict[str, Any]) -> bytes:
    """Input rows by name as .npz bytes: what a model carries (`with_sample`) and a run writes (samples.npz)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **{name: np.ascontiguousarray(array) for name, array in feeds.items()})
    return buf.getvalue()


def with_sample(model_bytes: bytes, feeds: dict[str, Any] | None) -> bytes:
    """The model with real input rows in its metadata, which the agent feeds instead of random inputs
    (token ids in range, a real attention mask): as many rows as it times (batch 1: the first), all
    of them for the emulator's parity check. Only what is sent to a device for measuring
    carries it; the candidate kept and rolled out does not. No feeds: the model unchanged."""
    if not feeds:
        return model_bytes

    import onnx

    model = onnx.load_from_string(model_bytes)
    kept = [p for p in model.metadata_props if p.key != SAMPLE_METADATA]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = SAMPLE_METADATA, base64.b64encode(samples_npz(feeds)).decode("ascii")
    return model.SerializeToString()
