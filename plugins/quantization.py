"""Built-in quantization techniques (stage `graph`), with onnxruntime.

`int8-static`: int8 in QDQ (or QOperator) format, weights per-channel or per-tensor
(optionally 7-bit), activations uint8 or int8, calibrated on the task's calibration data with
MinMax, Entropy or Percentile. By default the attention core of a transformer (the MatMuls of
two activations, Q·Kᵀ and P·V, and the scale, mask and Softmax between them) stays in float:
int8 there collapses the model's outputs. A CNN has no such node, so nothing changes for it.
`int8-dynamic`: weights int8 ahead of time, activations quantized at run time
(`quantize_dynamic`): meant for MatMul-heavy models (and, with `operators: matmul+gather`,
embedding tables); a CNN's convolutions become ConvInteger, which onnxruntime's CPU provider
runs far slower than fp32.
`fp16`: weights and activations in float16 (`onnxruntime.transformers.float16`), with
float32 inputs and outputs kept (integer ones, token ids say, are never touched), for GPU
providers (a Jetson's CUDA/TensorRT); CPU providers mostly lack fp16 kernels.

The three are alternatives: each declares the other two `incompatible_with`, so a pipeline
holds at most one of them (other graph techniques, such as `transformer-optimize`
(plugins/fusion.py), may run before them).

Whether any of them is faster than fp32 on a device is for the measurement to say,
never this plugin.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, ClassVar

from orchestrator import Choice, Technique, choice, hookimpl
from plugins._onnxgraph import (
    FeedReader,
    attention_core,
    calibration_feeds,
    check_nodes_exist,
    constant_tensors,
    prepared,
    string_list_error,
    with_node_names,
)


class Int8Static(Technique):
    """Static int8 quantization (QDQ or QOperator), calibrated on task data."""

    name = "int8-static"
    stage = "graph"
    version = "4"  # 4: an opset<13 graph is converted to 13 first
    description = "int8 static quantization (QDQ), per-channel or per-tensor weights, calibrated activations"
    incompatible_with = ("int8-dynamic", "fp16")
    cannot_follow = ("ort-session",)  # session settings are written last (plugins/session.py)
    search_space: ClassVar[dict[str, Choice]] = {
        "per_channel": choice([True, False]),
        "calibration": choice(["minmax", "entropy", "percentile"]),
        # uint8 activations (U8S8) are onnxruntime's fast path on x86 without VNNI; int8 (S8S8)
        # suits ARM. The device's measurement decides, so both are searched.
        "activations": choice(["uint8", "int8"]),
        # 7-bit weights: onnxruntime's U8S8 kernels on x86 without VNNI (AVX2) can saturate
        # their 16-bit sums, which costs accuracy with full-range per-channel weights.
        "reduce_range": choice([False, True]),
        # QDQ (QuantizeLinear/DequantizeLinear pairs, which each provider fuses into its own
        # int8 kernels; TensorRT needs it) or QOperator (QLinearConv, QLinearMatMul, ...).
        "quant_format": choice(["QDQ", "QOperator"]),
    }
    defaults: ClassVar[dict[str, Any]] = {
        "calibration_samples": 128,
        # "all": onnxruntime's default set (every operator it can quantize), or a list of op types.
        "op_types": "all",
        "exclude_op_types": [],
        "nodes_to_exclude": [],
        # keep a transformer's attention core (attention_core()) in float
        "exclude_activation_matmul": True,
    }

    def invalid(self, params: dict[str, Any]) -> str | None:
        """Calibration needs at least a few samples; the operator and node lists must be lists of names."""
        n = params.get("calibration_samples")
        if not isinstance(n, int) or isinstance(n, bool) or n < 8:
            return f"calibration_samples must be an integer >= 8, got {n!r}"
        op_types = params.get("op_types")
        if op_types != "all" and (not isinstance(op_types, list) or not op_types
                                  or not all(isinstance(v, str) and v for v in op_types)):
            return f"op_types must be 'all' or a non-empty list of operator types, got {op_types!r}"
        for key in ("exclude_op_types", "nodes_to_exclude"):
            reason = string_list_error(params, key)
            if reason:
                return reason
        if not isinstance(params.get("exclude_activation_matmul"), bool):
            return f"exclude_activation_matmul must be true or false, got {params.get('exclude_activation_matmul')!r}"
        return None

    def recommended(self, device: Any) -> list[dict[str, Any]]:
        """onnxruntime's advice for the device's kernels (onnxruntime.ai, "Quantize ONNX models").

        x86-64: uint8 activations with int8 weights (U8S8) are the fast path; without VNNI
        the 16-bit accumulations can saturate, so 7-bit weights (reduce_range) come first
        there. ARM64 with dot product: int8 activations (S8S8) first. TensorRT: symmetric
        int8 (S8S8, per-channel). A CUDA-only device gets none (QDQ int8 runs slower there).
        Per-tensor is the second choice everywhere: fewer scales, sometimes faster kernels.
        Always QDQ: onnxruntime's recommended format since 1.11, the only one TensorRT reads.
        """
        def point(activations: str, per_channel: bool, reduce_range: bool) -> dict[str, Any]:
            return {"activations": activations, "per_channel": per_channel, "calibration": "minmax",
                    "reduce_range": reduce_range, "quant_format": "QDQ"}

        if device.gpu:
            if device.providers[0] == "TensorrtExecutionProvider":
                return [point("int8", True, False)]
            return []
        if device.arm:
            first = "int8" if device.has("asimddp") else "uint8"
            return [point(first, True, False), point(first, False, False)]
        vnni = device.has("avx512_vnni", "avx_vnni", "amx_int8")
        return [point("uint8", True, not vnni), point("uint8", False, False)]

    def op_types(self, params: dict[str, Any]) -> list[str] | None:
        """The operator types to quantize (None: onnxruntime's default set, untouched)."""
        if params["op_types"] == "all" and not params["exclude_op_types"]:
            return None
        if params["op_types"] == "all":
            from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

            base = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # what quantize_static takes for "none given"
        else:
            base = list(params["op_types"])
        ops = [op for op in base if op not in set(params["exclude_op_types"])]
        if not ops:
            raise ValueError("exclude_op_types leaves no operator type to quantize")
        return ops

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """Quantize an onnx.ModelProto and return the quantized ModelProto."""
        import numpy as np
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[params["calibration"]]
        op_types = self.op_types(params)
        check_nodes_exist(with_node_names(model), params["nodes_to_exclude"])
        prep, out = prepared(model, ctx.scratch_dir, "static")
        excluded = list(params["nodes_to_exclude"])
        if params["exclude_activation_matmul"]:
            excluded += [n for n in attention_core(onnx.load(str(prep))) if n not in excluded]
        feeds = calibration_feeds(model, ctx, params["calibration_samples"])
        try:
            # the histogram calibrators print their progress (and numpy warns of a range it cannot bin: below)
            with contextlib.redirect_stdout(io.StringIO()), np.errstate(over="ignore", invalid="ignore"):
                quantize_static(
                    str(prep),
                    str(out),
                    FeedReader(feeds),
                    quant_format=QuantFormat.QDQ if params["quant_format"] == "QDQ" else QuantFormat.QOperator,
                    op_types_to_quantize=op_types,
                    per_channel=params["per_channel"],
                    reduce_range=params["reduce_range"],
                    activation_type=QuantType.QUInt8 if params["activations"] == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded or None,
                    calibrate_method=method,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                )
        except ValueError as exc:
            if params["calibration"] != "minmax" and "bins" in str(exc):
                raise ValueError(
                    f"{params['calibration']} calibration cannot make a histogram of a tensor whose range is "
                    f"this large (an attention mask of float min, say): calibrate with minmax ({exc})") from exc
            raise
        return onnx.load(str(out))


class Int8Dynamic(Technique):
    """Dynamic int8 quantization: int8 weights, activations quantized on the fly."""

    name = "int8-dynamic"
    stage = "graph"
    version = "4"  # 3: an opset<13 graph is converted to 13 first; 4: embedding tables searched (`embeddings`)
    description = "int8 dynamic quantization (weights int8, activations at run time); for MatMul-heavy models"
    incompatible_with = ("int8-static", "fp16")
    cannot_follow = ("ort-session",)  # session settings are written last (plugins/session.py)
    # Which operator types to quantize: "conv+matmul" (onnxruntime's default set for dynamic
    # quantization, but embeddings), "matmul" (leave convolutions in float), and either with
    # "+gather": embedding tables (Gather on a weight) too. A fused graph's Attention counts
    # as a MatMul, its EmbedLayerNormalization as a Gather (plugins/fusion.py). `embeddings`, searched,
    # adds the tables to any set (a transformer's table is often half its weights: 2x smaller again,
    # at some quality); on a model without one it changes nothing.
    search_space: ClassVar[dict[str, Choice]] = {
        "per_channel": choice([False, True]),
        "weight_type": choice(["int8", "uint8"]),
        "embeddings": choice([False, True]),
    }
    defaults: ClassVar[dict[str, Any]] = {"operators": "conv+matmul", "exclude_op_types": [], "nodes_to_exclude": []}
    OPERATORS: ClassVar[dict[str, list[str]]] = {
        "conv+matmul": ["Conv", "MatMul", "Attention"],
        "matmul": ["MatMul", "Attention"],
        "matmul+gather": ["MatMul", "Attention", "Gather", "EmbedLayerNormalization"],
        "conv+matmul+gather": ["Conv", "MatMul", "Attention", "Gather", "EmbedLayerNormalization"],
    }

    def invalid(self, params: dict[str, Any]) -> str | None:
        """operators must be one of the known sets; the exclusions lists of names."""
        if params.get("operators") not in self.OPERATORS:
            return f"operators must be one of {sorted(self.OPERATORS)}, got {params.get('operators')!r}"
        for key in ("exclude_op_types", "nodes_to_exclude"):
            reason = string_list_error(params, key)
            if reason:
                return reason
        return None

    @staticmethod
    def quantizable(model: Any, ops: list[str], excluded_nodes: list[str]) -> list[str]:
        """Names of the nodes `quantize_dynamic` would quantize: MatMuls by a constant, Gathers of a float table, ..."""
        import onnx

        graph = model.graph
        const = constant_tensors(graph)
        floats = {t.name for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
        skip = set(excluded_nodes)
        out = []
        for node in graph.node:
            if node.op_type not in ops or node.name in skip:
                continue
            if node.op_type == "MatMul" and not (len(node.input) > 1 and node.input[1] in const):
                continue  # onnxruntime's dynamic quantization leaves activation x activation MatMuls alone
            if node.op_type == "Gather" and node.input[0] not in floats:
                continue  # indices into shapes, not an embedding table
            out.append(node.name)
        return out

    def recommended(self, device: Any) -> list[dict[str, Any]]:
        """For a MatMul model without convolutions (a transformer) on a CPU: per-channel int8 weights (uint8 on x86 without VNNI).

        Per-channel keeps a pretrained transformer's embedding within ~0.01 cosine of fp32 where
        per-tensor loses 2-3x more (docs/own_models.md); a CNN's convolutions become ConvInteger,
        slower than fp32 on onnxruntime's CPU provider, so a CNN gets no recommendation.
        """
        if device.gpu or not device.matmul_model:
            return []
        # x86-64 without VNNI: int8 weights with uint8 activations (U8S8) sum pairs in 16 bits that can
        # saturate; uint8 weights (U8U8) do not (onnxruntime's quantization docs). Measured on a tiny BERT
        # under an emulated AVX2 EPYC: cosine 0.977 with int8 weights, 0.999 with uint8 (docs/techniques.md)
        exact = not device.x86 or device.has("avx512_vnni", "avx_vnni", "amx_int8")
        # embedding tables too (3.9x smaller than fp32 on MiniLM, cosine 0.994 where the tables alone lose 0.0003):
        # the refinement tries them in float where the quality budget asks for it
        return [{"per_channel": True, "weight_type": "int8" if exact else "uint8", "embeddings": True}]

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """Quantize an onnx.ModelProto; refuses a model with nothing of the chosen operators to quantize."""
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        excluded_types = set(params["exclude_op_types"])
        ops = list(self.OPERATORS[params["operators"]])
        if params.get("embeddings"):
            ops += [op for op in ("Gather", "EmbedLayerNormalization") if op not in ops]
        ops = [op for op in ops if op not in excluded_types]
        named = with_node_names(model)
        check_nodes_exist(named, params["nodes_to_exclude"])
        if not self.quantizable(named, ops, params["nodes_to_exclude"]):
            labels = [op for op in ops if op in ("Conv", "MatMul", "Gather")]  # the fused ones go without saying
            raise ValueError(f"the model has no {'/'.join(labels) or 'such'} node to quantize")
        prep, out = prepared(model, ctx.scratch_dir, "dynamic")
        quantize_dynamic(
            str(prep), str(out),
            op_types_to_quantize=ops,
            per_channel=params["per_channel"],
            weight_type=QuantType.QInt8 if params["weight_type"] == "int8" else QuantType.QUInt8,
            nodes_to_exclude=list(params["nodes_to_exclude"]) or None,
        )
        return onnx.load(str(out))


class Float16(Technique):
    """float16 weights and compute, float32 inputs and outputs; integer tensors untouched."""

    name = "fp16"
    stage = "graph"
    version = "1"
    description = "float16 conversion (float32 inputs/outputs kept); for GPU execution providers"
    incompatible_with = ("int8-static", "int8-dynamic")
    cannot_follow = ("ort-session",)  # session settings are written last (plugins/session.py)
    search_space: ClassVar[dict[str, Choice]] = {}
    defaults: ClassVar[dict[str, Any]] = {"keep_io_types": True}

    def recommended(self, device: Any) -> list[dict[str, Any]]:
        """Where half precision has fast kernels: a CUDA/TensorRT provider, or an ARM CPU with fp16 arithmetic."""
        return [{}] if device.gpu or (device.arm and device.has("asimdhp", "fphp")) else []

    def invalid(self, params: dict[str, Any]) -> str | None:
        """keep_io_types must be a boolean."""
        if not isinstance(params.get("keep_io_types"), bool):
            return f"keep_io_types must be true or false, got {params.get('keep_io_types')!r}"
        return None

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """Convert a copy of an onnx.ModelProto to float16.

        Only float tensors change: integer inputs and outputs (token ids, attention masks) keep
        their type whatever `keep_io_types` says; with it, float32 ones stay float32 (casts inside).
        """
        import copy

        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(copy.deepcopy(model), keep_io_types=params["keep_io_types"])
        for before, after in ((model.graph.input, half.graph.input), (model.graph.output, half.graph.output)):
            old = {v.name: v.type.tensor_type.elem_type for v in before}
            for v in after:
                was = old.get(v.name)
                if was is not None and was != onnx.TensorProto.FLOAT and v.type.tensor_type.elem_type != was:
                    raise ValueError(f"fp16 changed the type of {v.name!r}, which is not float32")
        return half


@hookimpl
def register_techniques(register):
    """Register the built-in quantization techniques."""
    register(Int8Static())
    register(Int8Dynamic())
    register(Float16())
