"""Build one candidate: run its techniques stage by stage, export to ONNX, score it on held-out data.
"""

from __future__ import annotations

import copy
import hashlib
import io
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

from orchestrator.api import Task, TechniqueContext
from orchestrator.errors import OrchestratorError
from orchestrator.hooks.manager import PluginRegistry
from orchestrator.models.outputs import onnx_outputs
from orchestrator.search.cache import StageCache
from orchestrator.search.space import IncompatiblePipeline, order_pipeline
from orchestrator.state.paths import scratch_dir

OPSET = 17


class CandidateBuildError(OrchestratorError):
    """A technique or the export failed for this candidate (the candidate fails, the run goes on)."""


def example_feeds(task: Task, data: Any = None) -> dict[str, Any]:
    """One batch-1 sample per input: the first row of `data` (real ids stay in range), else zeros of the specs."""
    import numpy as np

    if data is not None and len(data):
        return task.feeds(data.rows(0, 1))
    return {spec.name: np.zeros([1 if isinstance(d, str) else d for d in spec.shape], dtype=spec.dtype)
            for spec in task.input_specs()}


def export_onnx(task: Task, model: Any, data: Any = None) -> bytes:
    """The one place a torch model becomes ONNX: the task's named inputs and outputs, their dynamic axes kept.

    The trace runs on a real sample of `data` when given (integer ids must be valid indices).
    """
    import torch

    model = model.eval()
    inputs, outputs = task.input_specs(), task.output_specs()
    feeds = example_feeds(task, data)
    example = tuple(torch.from_numpy(feeds[spec.name]) for spec in inputs)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but 20x faster than the dynamo one for these
        # small CNNs and gives the plain Conv graphs that onnxruntime quantization expects.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, example, buf, dynamo=False, opset_version=OPSET,
            input_names=[spec.name for spec in inputs], output_names=[spec.name for spec in outputs],
            dynamic_axes={spec.name: spec.dynamic_axes() for spec in (*inputs, *outputs) if spec.dynamic_axes()},
        )
    return buf.getvalue()



def evaluate_onnx(task: Task, model_bytes: bytes, data: Any, batch: int = 64) -> float:
    """The task's quality (`Task.score`) of an ONNX model on a dataset, with onnxruntime on this host."""
    return task.score(onnx_outputs(model_bytes, task, data, batch), data.labels)


def build_candidate(
    registry: PluginRegistry,
    task: Task,
    base_model: Any,
    pipeline: list[dict[str, Any]],
    ctx_kwargs: dict[str, Any],
    cache: Any = None,
    root_key: str | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Apply the pipeline to a copy of the base model; returns (ONNX bytes, build info).

    Build info: `sha256`; `build_seconds`, seconds per step (a technique's entry includes its
    fine-tuning, which is also shown alone as `<technique>.fine_tune`); `compressed_size_bytes`,
    the zlib size of the ONNX bytes: what a model zeroed by unstructured pruning gains on disk
    and over the network, which the raw size hides; and `cached_steps`, the steps whose output
    came from `cache` (an `orchestrator.search.cache.StageCache`, keyed from `root_key`, the key of the
    base model) instead of being built now. Their `build_seconds` are those of the build that
    made them. `training` (a model brought with `--model` only): {technique: [what each fine-tuning
    used: rows, seconds, passes, the data, why it stopped]} (orchestrator/models/owntrain.py).
    """
    import onnx


    try:
        ordered = order_pipeline([registry.technique(s["technique"]) for s in pipeline])
    except IncompatiblePipeline as exc:
        raise CandidateBuildError(str(exc)) from exc
    by_name = {s["technique"]: s for s in pipeline}
    # The actions in order: (name, key of the output after it, technique or None for the export, params).
    actions: list[tuple[str, str, Any, dict[str, Any]]] = []
    parent = root_key or ""
    for technique in ordered:
        params = technique.check_params(by_name[technique.name]["params"])
        if technique.stage == "graph" and not any(a[0] == "export" for a in actions):
            parent = StageCache.step_key(parent, "export", str(OPSET), {})
            actions.append(("export", parent, None, {}))
        parent = StageCache.step_key(parent, technique.name, technique.version, params)
        actions.append((technique.name, parent, technique, params))
    if not any(a[0] == "export" for a in actions):
        parent = StageCache.step_key(parent, "export", str(OPSET), {})
        actions.append(("export", parent, None, {}))

    use_cache = cache is not None and root_key is not None
    timings: dict[str, float] = {}
    training: dict[str, list[dict[str, Any]]] = {}  # what each technique's fine-tuning used, where the task says
    model, done = None, 0
    if use_cache:
        for i in range(len(actions) - 1, -1, -1):
            hit = cache.get(actions[i][1])
            if hit is not None:
                model, meta = hit
                timings.update(meta.get("timings", {}))
                training.update(meta.get("training", {}))
                done = i + 1
                break
    if model is None:
        model = copy.deepcopy(base_model)
    with scratch_dir("eo-candidate-") as scratch:
        ctx = TechniqueContext(task=task, teacher=base_model, scratch_dir=Path(scratch), **ctx_kwargs)
        for position, (name, key, technique, params) in enumerate(actions[done:], start=done):
            if technique is None:
                if not is_onnx(model):  # an ONNX base model (`--model file.onnx`) is its own export
                    model = _timed(timings, "export", lambda: export_onnx(task, model, ctx.data.get("calibration")))
            else:
                if technique.stage != "graph" and is_onnx(model):
                    # a brought ONNX file (`--model file.onnx`) has a checked torch form where it converts
                    if not hasattr(task, "torch_form"):
                        raise CandidateBuildError(f"{name}: a {technique.stage}-stage technique needs a PyTorch "
                                                  "model; the base model is an ONNX graph")
                    try:
                        model = task.torch_form()
                    except Exception as exc:
                        raise CandidateBuildError(f"{name}: {exc}") from exc
                if technique.stage == "graph" and isinstance(model, (bytes, bytearray)):
                    model = onnx.load_from_string(model)
                tuned_before = ctx.fine_tune_seconds
                trained_before = len(getattr(task, "training_log", ()))
                try:
                    model = _timed(timings, name, lambda: technique.apply(model, params, ctx))
                except Exception as exc:
                    raise CandidateBuildError(f"{name}: {type(exc).__name__}: {exc}") from exc
                if ctx.fine_tune_seconds > tuned_before:
                    timings[f"{name}.fine_tune"] = round(ctx.fine_tune_seconds - tuned_before, 3)
                for record in getattr(task, "training_log", [])[trained_before:]:  # a brought model's (owntrain.py)
                    training.setdefault(name, []).append(record)
            if use_cache:
                cache.put(key, model, {"timings": dict(timings), "training": dict(training),
                                       "steps": [a[0] for a in actions[: position + 1]]})
    onnx_bytes = as_onnx_bytes(model)
    info = {
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "build_seconds": timings,
        "compressed_size_bytes": compressed_size(onnx_bytes),
        "cached_steps": [a[0] for a in actions[:done]],
        **({"training": training} if training else {}),
    }
    return bytes(onnx_bytes), info


def as_onnx_bytes(model: Any) -> bytes:
    """ONNX bytes of ONNX bytes or an onnx.ModelProto."""
    return bytes(model) if isinstance(model, (bytes, bytearray)) else model.SerializeToString()


def is_onnx(model: Any) -> bool:
    """ONNX bytes or an onnx.ModelProto (not a torch module)."""
    return isinstance(model, (bytes, bytearray)) or hasattr(model, "SerializeToString")


def compressed_size(model_bytes: bytes) -> int:
    """Bytes of the model after zlib (level 9): zeroed weights compress, dense ones barely do."""
    return len(zlib.compress(model_bytes, 9))


def _timed(timings: dict[str, float], key: str, fn: Any) -> Any:
    start = time.perf_counter()
    try:
        return fn()
    finally:
        timings[key] = round(time.perf_counter() - start, 3)
