"""Built-in quantization techniques (stage `graph`), with onnxruntime.quantization.

`int8-static`: QDQ int8, weights per-channel or per-tensor, activations calibrated
on the task's calibration data with MinMax, Entropy or Percentile. Whether it is
faster than fp32 on a device is for the measurement to say, not this plugin.
"""

from __future__ import annotations

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


class Int8Static(Technique):
    """Static int8 quantization in QDQ format, calibrated on task data."""

    name = "int8-static"
    stage = "graph"
    version = "1"
    description = "int8 static quantization (QDQ), per-channel or per-tensor weights, calibrated activations"
    search_space = {
        "per_channel": choice([True, False]),
        "calibration": choice(["minmax", "entropy", "percentile"]),
        # uint8 activations (U8S8) are onnxruntime's fast path on x86 without VNNI; int8 (S8S8)
        # suits ARM. The device's measurement decides, so both are searched.
        "activations": choice(["uint8", "int8"]),
    }
    defaults = {"calibration_samples": 128}

    def invalid(self, params: dict[str, Any]) -> str | None:
        """Calibration needs at least a few samples."""
        n = params.get("calibration_samples")
        if not isinstance(n, int) or n < 8:
            return f"calibration_samples must be an integer >= 8, got {n!r}"
        return None

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """Quantize an onnx.ModelProto and return the quantized ModelProto."""
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[params["calibration"]]
        work = ctx.scratch_dir
        src, prep, out = work / "fp32.onnx", work / "fp32-prep.onnx", work / "int8.onnx"
        onnx.save(model, str(src))
        quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
        input_name = model.graph.input[0].name
        quantize_static(
            str(prep),
            str(out),
            _BatchReader(input_name, ctx.calibration_batches(params["calibration_samples"])),
            quant_format=QuantFormat.QDQ,
            per_channel=params["per_channel"],
            activation_type=QuantType.QUInt8 if params["activations"] == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        return onnx.load(str(out))


@hookimpl
def register_techniques(register):
    """Register the built-in quantization techniques."""
    register(Int8Static())
