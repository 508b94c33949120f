"""distill: a smaller student of the task's family, trained from the teacher; the Task's scaled_arch knob."""

from __future__ import annotations

import re

import pytest
import torch

from orchestrator import Task
from orchestrator.errors import TechniqueParamsError
from orchestrator.hooks.manager import get_plugin_manager
from plugins.digits import DigitsTask
from tests.helpers.techniques import check_contract, params_count, tiny_context


class SmallDigits(DigitsTask):
    """The digits family with a small default, so a test's teacher and student train in a blink."""

    default_arch = {"widths": [8, 16, 16], "depths": [2, 2, 2], "kernel": 3}


@pytest.fixture(scope="module")
def distill():
    return get_plugin_manager().technique("distill")


def test_distill_trains_a_smaller_student_and_keeps_the_contract(distill, tmp_path):
    task = SmallDigits()
    torch.manual_seed(0)
    teacher = task.build().eval()
    ctx = tiny_context(tmp_path, teacher, samples=16)
    ctx.task = task
    params = distill.check_params({"width": 0.5, "depth": 1, "epochs": 6})
    student = distill.apply(teacher, params, ctx)
    assert params_count(student) < params_count(teacher) / 4
    assert [b.conv2.out_channels for b in student.layers] == [4, 8, 8]  # 0.5x width, 1 block per stage
    assert ctx.fine_tune_seconds > 0 and not student.training
    check_contract(task, student, ctx.data["eval"].inputs[:5])


def test_distill_refuses_a_student_that_is_not_smaller(distill, tmp_path):
    torch.manual_seed(0)
    teacher = DigitsTask().build({"widths": [4, 8, 8], "depths": [1, 1, 1], "kernel": 3})
    ctx = tiny_context(tmp_path, teacher)  # the default digits family: its half-width student is bigger
    with pytest.raises(ValueError, match="not fewer than the teacher's"):
        distill.apply(teacher, distill.check_params({"width": 0.5, "depth": 1}), ctx)


def test_digits_scaled_arch():
    task = DigitsTask()
    assert task.scaled_arch() == task.default_arch
    assert task.scaled_arch(0.5, 1) == {"widths": [8, 16, 32], "depths": [1, 1, 1], "kernel": 3}
    assert task.scaled_arch(0.75, 2) == {"widths": [12, 24, 48], "depths": [2, 2, 2], "kernel": 3}
    assert task.scaled_arch(0.1)["widths"] == [4, 4, 8]  # never below 4 channels, multiples of 4
    with pytest.raises(ValueError, match="depth must be an integer"):
        task.scaled_arch(0.5, 0)


def test_a_task_without_a_scalable_family_says_so():
    class Plain(Task):
        name = "plain"

    with pytest.raises(NotImplementedError, match=r"task 'plain' does not say how to scale its model"):
        Plain().scaled_arch(0.5, 1)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"width": 1.5}, "width=1.5 is not one of [0.5, 0.75]"),
        ({"temperature": 0}, "temperature=0 is not one of [2.0, 4.0]"),
        ({"alpha": 2}, "alpha=2 is not one of [0.5, 0.9]"),
        ({"epochs": 0}, "epochs=0 is not one of [6, 10]"),
        ({"recalibrate_bn": "no"}, "recalibrate_bn must be true or false, got 'no'"),
        ({"student": "tiny"}, "unknown parameter(s) student"),
    ],
)
def test_distill_refuses_bad_params(distill, params, message):
    with pytest.raises(TechniqueParamsError, match="technique 'distill': " + re.escape(message)):
        distill.check_params(params)


def test_distill_search_space_size(distill):
    assert len(distill.param_grid()) == 2 * 2 * 2 * 2 * 2
