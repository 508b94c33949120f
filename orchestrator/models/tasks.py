"""Which task a run optimises: a task plugin's, or a model brought with `--model` (or the profile's `model:`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from orchestrator.config.profile import LoadedProfile
from orchestrator.hooks.manager import PluginRegistry
from orchestrator.models.ownmodel import OwnModelTask

log = logging.getLogger(__name__)


def resolve_task(loaded: LoadedProfile, registry: PluginRegistry, task: str | None = None, model: str | None = None,
                 inputs: str | None = None, train: str | None = None) -> Any:
    """The task of a run: `--model` (or the profile's `model:`) as an OwnModelTask, else a task plugin.
    `train` (`--train`, else the profile's `model.train`): the training set fine-tuning distils on."""
    section = loaded.profile.model
    quality, axes = (section.quality, section.axes) if section else ("auto", {})
    detection = section.detection.model_dump() if section else None
    budget = loaded.profile.search.train_time_budget_s
    here = loaded.path.parent

    def near(value: str) -> str:  # a path in the profile is read from the profile's folder
        path = Path(value).expanduser()
        return str(path if path.is_absolute() or not (here / path).exists() else here / path)

    train = train or (near(section.train) if section is not None and section.train else None)
    if model is not None:
        return OwnModelTask(model, inputs, quality, axes, detection=detection, train=train, train_time_budget_s=budget)
    if section is not None and section.source and task is None:
        return OwnModelTask(near(section.source), near(section.inputs) if section.inputs else inputs,
                            quality, axes, detection=detection, train=train, train_time_budget_s=budget)
    return registry.task(task or loaded.profile.task or "digits")


def model_options(task: Any) -> dict[str, Any]:
    """What a resumed run needs to rebuild the run's task (`Task.resume_options`)."""
    return task.resume_options()
