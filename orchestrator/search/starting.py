"""Known-good starting points: what the search evaluates before its sampler explores.

In order: the baseline; each allowed graph-stage technique alone at each of its
recommendations for the device (cheap: seconds each); each architecture/training technique
alone at its first recommendation; then the canonical combinations, every such model-changing
recommendation followed by each graph-stage recommendation (structured pruning + int8,
distillation + int8); then every graph-stage recommendation followed by another technique's
(int8 + session settings, fusion + int8), where the space allows the pair. Combinations reuse
the trained prefix from the stage cache, so they cost a quantization each. The sampler
(Optuna's TPE) is then told all of them, through its own warm start (`points_to_evaluate` ->
`Study.enqueue_trial`), and explores from there, every other proposal being a one-parameter
neighbour of a feasible starting point (orchestrator/search/refine.py).

Only points inside the profile's space are used; a recommendation outside it is skipped. A
parameter the profile fixes (`search.params`: its search space is one value) overrides what a
recommendation says of it, so the recommendation still counts, at the profile's value.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.api import DeviceFacts, Technique
from orchestrator.errors import TechniqueParamsError
from orchestrator.search.space import PipelineSpec


def _key(pipeline: PipelineSpec) -> str:
    return json.dumps(pipeline, sort_keys=True)


def _steps(technique: Technique, device: DeviceFacts) -> list[dict[str, Any]]:
    """The technique's recommendations as full pipeline steps (parameters filled and checked)."""
    steps = []
    try:
        recommendations = technique.recommended(device) or []
    except Exception:  # noqa: BLE001 - a plugin's bad advice must not stop the search; it explores without it
        return []
    fixed = {k: d.values[0] for k, d in technique.search_space.items() if len(d.values) == 1}
    for params in recommendations:
        try:
            steps.append({"technique": technique.name, "params": technique.check_params({**params, **fixed})})
        except TechniqueParamsError:
            continue
    return steps


def starting_points(techniques: list[Technique], space: list[PipelineSpec], device: DeviceFacts,
                    max_pipeline_length: int) -> list[PipelineSpec]:
    """The pipelines to evaluate first, in order, each one inside `space` and none twice."""
    inside = {_key(c) for c in space}
    graph = [s for t in techniques if t.stage == "graph" for s in _steps(t, device)]
    model = [s for t in techniques if t.stage != "graph" for s in _steps(t, device)[:1]]
    points: list[PipelineSpec] = [[]]
    points += [[s] for s in graph]
    points += [[s] for s in model]
    if max_pipeline_length >= 2:
        points += [[m, g] for m in model for g in graph]
        points += [[a, b] for a in graph for b in graph if a["technique"] != b["technique"]]
    out, seen = [], set()
    for pipeline in points:
        key = _key(pipeline)
        if key in inside and key not in seen:
            seen.add(key)
            out.append(pipeline)
    return out
