"""The task's trained base model: trained on first use, then cached by content hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from orchestrator.api import Task, progress_to, training_progress
from orchestrator.models.outputs import evaluate_torch
from orchestrator.state.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A trained model of a task, as bytes of its state dict plus the architecture that builds it."""

    task: str
    key: str
    arch: dict[str, Any]
    state_dict_bytes: bytes
    accuracy: float
    trained_now: bool

    def load(self, task: Task) -> Any:
        """A fresh torch module with the trained weights, in eval mode."""
        import torch

        if not self.state_dict_bytes:  # pretrained: the task builds it with its weights
            model = task.build(None)
            return model.eval() if hasattr(model, "eval") else model
        model = task.build(self.arch)
        model.load_state_dict(torch.load(io.BytesIO(self.state_dict_bytes), weights_only=True))
        return model.eval()


def base_model_key(task: Task, seed: int) -> str:
    """Content key of what the trained weights depend on."""
    import torch

    text = json.dumps({"task": task.fingerprint(), "seed": seed, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def progress_events(registry: Any, run_id: str, task: str) -> Callable[[int, int], None]:
    """The base model's training progress (the task's training_progress calls) as base_model_progress events."""
    started = time.monotonic()

    def report(done: int, total: int) -> None:
        nonlocal started
        if done == 0:  # training starts now (what came before, loading data and torch, is not training)
            started = time.monotonic()
            return
        elapsed = time.monotonic() - started
        left = elapsed / done * max(0, total - done) if done > 0 else None
        registry.notify("base_model_progress", run_id=run_id, task=task, epoch=done, epochs=total,
                        elapsed_s=round(elapsed, 1), left_s=None if left is None else round(left, 1))

    return report


def get_base_model(task: Task, data: dict[str, Any], seed: int,
                   on_progress: Callable[[int, int], None] | None = None) -> TrainedModel:
    """Load the cached trained model, or train it now (once) and cache it atomically.

    A pretrained task (`Task.pretrained`, or a model brought with `--model`) is used as it is:
    nothing is trained, and no second copy of its weights is kept (its `state_dict_bytes` are
    empty; every worker builds it from where it lives).
    """
    import torch

    if task.pretrained:
        return TrainedModel(task.name, task.fingerprint(), {}, b"", float("nan"), trained_now=False)
    key = base_model_key(task, seed)
    folder = cache_dir("tasks")
    weights, meta_path = folder / f"{task.name}-{key}.pt", folder / f"{task.name}-{key}.json"
    if weights.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return TrainedModel(task.name, key, meta["arch"], weights.read_bytes(), meta["accuracy"], trained_now=False)
    log.info("training the %s base model (%d epochs, first use; cached afterwards)", task.name, task.train_epochs)
    torch.manual_seed(seed)
    model = task.build(task.default_arch)
    with progress_to(on_progress or (lambda done, total: None)):  # the task's training_progress() calls
        training_progress(0, task.train_epochs)
        task.train(model, data["train"], epochs=task.train_epochs, seed=seed)
    accuracy = evaluate_torch(task, model.eval(), data["eval"])
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    tmp = weights.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, weights)
    tmp_meta = meta_path.with_suffix(f".tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps({"arch": task.default_arch, "accuracy": accuracy, "seed": seed}))
    os.replace(tmp_meta, meta_path)
    return TrainedModel(task.name, key, dict(task.default_arch), buf.getvalue(), accuracy, trained_now=True)
