"""Fine-tuning a model brought with `--model` (a PyTorch factory, a Hugging Face folder, a converted ONNX file).

A technique that fine-tunes (prune-structured's and prune-magnitude's `epochs`, drop-layers)
calls `Task.train`. A brought model has no training loop of its own, so it gets this one:

- with a training set (`--train PATH`, the profile's `model.train`; `orchestrator/models/trainset.py`):
  label-free distillation on it. The teacher (the technique's, else the fp32 model) runs on each
  batch, augmented (image-like inputs only: small shifts and brightness) and read from the set
  only then, and its outputs are the targets. The held-out rows of `--inputs` are never trained
  on (the task refuses a training set that holds any of them);
- else, samples with `labels`: cross-entropy on them (with a teacher, the distillation loss);
- else label-free distillation on the calibration rows of `--inputs`, toward the fp32 model's
  outputs on them, the same outputs its quality is then measured against on the held-out rows.

Label-free, the loss is the mean squared error on every output, each divided by the teacher's
variance on the first rows so no output dominates; an output that is a probability distribution
over its last axis (a softmax: non-negative, each row summing to 1) is matched by the KL divergence
instead, whose gradient does not vanish where the student is confidently wrong (the MSE's does);
an output of probabilities (every value in [0, 1]: a sigmoid's, a text detector's map) by the
binary cross-entropy, for the same reason.
Adam from LEARNING_RATE (a tenth of it for a network with layer normalisation, a transformer) down a
half cosine to 0 over the training's length, the order fixed by `seed`, the model in eval mode
throughout (batch-norm statistics and dropout as they came). Training stops after `epochs` passes or once
`time_budget_s` (the profile's `search.train_time_budget_s`) is spent, whichever comes first; what
it used (rows, seconds, passes, why it stopped) is returned as a record the task keeps and the
candidate's build info lists under `training`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from orchestrator.api import Dataset, distillation_loss
from orchestrator.models.agreement import is_distribution
from orchestrator.models.outputs import torch_outputs
from orchestrator.models.training import train_epochs

#: Adam's learning rate at the start, by kind of network; it decays to 0 along a half cosine over the training's
#: length (the epochs asked, or the time budget when that ends it first). Measured (240-300 s, 1 thread):
#: RapidOCR's classifier with half its channels pruned, 1,024 text crops, 24 held-out crops (one is 4 points):
#: top-1 agreement 0.54 at a constant 1e-4, 0.92 at a constant 1e-3, 1.00 at 1e-3 decayed (on 100 held-out
#: crops, 4,096 training crops: 0.95-0.97); all-MiniLM-L6-v2 with a quarter of its heads and feed-forward
#: pruned: cosine 0.80 at 1e-3 decayed, 0.93 at 1e-4, so a transformer keeps 1e-4.
LEARNING_RATE = 1e-3
#: ... for a network with layer normalisation (a transformer).
LEARNING_RATE_LAYER_NORM = 1e-4
BATCH = 8
#: Batches of a training set (`--train`): larger, it is many rows.
TRAIN_SET_BATCH = 16
#: Rows of the training set the teacher's output variances (the loss's scales) are taken on.
SCALE_ROWS = 64


def _as_list(out: Any) -> list[Any]:
    import torch

    return [out] if isinstance(out, torch.Tensor) else list(out)


def _kind(t: Any) -> str:
    """What a teacher output is: "distribution" (a softmax's: non-negative, each row over the last axis summing to 1),
    "probability" (a sigmoid's: every value in [0, 1], a text detector's map, say) or "value"."""
    values = t.detach().float().numpy()
    if is_distribution(values):
        return "distribution"
    return "probability" if bool((values >= 0).all()) and bool((values <= 1).all()) else "value"


def _label_free(out: Any, target: Any, scale: float, kind: str) -> Any:
    """One output's label-free loss: the KL divergence for a distribution, the binary cross-entropy for
    probabilities (their gradient at the logits is student - teacher, which saturation does not flatten),
    else the MSE over the teacher's variance."""
    import torch.nn.functional as F

    if kind == "distribution":
        return F.kl_div((out.float() + 1e-12).log().flatten(0, -2), target.float().flatten(0, -2),
                        reduction="batchmean")
    if kind == "probability":  # squeezed into (eps, 1 - eps) by an affine map: the gradient still passes
        return F.binary_cross_entropy(out.float() * (1 - 2e-6) + 1e-6, target.float())
    return F.mse_loss(out.float(), target.float()) / scale


def _decay(step: int, steps: int, start: float, time_budget_s: float | None) -> float:
    """The learning rate's factor: a half cosine from 1 to 0 over the training's length, the epochs' `steps` or
    the time budget, whichever is further along."""
    done = step / max(steps, 1)
    if time_budget_s:
        done = max(done, (time.perf_counter() - start) / time_budget_s)
    return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def train_set_of(task: Any) -> Any:
    """The task's training set (`task.train_path`, `--train`), opened once (lazily: orchestrator/models/trainset.py)."""
    if getattr(task, "_train_set", None) is None:
        from orchestrator.models.trainset import TrainSet

        task._train_set = TrainSet(task.train_path)
    return task._train_set


def fine_tune(task: Any, model: Any, reference: Any, data: Dataset, epochs: int, seed: int, teacher: Any = None,
              temperature: float = 4.0, alpha: float = 0.5) -> Any:
    """`fit` with the task's training set (`train_path`) and time budget (`train_time_budget_s`); the record of
    what it used is appended to `task.training_log`. Returns the model in eval mode."""
    train_set = train_set_of(task) if getattr(task, "train_path", None) else None
    model, record = fit(task, model, reference, data, epochs, seed, teacher, temperature, alpha, train_set,
                        getattr(task, "train_time_budget_s", None))
    task.training_log.append(record)
    return model


def fit(task: Any, model: Any, reference: Any, data: Dataset, epochs: int, seed: int, teacher: Any = None,
        temperature: float = 4.0, alpha: float = 0.5, train_set: Any = None,
        time_budget_s: float | None = None) -> tuple[Any, dict[str, Any]]:
    """Train `model` for `epochs` (at most `time_budget_s` seconds) on `train_set` when given (label-free,
    toward `teacher` or `reference`), else on `data` (labels, or `reference`'s outputs when it has none);
    returns (the model in eval mode, what training used)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    names = [spec.name for spec in task.input_specs()]
    start = time.perf_counter()
    layer_norm = any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    lr = LEARNING_RATE_LAYER_NORM if layer_norm else LEARNING_RATE
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = np.random.default_rng(seed)
    # In eval mode: a few hundred rows in batches of 8 would only corrupt the batch-norm statistics
    # the pretrained model came with, and dropout would make it chase a noisy copy of its teacher.
    model.eval()

    if train_set is not None:
        from orchestrator.models.trainset import augment

        target_model = teacher if teacher is not None else reference
        n = len(train_set)
        first = train_set.batch(np.arange(min(n, SCALE_ROWS)), names)
        with torch.no_grad():
            probe = _as_list(target_model(*(torch.from_numpy(first[k]) for k in names)))
        scales = [max(float(t.float().var()), 1e-12) for t in probe]
        kinds = [_kind(t) for t in probe]
        size = TRAIN_SET_BATCH

        def loss(rows: np.ndarray) -> Any:
            feeds = augment(train_set.batch(rows, names), order)
            x = [torch.from_numpy(feeds[k]) for k in names]
            with torch.no_grad():
                targets = _as_list(target_model(*x))
            out = _as_list(model(*x))
            return sum(_label_free(o, t, s, d) for o, t, s, d in zip(out, targets, scales, kinds))

        record = {"data": f"--train {train_set.path} ({train_set.how})", "set_rows": n}
    else:
        n = len(data)
        feeds = task.feeds(data.rows(0, n))
        inputs = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in names]
        labelled = data.labels is not None
        if labelled:
            labels = torch.from_numpy(np.asarray(data.labels)).long()
            soft = torch.from_numpy(torch_outputs(task, teacher, data, batch=16)[0]) if teacher is not None else None
        else:
            targets = [torch.from_numpy(np.asarray(t, dtype=np.float32))
                       for t in torch_outputs(task, teacher if teacher is not None else reference, data, batch=16)]
            scales = [max(float(t.var()), 1e-12) for t in targets]
            kinds = [_kind(t) for t in targets]
        size = BATCH

        def loss(rows: np.ndarray) -> Any:
            idx = torch.from_numpy(rows)
            out = _as_list(model(*(x[idx] for x in inputs)))
            if labelled and soft is not None:
                return distillation_loss(out[0], soft[idx], labels[idx], temperature, alpha)
            if labelled:
                return F.cross_entropy(out[0], labels[idx])
            return sum(_label_free(o, t[idx], s, d) for o, t, s, d in zip(out, targets, scales, kinds))

        record = {"data": "the calibration rows of --inputs" + (" (labels)" if labelled else " (label-free)"),
                  "set_rows": n}

    def batches(_: int) -> list[np.ndarray]:
        shuffled = order.permutation(n)
        return [shuffled[begin:begin + size] for begin in range(0, n, size)]

    steps = epochs * -(-n // size)
    begun = time.perf_counter()  # the budget is the optimizer's: the targets and scales above are set-up
    deadline = begun + time_budget_s if time_budget_s else None
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _decay(step, steps, begun, time_budget_s))
    run = train_epochs(model, optimizer, epochs, batches, loss, deadline=deadline, scheduler=schedule, progress=False)
    record.update(rows=run.rows, epochs_done=run.passes, epochs_asked=epochs,
                  seconds=round(time.perf_counter() - start, 3), time_budget_s=time_budget_s, stopped_by=run.stopped_by,
                  learning_rate=lr)
    return model.eval(), record
