"""The techniques a run searches, fitted to its task: training-stage techniques left out for an ONNX
file with no PyTorch form, and parameter values that need labels left out for unlabeled samples.
"""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.config.profile import LoadedProfile
from orchestrator.search.space import configured_technique

log = logging.getLogger(__name__)


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
