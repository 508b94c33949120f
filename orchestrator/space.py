"""The search space: pipelines (ordered combinations of allowed techniques) and their parameters.

A pipeline holds at most one technique of the `architecture` and of the `graph`
stage, and any number of `training` techniques, in stage order (then in the
order the profile lists them). The baseline is the empty pipeline.
"""

from __future__ import annotations

import itertools
from typing import Any

from orchestrator.api import STAGE_ORDER, Technique
from orchestrator.plugins import PluginRegistry
from orchestrator.profile import LoadedProfile

Pipeline = tuple[str, ...]
Candidate = list[dict[str, Any]]  # [{"technique": name, "params": {...}}]


def allowed_techniques(loaded: LoadedProfile, registry: PluginRegistry) -> list[Technique]:
    """The profile's techniques, each checked to be installed; an unknown one names the profile line."""
    out = []
    for i, name in enumerate(loaded.profile.search.techniques):
        if name not in registry.techniques:
            installed = ", ".join(sorted(registry.techniques)) or "none"
            raise loaded.error(("search", "techniques", i), f"unknown technique {name!r}; installed: {installed}")
        out.append(registry.techniques[name])
    return out


def pipelines(techniques: list[Technique], max_length: int) -> list[Pipeline]:
    """Every valid pipeline (baseline first), in a stable order."""
    rank = {t.name: (STAGE_ORDER.index(t.stage), i) for i, t in enumerate(techniques)}
    out: list[Pipeline] = [()]
    for length in range(1, max_length + 1):
        for combo in itertools.combinations(techniques, length):
            stages = [t.stage for t in combo]
            if stages.count("architecture") > 1 or stages.count("graph") > 1:
                continue
            out.append(tuple(sorted((t.name for t in combo), key=rank.__getitem__)))
    return out


def enumerate_candidates(techniques: list[Technique], max_length: int) -> list[Candidate]:
    """Every (pipeline, parameters) combination: the full grid, baseline first."""
    by_name = {t.name: t for t in techniques}
    out: list[Candidate] = []
    for pipeline in pipelines(techniques, max_length):
        grids = [by_name[name].param_grid() for name in pipeline]
        for params in itertools.product(*grids):
            out.append([{"technique": n, "params": p} for n, p in zip(pipeline, params)])
    return out

