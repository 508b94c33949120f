"""The search space: pipelines (ordered combinations of allowed techniques) and their parameters.

A pipeline holds at most one technique of the `architecture` and of the `graph`
stage, and any number of `training` techniques, in stage order. Within a stage,
a technique that declares `cannot_follow = ("x",)` runs before `x`; otherwise the
order the profile lists them in holds. A combination is refused up front, never
mid-search, when two of its techniques declare each other `incompatible_with`, or
when `cannot_follow` asks for an order the stages forbid (or a cycle).
The baseline is the empty pipeline.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from orchestrator.api import STAGE_ORDER, Technique
from orchestrator.errors import TechniqueParamsError
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


class IncompatiblePipeline(TechniqueParamsError):
    """A combination of techniques that cannot form a pipeline (refused before the search starts)."""


def order_pipeline(combo: Sequence[Technique]) -> list[Technique]:
    """The techniques of one pipeline in the order they run, or IncompatiblePipeline saying why not.

    Stage order first; within a stage, `cannot_follow` edges, ties kept in the given order.
    """
    stages = [t.stage for t in combo]
    for stage in ("architecture", "graph"):
        if stages.count(stage) > 1:
            names = ", ".join(t.name for t in combo if t.stage == stage)
            raise IncompatiblePipeline(f"at most one {stage} technique per pipeline, got {names}")
    names = {t.name for t in combo}
    for a, b in itertools.combinations(combo, 2):
        if b.name in a.incompatible_with or a.name in b.incompatible_with:
            raise IncompatiblePipeline(f"{a.name} and {b.name} cannot be combined (declared incompatible)")
    # before[u]: the techniques that must run before u (every t that cannot follow u).
    before: dict[str, set[str]] = {t.name: set() for t in combo}
    for t in combo:
        for u in t.cannot_follow:
            if u in names and u != t.name:
                before[u].add(t.name)
    stage_of = {t.name: STAGE_ORDER.index(t.stage) for t in combo}
    for u, firsts in before.items():
        for t in firsts:
            if stage_of[t] > stage_of[u]:
                raise IncompatiblePipeline(
                    f"{t} cannot follow {u}, but the {STAGE_ORDER[stage_of[u]]} stage runs before "
                    f"the {STAGE_ORDER[stage_of[t]]} stage"
                )
    ordered: list[Technique] = []
    pending = sorted(combo, key=lambda t: stage_of[t.name])  # stable: keeps the given order within a stage
    while pending:
        done = {t.name for t in ordered}
        ready = next((t for t in pending if before[t.name] <= done), None)
        if ready is None:
            raise IncompatiblePipeline(
                "cannot_follow declarations form a cycle among " + ", ".join(t.name for t in pending)
            )
        ordered.append(ready)
        pending.remove(ready)
    return ordered


def pipelines(techniques: list[Technique], max_length: int) -> list[Pipeline]:
    """Every valid pipeline (baseline first), in a stable order; invalid combinations are left out."""
    out: list[Pipeline] = [()]
    for length in range(1, max_length + 1):
        for combo in itertools.combinations(techniques, length):
            try:
                out.append(tuple(t.name for t in order_pipeline(combo)))
            except IncompatiblePipeline:
                continue
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
