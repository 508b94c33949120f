"""Which task a run optimises: a task plugin's, or a model brought with `--model` (or the profile's `model:`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from orchestrator.ownmodel import OwnModelTask
from orchestrator.plugins import PluginRegistry
from orchestrator.profile import LoadedProfile
from orchestrator.search.space import configured_technique

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


def refuse_torch_stages(loaded: LoadedProfile, techniques: list[Any], task: Any) -> list[Any]:
    """An ONNX base model takes training-stage techniques on its torch form where onnx2torch converts it
    and the conversion agrees with the file on the samples (`OwnModelTask.not_trainable`). Where it does
    not, the run goes on with graph-stage techniques only: the others are left out of `techniques` (in
    place; the list is also returned) with one warning line saying why, and a profile with no graph-stage
    technique left is refused with that line."""
    if getattr(task, "kind", None) != "onnx":
        return techniques
    torch_stage = [t for t in techniques if t.stage != "graph"]
    if not torch_stage:
        return techniques
    why = task.not_trainable()
    if not why:
        return techniques
    names = ", ".join(t.name for t in torch_stage)
    if len(torch_stage) == len(techniques):
        i = loaded.profile.search.techniques.index(torch_stage[0].name)
        raise loaded.error(("search", "techniques", i),
                           f"{names} change a PyTorch model, and {task.source} has none: {why}; only graph-stage "
                           "techniques apply to it")
    log.warning("%s left out: %s has no PyTorch form (%s); graph-stage techniques only", names, task.source, why)
    techniques[:] = [t for t in techniques if t.stage == "graph"]
    return techniques


def fit_to_labels(loaded: LoadedProfile, techniques: list[Any], task: Any) -> list[Any]:
    """The techniques, with the parameter values that need labels (`Technique.needs_labels`) left out of
    the search when the task's samples have none; a profile that fixes such a value gets one line."""
    if getattr(task, "quality_metric", "accuracy") in ("accuracy", "labels"):
        return techniques
    fitted = []
    for technique in techniques:
        overrides: dict[str, Any] = {}
        for param, needing in (getattr(technique, "needs_labels", None) or {}).items():
            domain = technique.search_space.get(param)
            if domain is None:
                continue
            kept = [v for v in domain.values if v not in needing]
            if not kept:
                raise loaded.error(("search", "params", technique.name, param),
                                   f"{'/'.join(map(str, needing))} needs labelled samples (a loss to rank by) and "
                                   f"{task.source}'s samples have none: add `labels` to --inputs or choose another "
                                   f"{param}")
            if len(kept) < len(domain.values):
                overrides[param] = kept
        fitted.append(configured_technique(technique, overrides) if overrides else technique)
    return fitted


def model_options(task: Any) -> dict[str, Any]:
    """What a resumed run needs to rebuild the run's task (`Task.resume_options`)."""
    return task.resume_options()
