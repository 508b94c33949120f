"""The one training loop (`orchestrator.train_epochs`): what it steps, reports and returns."""

from __future__ import annotations

import time

import pytest
import torch

from orchestrator import TrainingRun, train_epochs
from orchestrator.api import progress_to


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    return model, x, y, torch.optim.SGD(model.parameters(), lr=0.1)


def test_it_runs_every_epoch_steps_once_per_batch_and_reports_progress():
    model, x, y, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    orders, seen, progress = [], [], []

    def batches(epoch):
        orders.append(epoch)
        return torch.arange(10).split(4)  # 4, 4, 2 rows

    def loss(idx):
        seen.append(len(idx))
        return torch.nn.functional.cross_entropy(model(x[idx]), y[idx])

    before = model.weight.detach().clone()
    with progress_to(lambda done, total: progress.append((done, total))):
        run = train_epochs(model, opt, 2, batches, loss, scheduler=sched)
    assert run == TrainingRun(passes=2, rows=20, stopped_by="epochs")
    assert orders == [0, 1] and seen == [4, 4, 2] * 2 and progress == [(1, 2), (2, 2)]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)  # the scheduler stepped per batch
    assert not torch.equal(before, model.weight)


def test_progress_false_is_quiet_and_tuples_count_their_first_items_rows():
    model, x, y, opt = _setup()
    progress = []
    with progress_to(lambda done, total: progress.append(done)):
        run = train_epochs(model, opt, 1, lambda _: [(x[:6], y[:6]), (x[6:], y[6:])],
                           lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), progress=False)
    assert run.rows == 10 and run.passes == 1 and progress == []


def test_a_deadline_stops_before_the_next_batch_and_a_cut_pass_does_not_count():
    model, x, y, opt = _setup()
    steps = []

    def loss(idx):
        steps.append(len(idx))
        if len(steps) == 3:  # the first batch of the second pass: the time is up after it
            time.sleep(max(0.0, deadline - time.perf_counter()) + 0.01)
        return torch.nn.functional.cross_entropy(model(x[idx]), y[idx])

    deadline = time.perf_counter() + 0.5
    run = train_epochs(model, opt, 5, lambda _: torch.arange(10).split(5), loss, deadline=deadline)
    assert len(steps) == 3 and run == TrainingRun(passes=1, rows=15, stopped_by="time budget")
