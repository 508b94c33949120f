"""Facts read from an ONNX model's bytes, shared by the wings (emulation's parity rule, rollout's health check)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from agents.kernel import SAMPLE_METADATA, SESSION_METADATA  # the agent reads what these keys hold
from orchestrator.api import TensorSpec
from orchestrator.errors import ModelSourceError

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


def spec_json(spec: TensorSpec) -> dict[str, Any]:
    """A tensor's name, dtype and shape as results.json shows them."""
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}


def onnx_specs(path: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """An ONNX file's (inputs, outputs) as TensorSpecs, read without its external data; ModelSourceError if unusable."""
    import onnx
    from onnx import helper

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt file says so in one line
        raise ModelSourceError(f"--model {path}: not a readable ONNX model ({type(exc).__name__})") from None
    initializers = {i.name for i in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        t = value.type.tensor_type
        # a dynamic axis keeps its name; an unnamed one ("?", -1) is called INPUT:AXIS, as the agent's --axes takes it
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else
                     (d.dim_param if d.dim_param and d.dim_param != "?" else f"{value.name}:{i}")
                     for i, d in enumerate(t.shape.dim))
        if dims and isinstance(dims[0], str):
            dims = ("batch", *dims[1:])
        try:
            dtype = str(helper.tensor_dtype_to_np_dtype(t.elem_type))
        except Exception:  # noqa: BLE001
            raise ModelSourceError(f"--model {path}: input/output {value.name} has a type onnxruntime "
                                   "cannot be fed from numpy here") from None
        return TensorSpec(value.name, dtype, dims)

    inputs, outputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers), model.graph.output
    if not inputs or not outputs:  # an empty file parses as an empty model
        empty = "; the file is empty" if not model.ByteSize() else ""
        raise ModelSourceError(f"--model {path}: not a readable ONNX model (a graph with no "
                               f"{'inputs' if not inputs else 'outputs'}{empty})")
    return inputs, tuple(spec(v) for v in outputs)
