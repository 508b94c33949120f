"""The search space: pipelines (ordered combinations of allowed techniques) and their parameters.

A pipeline holds at most one technique of the `architecture` stage, and any number of
`training` and of `graph` techniques, in stage order. Within a stage, a technique that
declares `cannot_follow = ("x",)` runs before `x`; otherwise the order the profile lists them
in holds. A combination is refused up front, never mid-search, when two of its techniques
declare each other `incompatible_with` (the built-in int8-static, int8-dynamic and fp16 do:
a pipeline quantizes once), or when `cannot_follow` asks for an order the stages forbid (or
a cycle). The baseline is the empty pipeline.

The profile's `search.params` fixes or restricts technique parameters: `allowed_techniques`
returns the techniques so configured (`configured_technique`), whose parameter grid, defaults
and `check_params` say what the profile says; every candidate carries its full parameters,
so the plain technique a build looks up again gets the same values.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

from orchestrator.api import STAGE_ORDER, Choice, Technique
from orchestrator.config.profile import LoadedProfile
from orchestrator.errors import TechniqueParamsError
from orchestrator.hooks.manager import PluginRegistry

TechniqueNames = tuple[str, ...]  # the techniques of a pipeline, in order
PipelineSpec = list[dict[str, Any]]  # record.Pipeline as JSON: [{"technique": name, "params": {...}}]


def allowed_techniques(loaded: LoadedProfile, registry: PluginRegistry) -> list[Technique]:
    """The profile's techniques, each checked to be installed and configured by `search.params`.

    An unknown technique names the profile line (`search.techniques[i]`); so does a bad
    parameter (`search.params.<technique>.<param>`), see `configured_technique`.
    """
    search = loaded.profile.search
    out = []
    for i, name in enumerate(search.techniques):
        if name not in registry.techniques:
            installed = ", ".join(sorted(registry.techniques)) or "none"
            raise loaded.error(("search", "techniques", i), f"unknown technique {name!r}; installed: {installed}")
        out.append(registry.techniques[name])
    for name in search.params:
        if name not in registry.techniques:
            installed = ", ".join(sorted(registry.techniques)) or "none"
            raise loaded.error(("search", "params", name), f"unknown technique {name!r}; installed: {installed}")
        if name not in search.techniques:
            raise loaded.error(("search", "params", name),
                               f"{name!r} is not in search.techniques, so its parameters would not be used")
    configured = []
    for technique in out:
        try:
            configured.append(configured_technique(technique, search.params.get(technique.name) or {}))
        except ParamOverrideError as exc:
            raise loaded.error(("search", "params", technique.name, *exc.loc), exc.message) from None
    return configured


class ParamOverrideError(TechniqueParamsError):
    """A profile's parameter for a technique that the technique refuses; `loc` is the parameter (or empty)."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(f"{'.'.join(loc) or '(technique)'}: {message}")
        self.loc, self.message = loc, message


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    """Equal, with true/false never standing for 1/0 (Python's True == 1)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def configured_technique(technique: Technique, overrides: dict[str, Any]) -> Technique:
    """`technique` as a profile's `search.params.<technique>` configures it (itself when there is nothing to do).

    For a searched parameter (in `search_space`), a value fixes it and a list restricts it
    to those values (the first listed is the one used where a point leaves it out); each must
    be one of the technique's. Any other known parameter (in `defaults`) takes the value as it
    is, a list included. The result is a shallow copy whose instance attributes `search_space`
    and `defaults` say so; its `invalid()` must accept the values, and some combination of the
    restricted space must be valid. ParamOverrideError names the parameter otherwise.
    """
    if not overrides:
        return technique
    search_space = dict(technique.search_space)
    defaults = dict(technique.defaults)
    for key, value in overrides.items():
        if key in technique.search_space:
            domain = technique.search_space[key].values
            values = value if isinstance(value, list) else [value]
            if not values:
                raise ParamOverrideError((key,), f"an empty list leaves nothing to search; one of {list(domain)}")
            kept: list[Any] = []
            for v in values:
                match = next((d for d in domain if _same(d, v)), _MISSING)
                if match is _MISSING:
                    raise ParamOverrideError((key,), f"{v!r} is not one of {list(domain)}")
                if not any(_same(match, k) for k in kept):
                    kept.append(match)
            search_space[key] = Choice(tuple(kept))
        elif key in technique.defaults:
            defaults[key] = value
        else:
            known = ", ".join(sorted(set(technique.search_space) | set(technique.defaults))) or "none"
            raise ParamOverrideError((key,), f"unknown parameter of {technique.name!r}; it accepts {known}")
    configured = copy.copy(technique)
    configured.search_space = search_space  # instance attributes: the registry's technique is untouched
    configured.defaults = defaults
    first = {k: d.values[0] for k, d in search_space.items()}
    for key in overrides:  # each value alone first, so that the message can name it
        if key in technique.defaults and key not in technique.search_space:
            reason = configured.invalid({**technique.defaults, **first, key: defaults[key]})
            if reason:
                raise ParamOverrideError((key,), reason)
    if not configured.param_grid():
        raise ParamOverrideError((), "no combination of these parameters is valid: "
                                     + (configured.invalid({**defaults, **first}) or "every one is refused"))
    return configured


class IncompatiblePipeline(TechniqueParamsError):
    """A combination of techniques that cannot form a pipeline (refused before the search starts)."""


def order_pipeline(combo: Sequence[Technique]) -> list[Technique]:
    """The techniques of one pipeline in the order they run, or IncompatiblePipeline saying why not.

    Stage order first; within a stage, `cannot_follow` edges, ties kept in the given order.
    At most one `architecture` technique; graph and training ones may share a pipeline unless
    declared `incompatible_with` each other.
    """
    if sum(t.stage == "architecture" for t in combo) > 1:
        names = ", ".join(t.name for t in combo if t.stage == "architecture")
        raise IncompatiblePipeline(f"at most one architecture technique per pipeline, got {names}")
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


def pipelines(techniques: list[Technique], max_length: int) -> list[TechniqueNames]:
    """Every valid pipeline (baseline first), in a stable order; invalid combinations are left out."""
    out: list[TechniqueNames] = [()]
    for length in range(1, max_length + 1):
        for combo in itertools.combinations(techniques, length):
            try:
                out.append(tuple(t.name for t in order_pipeline(combo)))
            except IncompatiblePipeline:
                continue
    return out


def enumerate_candidates(techniques: list[Technique], max_length: int) -> list[PipelineSpec]:
    """Every (pipeline, parameters) combination: the full grid, baseline first."""
    by_name = {t.name: t for t in techniques}
    out: list[PipelineSpec] = []
    for pipeline in pipelines(techniques, max_length):
        grids = [by_name[name].param_grid() for name in pipeline]
        for params in itertools.product(*grids):
            out.append([{"technique": n, "params": p} for n, p in zip(pipeline, params)])
    return out
