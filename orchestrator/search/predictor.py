"""A per-device latency predictor, fitted on that device's own measurements (in the spirit of nn-Meter).

Features come from the ONNX graph: multiply-accumulates per operator kind (conv, depthwise conv,
matmul/gemm), weight count and operator count. Latency is fitted as a non-negative linear
combination of them (scipy's NNLS), so each feature contributes a cost per unit on this device.
The search asks it before spending a training budget on an architecture that would break the
profile's latency constraint; its quality is reported as the share of predictions within ±10%
of what the device then measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.api import TechniqueContext
from orchestrator.devices.base import settings_key
from orchestrator.fleet.measurements import MeasurementCache
from orchestrator.search.pipeline import export_onnx
from orchestrator.state.paths import cache_dir, scratch_dir

FEATURES = ("conv_macs", "int8_conv_macs", "depthwise_macs", "matmul_macs", "params", "ops")
MIN_POINTS = 4


def onnx_features(model: Any) -> dict[str, float]:
    """Cost features of an ONNX model (ModelProto or bytes), at batch size 1."""
    import numpy as np
    import onnx
    from onnx import numpy_helper, shape_inference

    if isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    graph = model.graph
    # Pin the batch dimension to 1 so inferred shapes are concrete.
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    inferred = shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes: dict[str, list[int]] = {}
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # constants folded into the graph (e.g. QDQ weights)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims:
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    feats = dict.fromkeys(FEATURES, 0.0)
    feats["params"] = float(sum(a.size for a in inits.values() if a.dtype.kind in "fiu" and a.ndim > 1))
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue  # fused away by onnxruntime's QDQ handling
        feats["ops"] += 1
        out = shapes.get(node.output[0]) or []
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv") and len(node.input) > 1:
            wname = node.input[1 if node.op_type != "QLinearConv" else 3]
            weight = _weight_shape(wname, inits, shapes, graph)
            if weight and len(out) == 4:
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                macs = float(np.prod(out[1:]) * np.prod(weight[1:]))
                int8 = node.op_type != "Conv" or wname not in inits  # QDQ weights arrive dequantized
                kind = "depthwise_macs" if group > 1 else ("int8_conv_macs" if int8 else "conv_macs")
                feats[kind] += macs
        elif node.op_type in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul") and len(node.input) > 1:
            weight = _weight_shape(node.input[1], inits, shapes, graph)
            if weight and out:
                feats["matmul_macs"] += float(np.prod(out) * weight[0 if node.op_type != "Gemm" else -1])
    return feats


def _weight_shape(name: str, inits: dict[str, Any], shapes: dict[str, list[int]], graph: Any) -> list[int] | None:
    if name in inits:
        return list(inits[name].shape)
    for node in graph.node:  # a QDQ weight: follow DequantizeLinear back to its initializer
        if node.output and node.output[0] == name and node.op_type == "DequantizeLinear":
            return _weight_shape(node.input[0], inits, shapes, graph)
    return shapes.get(name) or None


@dataclass
class LatencyPredictor:
    """Fits latency (ms) = non-negative cost per feature unit, from (features, measured latency) pairs."""

    points: list[tuple[dict[str, float], float]] = field(default_factory=list)
    checks: list[tuple[float, float]] = field(default_factory=list)  # (predicted, then measured)
    _coef: Any = None

    def add(self, features: dict[str, float], latency_ms: float, predicted: float | None = None) -> None:
        """Record a measurement (and the prediction made before it, if any) and refit."""
        if predicted is not None:
            self.checks.append((predicted, latency_ms))
        self.points.append((features, latency_ms))
        self._fit()

    def _fit(self) -> None:
        import numpy as np
        from scipy.optimize import nnls

        if len(self.points) < MIN_POINTS:
            self._coef = None
            return
        x = np.array([[1.0] + [p[0][f] for f in FEATURES] for p in self.points])
        y = np.array([p[1] for p in self.points])
        scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        coef, _ = nnls(x / scale, y)
        self._coef = coef / scale

    def predict(self, features: dict[str, float]) -> float | None:
        """Predicted latency in ms, or None until enough measurements exist."""
        if self._coef is None:
            return None
        return float(self._coef[0] + sum(c * features[f] for c, f in zip(self._coef[1:], FEATURES)))

    def quality(self) -> dict[str, Any]:
        """How the predictions made so far compare with what was then measured."""
        if not self.checks:
            return {"predictions": 0, "within_10_percent": None}
        within = sum(abs(p - m) <= 0.1 * m for p, m in self.checks)
        errors = sorted(abs(p - m) / m for p, m in self.checks)
        return {"predictions": len(self.checks), "within_10_percent": within / len(self.checks),
                "median_relative_error": errors[len(errors) // 2]}


def preview_candidate(registry: Any, task: Any, base_model: Any, pipeline: list[dict[str, Any]],
                      ctx_kwargs: dict[str, Any]) -> bytes | None:
    """The candidate's final graph without its training, when that is cheap to make; else None.

    Only pipelines whose architecture-stage technique can show its architecture untrained
    (`technique.architecture(params, ctx)`) and that have no training-stage technique (those
    change the graph in ways only the training shows) can be previewed. Graph-stage techniques
    (quantization) are applied to the untrained architecture: they cost seconds, training minutes.
    """
    import onnx


    steps = [(registry.technique(s["technique"]), s["params"]) for s in pipeline]
    arch = [(t, p) for t, p in steps if t.stage == "architecture"]
    if not arch or any(t.stage == "training" for t, _ in steps):
        return None
    with scratch_dir("eo-preview-") as scratch:
        ctx = TechniqueContext(task=task, teacher=base_model, scratch_dir=Path(scratch), **ctx_kwargs)
        technique, params = arch[0]
        untrained = technique.architecture(technique.check_params(params), ctx)
        if untrained is None:  # this technique cannot show its architecture before training
            return None
        model = onnx.load_from_string(export_onnx(task, untrained))
        for technique, params in steps:
            if technique.stage == "graph":
                model = technique.apply(model, technique.check_params(params), ctx)
    return model.SerializeToString()


def past_points(devices: list[Any], profile: Any, percentile: str, limit: int = 300) -> list[tuple[dict[str, float], float]]:
    """(features, latency) of the models measured on these devices with this profile's settings in earlier runs.

    Read from the measurement cache, with each model's features computed from the model cache;
    a model no longer in the model cache is skipped. This is what lets the predictor of a
    device improve from run to run instead of starting from nothing.
    """
    cache, models = MeasurementCache(), cache_dir("models")
    points = []
    for device in devices:
        for sha, result in cache.for_device(device.name, settings_key(device, profile), limit):
            path = models / f"{sha}.onnx"
            latency = (result.get("latency_ms") or {}).get(percentile)
            if latency is None or not path.exists():
                continue
            try:
                points.append((onnx_features(path.read_bytes()), float(latency)))
            except Exception:  # noqa: BLE001 - a model file that no longer parses: not a point
                continue
    return points


class PredictorService:
    """Holds the run's latency predictor; a Ray actor on the driver, shared by all trials of a profile.

    `seed` holds earlier runs' measurements on the same device and settings (`past_points`).
    """

    def __init__(self, seed: list[tuple[dict[str, float], float]] | None = None) -> None:
        self.predictor = LatencyPredictor(points=list(seed or []))
        self.seeded = len(self.predictor.points)
        self.predictor._fit()

    def predict(self, features: dict[str, float]) -> float | None:
        """Predicted latency (ms) at the profile's constraint percentile, or None while learning."""
        return self.predictor.predict(features)

    def observe(self, features: dict[str, float], latency_ms: float) -> None:
        """Add a measurement; the prediction made just before it counts towards the quality figure."""
        self.predictor.add(features, latency_ms, predicted=self.predictor.predict(features))

    def quality(self) -> dict[str, Any]:
        """Share of predictions within ±10% of the measurement, and how many there were."""
        return {**self.predictor.quality(), "measurements": len(self.predictor.points) - self.seeded,
                "from_earlier_runs": self.seeded}
