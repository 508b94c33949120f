"""A model's outputs on a dataset: a torch module's, or an ONNX model's with onnxruntime here.

What scoring (`Task.score`), the agreement of a candidate with fp32, and label-free
distillation all read.
"""

from __future__ import annotations

from typing import Any

from agents.kernel import run_as_configured
from orchestrator.api import Task


def torch_outputs(task: Task, model: Any, data: Any, batch: int = 256) -> list[Any]:
    """Every output of a torch model on a dataset (numpy, one array per output), inputs in the task's order."""
    import numpy as np
    import torch

    names = [spec.name for spec in task.input_specs()]
    parts: list[list[Any]] = []
    with torch.no_grad():
        for start in range(0, len(data), batch):
            feeds = task.feeds(data.rows(start, start + batch))
            result = model(*(torch.from_numpy(feeds[n]) for n in names))
            result = [result] if isinstance(result, torch.Tensor) else list(result)
            parts = parts or [[] for _ in result]
            for i, tensor in enumerate(result):
                parts[i].append(tensor.numpy())
    return [np.concatenate(p) for p in parts]


def evaluate_torch(task: Task, model: Any, data: Any) -> float:
    """The task's quality (`Task.score`) of a torch model on a dataset."""
    return task.score(torch_outputs(task, model, data), data.labels)


def onnx_outputs(model_bytes: bytes, task: Task, data: Any, batch: int = 64) -> list[Any]:
    """Every output of an ONNX model on a dataset (one array per output, rows in order), with onnxruntime here."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    run = run_as_configured(session)  # denormals flushed where the model asks: scored as the device runs it
    wanted = [i.name for i in session.get_inputs()]
    parts: list[list[Any]] = []
    for start in range(0, len(data), batch):
        feeds = task.feeds(data.rows(start, start + batch))
        missing = [n for n in wanted if n not in feeds]
        if missing:
            raise ValueError(f"the model wants input(s) {', '.join(missing)}; the data has {', '.join(feeds)}")
        result = run(None, {n: feeds[n] for n in wanted})
        parts = parts or [[] for _ in result]
        for i, array in enumerate(result):
            parts[i].append(array)
    return [np.concatenate(p) for p in parts]
