"""Fine-tuning a model brought with `--model` (a PyTorch factory or a Hugging Face folder).

A technique that fine-tunes (prune-structured's and prune-magnitude's `epochs`) calls
`Task.train`. A brought model has no training loop of its own, so it gets the plain one:

- samples with `labels`: cross-entropy on them (with a teacher, the distillation loss);
- without: label-free distillation. The changed model is trained to reproduce the fp32 model's
  outputs on the calibration rows (mean squared error on every output, each divided by the
  reference's variance so no output dominates), the same outputs its quality is then measured
  against on the held-out rows.

Adam at a learning rate gentle enough for pretrained weights, batches of 8, the order fixed by
`seed`, the model in eval mode throughout (batch-norm statistics and dropout as they came).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.api import Dataset, distillation_loss
from orchestrator.search.basemodel import torch_outputs

LEARNING_RATE = 1e-4
BATCH = 8


def fine_tune(task: Any, model: Any, reference: Any, data: Dataset, epochs: int, seed: int, teacher: Any = None,
              temperature: float = 4.0, alpha: float = 0.5) -> Any:
    """Train `model` for `epochs` on `data` (labels, or `reference`'s outputs when it has none); returns it in eval mode."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    names = [spec.name for spec in task.input_specs()]
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
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    order = np.random.default_rng(seed)
    # In eval mode: a few hundred rows in batches of 8 would only corrupt the batch-norm statistics
    # the pretrained model came with, and dropout would make it chase a noisy copy of its teacher.
    model.eval()
    for _ in range(epochs):
        shuffled = order.permutation(n)
        for start in range(0, n, BATCH):
            idx = torch.from_numpy(shuffled[start:start + BATCH])
            out = model(*(x[idx] for x in inputs))
            out = [out] if isinstance(out, torch.Tensor) else list(out)
            if labelled and soft is not None:
                loss = distillation_loss(out[0], soft[idx], labels[idx], temperature, alpha)
            elif labelled:
                loss = F.cross_entropy(out[0], labels[idx])
            else:
                loss = sum(F.mse_loss(o.float(), t[idx]) / s for o, t, s in zip(out, targets, scales))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
