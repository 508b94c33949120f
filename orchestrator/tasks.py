"""Which task a run optimises: a task plugin's, or a model brought with `--model` (or the profile's `model:`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.ownmodel import OwnModelTask
from orchestrator.plugins import PluginRegistry
from orchestrator.profile import LoadedProfile


def resolve_task(loaded: LoadedProfile, registry: PluginRegistry, task: str | None = None, model: str | None = None,
                 inputs: str | None = None) -> Any:
    """The task of a run: `--model` (or the profile's `model:`) as an OwnModelTask, else a task plugin."""
    section = loaded.profile.model
    quality, axes = (section.quality, section.axes) if section else ("auto", {})
    if model is not None:
        return OwnModelTask(model, inputs, quality, axes)
    if section is not None and section.source and task is None:
        here = loaded.path.parent

        def near(value: str) -> str:  # a path in the profile is read from the profile's folder
            path = Path(value).expanduser()
            return str(path if path.is_absolute() or not (here / path).exists() else here / path)

        return OwnModelTask(near(section.source), near(section.inputs) if section.inputs else inputs,
                            quality, axes)
    return registry.task(task or loaded.profile.task or "digits")


def refuse_torch_stages(loaded: LoadedProfile, techniques: list[Any], task: Any) -> None:
    """An ONNX base model takes graph-stage techniques only: a training/architecture one is refused up front."""
    if getattr(task, "kind", None) != "onnx":
        return
    for i, name in enumerate(loaded.profile.search.techniques):
        technique = next((t for t in techniques if t.name == name), None)
        if technique is not None and technique.stage != "graph":
            raise loaded.error(("search", "techniques", i),
                               f"{name} is a {technique.stage}-stage technique: it changes a PyTorch model, and "
                               f"{task.source} is an ONNX file (only graph-stage techniques apply to it)")


def model_options(task: Any) -> dict[str, Any]:
    """What a resumed run needs to rebuild a model brought with --model: absolute paths."""
    if not isinstance(task, OwnModelTask):
        return {}
    spec = task.spec()
    absolute = (lambda v: str(Path(v).resolve()) if v and Path(v).exists() else v)
    return {"model": absolute(spec["source"]), "inputs": absolute(spec["samples"])}
