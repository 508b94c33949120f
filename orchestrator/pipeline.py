"""Build one candidate: run its techniques stage by stage, export to ONNX, score it on held-out data."""

from __future__ import annotations

import copy
import hashlib
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

from orchestrator.api import Task, TechniqueContext
from orchestrator.errors import OrchestratorError
from orchestrator.plugins import PluginRegistry
from orchestrator.space import IncompatiblePipeline, order_pipeline

OPSET = 17


class CandidateBuildError(OrchestratorError):
    """A technique or the export failed for this candidate (the candidate fails, the run goes on)."""


def export_onnx(task: Task, model: Any) -> bytes:
    """The one place a torch model becomes ONNX (batch dimension dynamic)."""
    import io

    import torch

    model = model.eval()
    example = torch.zeros((1, *task.input_shape), dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but 20x faster than the dynamo one for these
        # small CNNs and gives the plain Conv graphs that onnxruntime quantization expects.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buf, dynamo=False, opset_version=OPSET,
            input_names=[task.input_name], output_names=["logits"],
            dynamic_axes={task.input_name: {0: "batch"}, "logits": {0: "batch"}},
        )
    return buf.getvalue()


def evaluate_onnx(task: Task, model_bytes: bytes, data: Any, batch: int = 64) -> float:
    """Accuracy of an ONNX model on a dataset, with onnxruntime on this host."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = [session.run(None, {name: data.inputs[i : i + batch]})[0] for i in range(0, len(data), batch)]
    return task.metric(np.concatenate(logits), data.labels)


def build_candidate(
    registry: PluginRegistry,
    task: Task,
    base_model: Any,
    pipeline: list[dict[str, Any]],
    ctx_kwargs: dict[str, Any],
) -> tuple[bytes, dict[str, Any]]:
    """Apply the pipeline to a copy of the base model; returns (ONNX bytes, build info).

    Build info: `sha256`; `build_seconds`, seconds per step (a technique's entry includes its
    fine-tuning, which is also shown alone as `<technique>.fine_tune`); and
    `compressed_size_bytes`, the zlib size of the ONNX bytes: what a model zeroed by
    unstructured pruning gains on disk and over the network, which the raw size hides.
    """
    import onnx

    try:
        ordered = order_pipeline([registry.technique(s["technique"]) for s in pipeline])
    except IncompatiblePipeline as exc:
        raise CandidateBuildError(str(exc)) from exc
    by_name = {s["technique"]: s for s in pipeline}
    steps = [by_name[t.name] for t in ordered]
    timings: dict[str, float] = {}
    model = copy.deepcopy(base_model)
    with tempfile.TemporaryDirectory(prefix="eo-candidate-") as scratch:
        ctx = TechniqueContext(task=task, teacher=base_model, scratch_dir=Path(scratch), **ctx_kwargs)
        exported: bytes | None = None
        for step in steps:
            technique = registry.technique(step["technique"])
            params = technique.check_params(step["params"])
            if technique.stage == "graph" and exported is None:
                exported = _timed(timings, "export", lambda: export_onnx(task, model))
                model = onnx.load_from_string(exported)
            tuned_before = ctx.fine_tune_seconds
            try:
                model = _timed(timings, technique.name, lambda: technique.apply(model, params, ctx))
            except Exception as exc:
                raise CandidateBuildError(f"{technique.name}: {type(exc).__name__}: {exc}") from exc
            if ctx.fine_tune_seconds > tuned_before:
                timings[f"{technique.name}.fine_tune"] = round(ctx.fine_tune_seconds - tuned_before, 3)
        if exported is None:
            onnx_bytes = _timed(timings, "export", lambda: export_onnx(task, model))
        else:
            onnx_bytes = model.SerializeToString()
    info = {
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "build_seconds": timings,
        "compressed_size_bytes": compressed_size(onnx_bytes),
    }
    return onnx_bytes, info


def compressed_size(model_bytes: bytes) -> int:
    """Bytes of the model after zlib (level 9): zeroed weights compress, dense ones barely do."""
    return len(zlib.compress(model_bytes, 9))


def _timed(timings: dict[str, float], key: str, fn: Any) -> Any:
    start = time.perf_counter()
    try:
        return fn()
    finally:
        timings[key] = round(time.perf_counter() - start, 3)
