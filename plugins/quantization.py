"""Built-in quantization techniques (stage `graph`), with onnxruntime.

`int8-static`: QDQ int8, weights per-channel or per-tensor (optionally 7-bit), activations
uint8 or int8, calibrated on the task's calibration data with MinMax, Entropy or Percentile.
`int8-dynamic`: weights int8 ahead of time, activations quantized at run time
(`quantize_dynamic`): meant for MatMul-heavy models; a CNN's convolutions become
ConvInteger, which onnxruntime's CPU provider runs far slower than fp32.
`fp16`: weights and activations in float16 (`onnxruntime.transformers.float16`), with
float32 inputs and outputs kept, for GPU providers (a Jetson's CUDA/TensorRT); CPU
providers mostly lack fp16 kernels.

Whether any of them is faster than fp32 on a device is for the measurement to say,
never this plugin.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

from orchestrator import Technique, choice, hookimpl


class _BatchReader:
    """Feeds calibration batches to onnxruntime's calibrator (a CalibrationDataReader)."""

    def __init__(self, input_name: str, batches: list[Any]) -> None:
        self._items = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict | None:
        return next(self._items, None)

    def rewind(self) -> None:  # pragma: no cover - only some calibrators call it
        raise NotImplementedError


def _prepared(model: Any, work: Any, stem: str) -> tuple[Any, Any]:
    """Save `model` and run onnxruntime's quantization pre-processing; returns (prepared path, output path)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, prep, out = work / f"{stem}-fp32.onnx", work / f"{stem}-prep.onnx", work / f"{stem}-int8.onnx"
    onnx.save(model, str(src))
    quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
    return prep, out


class Int8Static(Technique):
    """Static int8 quantization in QDQ format, calibrated on task data."""

    name = "int8-static"
    stage = "graph"
    version = "2"
    description = "int8 static quantization (QDQ), per-channel or per-tensor weights, calibrated activations"
    search_space = {
        "per_channel": choice([True, False]),
        "calibration": choice(["minmax", "entropy", "percentile"]),
        # uint8 activations (U8S8) are onnxruntime's fast path on x86 without VNNI; int8 (S8S8)
        # suits ARM. The device's measurement decides, so both are searched.
        "activations": choice(["uint8", "int8"]),
        # 7-bit weights: onnxruntime's U8S8 kernels on x86 without VNNI (AVX2) can saturate
        # their 16-bit sums, which costs accuracy with full-range per-channel weights.
        "reduce_range": choice([False, True]),
    }
    defaults = {"calibration_samples": 128}

    def invalid(self, params: dict[str, Any]) -> str | None:
        """Calibration needs at least a few samples."""
        n = params.get("calibration_samples")
        if not isinstance(n, int) or n < 8:
            return f"calibration_samples must be an integer >= 8, got {n!r}"
        return None

    def recommended(self, device: Any) -> list[dict[str, Any]]:
        """onnxruntime's advice for the device's kernels (onnxruntime.ai, "Quantize ONNX models").

        x86-64: uint8 activations with int8 weights (U8S8) are the fast path; without VNNI
        the 16-bit accumulations can saturate, so 7-bit weights (reduce_range) come first
        there. ARM64 with dot product: int8 activations (S8S8) first. TensorRT: symmetric
        int8 (S8S8, per-channel). A CUDA-only device gets none (QDQ int8 runs slower there).
        Per-tensor is the second choice everywhere: fewer scales, sometimes faster kernels.
        """
        if device.gpu:
            if device.providers[0] == "TensorrtExecutionProvider":
                return [{"activations": "int8", "per_channel": True, "calibration": "minmax", "reduce_range": False}]
            return []
        if device.arm:
            first = "int8" if device.has("asimddp") else "uint8"
            return [{"activations": first, "per_channel": True, "calibration": "minmax", "reduce_range": False},
                    {"activations": first, "per_channel": False, "calibration": "minmax", "reduce_range": False}]
        vnni = device.has("avx512_vnni", "avx_vnni", "amx_int8")
        return [{"activations": "uint8", "per_channel": True, "calibration": "minmax", "reduce_range": not vnni},
                {"activations": "uint8", "per_channel": False, "calibration": "minmax", "reduce_range": False}]

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """Quantize an onnx.ModelProto and return the quantized ModelProto."""
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[params["calibration"]]
        prep, out = _prepared(model, ctx.scratch_dir, "static")
        input_name = model.graph.input[0].name
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            quantize_static(
                str(prep),
                str(out),
                _BatchReader(input_name, ctx.calibration_batches(params["calibration_samples"])),
                quant_format=QuantFormat.QDQ,
                per_channel=params["per_channel"],
                reduce_range=params["reduce_range"],
                activation_type=QuantType.QUInt8 if params["activations"] == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        return onnx.load(str(out))


class Int8Dynamic(Technique):
    """Dynamic int8 quantization: int8 weights, activations quantized on the fly."""

    name = "int8-dynamic"
    stage = "graph"
    version = "1"
    description = "int8 dynamic quantization (weights int8, activations at run time); for MatMul-heavy models"
    search_space = {
        "per_channel": choice([False, True]),
        "weight_type": choice(["int8", "uint8"]),
    }
    # Which operator types to quantize: "conv+matmul" (onnxruntime's default set for
    # dynamic quantization) or "matmul" (leave convolutions in float).
    defaults = {"operators": "conv+matmul"}
    OPERATORS = {"conv+matmul": ["Conv", "MatMul"], "matmul": ["MatMul"]}

    def invalid(self, params: dict[str, Any]) -> str | None:
        """operators must be one of the known sets."""
        if params.get("operators") not in self.OPERATORS:
            return f"operators must be one of {sorted(self.OPERATORS)}, got {params.get('operators')!r}"
        return None

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """Quantize an onnx.ModelProto; refuses a model with nothing of the chosen operators to quantize."""
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        ops = self.OPERATORS[params["operators"]]
        if not any(node.op_type in ops for node in model.graph.node):
            raise ValueError(f"the model has no {'/'.join(ops)} node to quantize")
        prep, out = _prepared(model, ctx.scratch_dir, "dynamic")
        quantize_dynamic(
            str(prep), str(out),
            op_types_to_quantize=ops,
            per_channel=params["per_channel"],
            weight_type=QuantType.QInt8 if params["weight_type"] == "int8" else QuantType.QUInt8,
        )
        return onnx.load(str(out))


class Float16(Technique):
    """float16 weights and compute, float32 inputs and outputs."""

    name = "fp16"
    stage = "graph"
    version = "1"
    description = "float16 conversion (float32 inputs/outputs kept); for GPU execution providers"
    search_space = {}
    defaults = {"keep_io_types": True}

    def recommended(self, device: Any) -> list[dict[str, Any]]:
        """Where half precision has fast kernels: a CUDA/TensorRT provider, or an ARM CPU with fp16 arithmetic."""
        return [{}] if device.gpu or (device.arm and device.has("asimdhp", "fphp")) else []

    def invalid(self, params: dict[str, Any]) -> str | None:
        """keep_io_types must be a boolean."""
        if not isinstance(params.get("keep_io_types"), bool):
            return f"keep_io_types must be true or false, got {params.get('keep_io_types')!r}"
        return None

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """Convert a copy of an onnx.ModelProto to float16."""
        import copy

        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16(copy.deepcopy(model), keep_io_types=params["keep_io_types"])


@hookimpl
def register_techniques(register):
    """Register the built-in quantization techniques."""
    register(Int8Static())
    register(Int8Dynamic())
    register(Float16())
