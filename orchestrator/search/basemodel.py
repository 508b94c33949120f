"""The task's trained base model: trained on first use, then cached by content hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from orchestrator.api import Task
from orchestrator.paths import cache_dir

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

        model = task.build(self.arch)
        model.load_state_dict(torch.load(io.BytesIO(self.state_dict_bytes), weights_only=True))
        return model.eval()


def base_model_key(task: Task, seed: int) -> str:
    """Content key of what the trained weights depend on."""
    import torch

    text = json.dumps({"task": task.fingerprint(), "seed": seed, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def evaluate_torch(task: Task, model: Any, data: Any) -> float:
    """Accuracy of a torch model on a dataset."""
    import torch

    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(data.inputs[i : i + 256])) for i in range(0, len(data), 256)])
    return task.metric(logits.numpy(), data.labels)


def get_base_model(task: Task, data: dict[str, Any], seed: int) -> TrainedModel:
    """Load the cached trained model, or train it now (once) and cache it atomically."""
    import torch

    key = base_model_key(task, seed)
    folder = cache_dir("tasks")
    weights, meta_path = folder / f"{task.name}-{key}.pt", folder / f"{task.name}-{key}.json"
    if weights.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return TrainedModel(task.name, key, meta["arch"], weights.read_bytes(), meta["accuracy"], trained_now=False)
    log.info("training the %s base model (%d epochs, first use; cached afterwards)", task.name, task.train_epochs)
    torch.manual_seed(seed)
    model = task.build(task.default_arch)
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
