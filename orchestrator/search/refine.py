"""Refinement around the starting points: their one-parameter neighbours, before the sampler's guesses.

A technique's recommendation (orchestrator/search/starting.py) is a known-good point, and the
variants that change one of its parameters are the likeliest to do better still: another
importance criterion for the same pruning ratio, per-tensor instead of per-channel scales. Once
a starting point has finished and is feasible (its objective measured, every device limit met,
its accuracy within the profile's limit), its neighbours in the search space are proposed, the
feasible starting points taking turns (round-robin in the order they were evaluated), every
other proposal; the sampler (Optuna's TPE) makes the others and is told every result, these
included. A starting point that is infeasible (rejected for accuracy, over a device limit,
failed) gets no neighbours: its region is the sampler's to judge. A neighbour in a family
the search has ruled out (a technique, or a parameter value, that keeps being rejected or
failing: orchestrator/search/ruleout.py) is skipped.

This is the local search around the incumbent that model-based optimisers interleave with
their model's proposals (SMAC, for instance), here around every known-good point rather than the
single best one: on a noisy objective the single best is often not the best (docs/pick.md).
"""

from __future__ import annotations

import json
from typing import Any, Callable


def _text(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def neighbours(config: dict[str, Any], space: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The configurations of `space` with the same pipeline that differ from `config` in exactly one
    parameter, one value of each parameter before a second of any (one-at-a-time screening): the
    parameters in the configuration's order; a number's values nearest to the current one first,
    other values in the space's order."""
    same = [c for c in space if c.get("pipeline") == config.get("pipeline") and c.keys() == config.keys()
            and sum(c[k] != config[k] for k in c) == 1]
    keys = list(config)
    values: dict[str, list[Any]] = {}
    for c in space:
        if c.get("pipeline") == config.get("pipeline"):
            for k in keys:
                if k in c and c[k] not in values.setdefault(k, []):
                    values[k].append(c[k])

    def rank(c: dict[str, Any]) -> tuple[int, int]:
        k = next(k for k in keys if c[k] != config[k])
        others = [v for v in values[k] if v != config[k]]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [config[k], *others]):
            others.sort(key=lambda v: abs(v - config[k]))  # stable: equally near keep the space's order
        return others.index(c[k]), keys.index(k)

    return sorted(same, key=rank)


class Refinement:
    """Which neighbour of which feasible starting point to propose next.

    `space` holds every configuration of the search space as the sampler names them (a
    `pipeline` label and `technique.param` values: searcher.point_config), `starts` the starting
    points in the order they are evaluated. Only starting points are parents: letting a
    neighbour as good as its parent (within the profile's tie) become one in turn took the
    size benchmark from 18% of the grid to 27% (docs/scaling.md).
    """

    def __init__(self, space: list[dict[str, Any]], starts: list[dict[str, Any]]) -> None:
        self.space = space
        self.starts = [_text(s) for s in starts]
        self.parents: dict[str, list[dict[str, Any]]] = {}  # feasible starting point -> its neighbours
        self.taken: dict[str, int] = {}  # how many neighbours each has had proposed

    def finished(self, config: dict[str, Any], feasible: bool) -> None:
        """A trial finished; a feasible starting point becomes a parent."""
        text = _text(config)
        if feasible and text in self.starts and text not in self.parents:
            self.parents[text] = neighbours(config, self.space)
            self.taken[text] = 0

    def next(self, proposed: set[str],
             allowed: Callable[[dict[str, Any]], bool] = lambda config: True) -> dict[str, Any] | None:
        """The next neighbour not yet `proposed` (texts of configurations) and `allowed` (not in a family
        the search ruled out: orchestrator/search/ruleout.py): from the parent that has had the
        fewest, the earlier starting point first; None when there is none."""
        for parent in sorted(self.parents, key=lambda p: (self.taken[p], self.starts.index(p))):
            for config in self.parents[parent]:
                if _text(config) not in proposed and allowed(config):
                    self.taken[parent] += 1
                    return config
        return None
