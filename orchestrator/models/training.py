"""The one training loop: the built-in tasks, the plugin-test fixtures and a brought model's fine-tuning share it.

`train_epochs` runs the epochs and steps the optimizer (and the schedule); the caller says what
a batch is and what its loss is, so each keeps its own optimizer, schedule, augmentation and
seeds. It neither seeds nor switches the model between train and eval mode: the caller does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from orchestrator.api import training_progress


@dataclass(frozen=True)
class TrainingRun:
    """What `train_epochs` did: whole passes over the data, rows trained on, and why it stopped
    (`"epochs"`: every epoch ran; `"time budget"`: the deadline came first)."""

    passes: int
    rows: int
    stopped_by: str


def batch_rows(batch: Any) -> int:
    """The rows of one batch: `len(batch)`, or of its first item when it is a tuple (e.g. `(inputs, labels)`)."""
    return len(batch[0]) if isinstance(batch, tuple) else len(batch)


def train_epochs(model: Any, optimizer: Any, epochs: int, batches: Callable[[int], Iterable[Any]],
                 loss: Callable[[Any], Any], *, deadline: float | None = None, scheduler: Any = None,
                 progress: bool = True) -> TrainingRun:
    """Train `model` for `epochs` passes; returns a `TrainingRun` (passes, rows, stopped_by).

    Each epoch calls `batches(epoch)` once (draw the epoch's order there) and, for each batch it
    yields, `loss(batch)` (a torch scalar; augment and run a teacher there), then
    `optimizer.zero_grad()`, `loss.backward()`, `optimizer.step()` and `scheduler.step()` when a
    scheduler is given (a per-step schedule such as OneCycleLR). After each whole epoch it calls
    `training_progress(epoch, epochs)` unless `progress` is False. With a `deadline` (a
    `time.perf_counter()` value) it checks the clock before each batch and stops there once it has
    passed; a pass cut short is not counted. Rows are counted with `batch_rows`. The model's mode
    (train or eval) and the seeds are the caller's: set them before.
    """
    passes, rows = 0, 0
    for epoch in range(epochs):
        for batch in batches(epoch):
            if deadline is not None and time.perf_counter() >= deadline:
                return TrainingRun(passes, rows, "time budget")
            value = loss(batch)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            rows += batch_rows(batch)
        passes += 1
        if progress:
            training_progress(epoch + 1, epochs)
    return TrainingRun(passes, rows, "epochs")
