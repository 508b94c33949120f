"""Selection: check each measured candidate against a profile's constraints and pick the best.

Candidates are `CandidateRecord`s (orchestrator/search/record.py); the helpers here also read
the plain dicts of results.json (`metric_value`, `pipeline_label`, `check_constraints`), so the
report and `runs compare` share them.

`select` changes nothing it is given: it returns a `Selection` whose records are annotated
copies, each with its `Verdict` (feasible, violations, on the front) and, for scored
candidates, ``metrics.accuracy_drop`` (percentage points against the baseline). The baseline
is the candidate whose pipeline is empty (the model exported unchanged).

Units: model size limits are in MB, where 1 MB = 1,000,000 bytes (not MiB). A value equal to its
limit is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Union

from orchestrator.config.profile import Constraints, Profile
from orchestrator.errors import NoFeasibleCandidate
from orchestrator.metrics import Metric, front_objectives, limits, quality_drop, within
from orchestrator.metrics import metric as metric_row
from orchestrator.search.record import CandidateRecord, Verdict, as_record

Candidate = Union[CandidateRecord, dict[str, Any]]  # a record, or its JSON (results.json, a trial's report)
Violation = dict[str, Any]

#: Objectives of the Pareto front, as (metric name, "max" | "min"): the table's front rows (orchestrator/metrics.py).
DEFAULT_OBJECTIVES: tuple[tuple[str, str], ...] = front_objectives()

# Relative tolerance when comparing a value with its limit, so float noise at the boundary is allowed.
_REL_TOL = 1e-9


def metric_value(candidate: Candidate, name: str) -> float | None:
    """The value of metric `name` of `candidate` as a float, or None when it was not measured.

    Names are the rows of the table of metrics (orchestrator/metrics.py): "accuracy",
    "accuracy_drop", "size_bytes", "peak_memory_mb", "energy_mj", "latency_p50" / "latency_p90" /
    "latency_p99" (read from ``metrics["latency_ms"]``). Raises ValueError for any other name.
    """
    if isinstance(candidate, CandidateRecord):
        return candidate.value(name)
    return metric_row(name).value(candidate.get("metrics"))


def accuracy_drop_points(candidate: Candidate, baseline: Candidate) -> float:
    """Accuracy lost against the baseline, in percentage points (`orchestrator.metrics.quality_drop`).

    Negative when the candidate is more accurate. Raises ValueError if either accuracy is missing.
    """
    base, acc = metric_value(baseline, "accuracy"), metric_value(candidate, "accuracy")
    if base is None or acc is None:
        raise ValueError(f"accuracy not measured for {_id(candidate) if acc is None else _id(baseline)}")
    return quality_drop(acc, base)


def pipeline_label(candidate: Candidate) -> str:
    """'baseline' for an empty pipeline, else the technique names joined by '+'."""
    if isinstance(candidate, CandidateRecord):
        return candidate.label
    steps = candidate.get("pipeline") or []
    return "+".join(step["technique"] for step in steps) if steps else "baseline"


def _id(candidate: Candidate) -> str:
    return candidate.id if isinstance(candidate, CandidateRecord) else str(candidate.get("id", ""))


def constraint_names(constraints: Constraints) -> list[str]:
    """The constraints a profile sets (a limit that is not None), in a fixed order."""
    return [name for name, _ in limits(constraints) if getattr(constraints, name) is not None]


def check_constraints(candidate: Candidate, constraints: Constraints) -> list[Violation]:
    """One violation dict per constraint of `constraints` that `candidate` breaks.

    The limits and their units come from the table of metrics (orchestrator/metrics.py). Each
    violation has: "constraint" (the field, e.g. "max_latency_ms"), "metric" (e.g. "latency_p90",
    following ``constraints.latency_percentile``), "limit" and "value" (both in the constraint's unit:
    ms, MB with 1 MB = 1,000,000 bytes, mJ, or percentage points), "excess" (value/limit − 1; for
    max_accuracy_drop with limit 0, the value itself) and a human "message".

    A value equal to its limit is allowed. A constraint whose metric was not measured (None) is a
    violation with value None and excess inf. "accuracy_drop" must already be in the metrics (`select`
    fills it).
    """
    violations: list[Violation] = []
    for field_name, row in limits(constraints):
        limit = getattr(constraints, field_name)
        if limit is None:
            continue
        violation = limit_violation(row, metric_value(candidate, row.name), float(limit))
        if violation is not None:
            violations.append(violation)
    return violations


def limit_violation(row: Metric, raw: float | None, limit: float) -> Violation | None:
    """The violation of `row`'s limit by the value `raw` (in the metric's own unit), or None when it is met."""
    spec = row.limit
    assert spec is not None, f"{row.name} has no limit"
    label, unit = spec.label or row.label, spec.unit
    base = {"constraint": spec.field, "metric": row.name, "limit": limit}
    if raw is None:
        return {**base, "value": None, "excess": math.inf,
                "message": f"{label} not measured (limit {limit:.2f} {unit})"}
    value = raw * spec.scale
    if within(value, limit, _REL_TOL):
        return None
    excess = value / limit - 1.0 if limit > 0 else value
    return {**base, "value": value, "excess": excess, "message": f"{label} {value:.2f} {unit} > {limit:.2f} {unit}"}


def drop_violation(drop: float, constraints: Constraints) -> Violation | None:
    """The violation of ``max_accuracy_drop`` by a drop of `drop` points, or None (met, or no limit).

    The trial refuses to measure a candidate with this very test (`trial.accuracy_rejection`), and the
    selection states it for that candidate: one rule, one place.
    """
    limit = constraints.max_accuracy_drop
    return None if limit is None else limit_violation(metric_row("accuracy_drop"), drop, float(limit))


def _dominates(a: list[float], b: list[float]) -> bool:
    """True if `a` is at least as good as `b` everywhere and strictly better somewhere (all 'larger is better')."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(
    candidates: list[Candidate], objectives: tuple[tuple[str, str], ...] = DEFAULT_OBJECTIVES
) -> list[Candidate]:
    """The candidates that no other candidate dominates, in input order.

    `objectives` is a sequence of (metric name, "max" | "min"). A candidate dominates another when it
    is at least as good on every objective and strictly better on one. An objective whose value is None
    for any of `candidates` is left out of the comparison (so unmeasured energy does not break it);
    candidates that tie on every objective are all on the front.
    """
    used = [
        (name, goal)
        for name, goal in objectives
        if all(metric_value(c, name) is not None for c in candidates)
    ]
    for _, goal in used:
        if goal not in ("max", "min"):
            raise ValueError(f"objective goal must be 'max' or 'min', got {goal!r}")
    # Orient every objective so that larger is better.
    points = [
        [metric_value(c, name) * (1.0 if goal == "max" else -1.0) for name, goal in used]  # type: ignore[operator]
        for c in candidates
    ]
    return [
        c
        for i, c in enumerate(candidates)
        if not any(_dominates(points[j], points[i]) for j in range(len(candidates)) if j != i)
    ]


@dataclass
class Selection:
    """The outcome of `select`: annotated copies of the candidates it was given.

    best: the pick (None when nothing is feasible); baseline: the unchanged model; feasible: the ok
    candidates that met every constraint; front: the Pareto front of `feasible`; candidates: every
    candidate with its verdict, in the order given.
    """

    best: CandidateRecord | None
    baseline: CandidateRecord
    feasible: list[CandidateRecord] = field(default_factory=list)
    front: list[CandidateRecord] = field(default_factory=list)
    candidates: list[CandidateRecord] = field(default_factory=list)

    def verdicts(self) -> dict[str, Verdict]:
        """Each candidate's verdict by id."""
        return {c.id: c.verdict for c in self.candidates if c.verdict is not None}

    def to_json(self) -> list[dict[str, Any]]:
        """The candidates as results.json lists them."""
        return [c.to_json() for c in self.candidates]


#: How a tie on the objective is broken when the profile does not say (`objective.tie_break`).
DEFAULT_TIE_BREAK: tuple[str, ...] = ("size", "accuracy")


def tie_break_key(candidate: CandidateRecord, order: Any, smallest: float | None) -> tuple[float, ...]:
    """Sort key (smallest first) among candidates tied on the objective, in the profile's `order`.

    "size": the smaller wins, by 1% of the smallest tied size or more; "accuracy": the more accurate
    wins, by 0.1 quality points (0.001) or more. Smaller differences are no better than the noise of
    the objective and fall through to the next rule (a cosine of 0.9941 does not beat 0.9939).
    """
    key: list[float] = []
    for rule in order or DEFAULT_TIE_BREAK:
        if rule == "size":
            size = candidate.value("size_bytes")
            key.append(round(100 * size / smallest) if size is not None and smallest else math.inf)
        elif rule == "accuracy":
            acc = candidate.value("accuracy")
            key.append(-round(acc, 3) if acc is not None else math.inf)
        else:
            raise ValueError(f"unknown tie-break rule {rule!r}")
    return tuple(key)


def smallest_size(candidates: list[CandidateRecord]) -> float | None:
    """The smallest measured model size among `candidates` (the unit of the size rule), or None."""
    return min((s for s in (c.value("size_bytes") for c in candidates) if s), default=None)


def _rank_key(candidate: CandidateRecord, metric: str, maximize: bool, order: Any = None,
              smallest: float | None = None) -> tuple[Any, ...]:
    """Sort key, smallest first: objective (unmeasured last), then the tie-break rules, then id."""
    value = candidate.value(metric)
    return (
        value is None,
        0.0 if value is None else (-value if maximize else value),
        *tie_break_key(candidate, order, smallest),
        candidate.id,
    )


def _excess_text(violation: Violation) -> str:
    """' (22% over)', or '' for an unmeasured metric (its message already says so)."""
    excess = violation["excess"]
    if math.isinf(excess):
        return ""
    if violation["limit"] == 0:
        return f" ({excess:.2f} points over)"
    pct = excess * 100.0
    return f" ({pct:.0f}% over)" if pct >= 1 else f" ({pct:.2g}% over)"


def _no_feasible_message(candidates: list[CandidateRecord], profile_name: str) -> str:
    """Name the ok candidate whose worst violation is smallest, and that violation."""
    ok = [c for c in candidates if c.status in ("ok", "rejected") and c.verdict is not None]
    if not ok:
        return f"no candidate met the profile {profile_name!r}: every candidate failed ({len(candidates)} tried)"
    closest = min(ok, key=lambda c: (max(v["excess"] for v in c.verdict.violations),  # type: ignore[union-attr]
                                     len(c.verdict.violations)))  # type: ignore[union-attr]
    violations = closest.verdict.violations  # type: ignore[union-attr]
    worst = max(violations, key=lambda v: v["excess"])
    others = len(violations) - 1
    more = f" and {others} more constraint{'s' if others > 1 else ''}" if others else ""
    return (
        f"no candidate met the profile {profile_name!r}; closest: {closest.id} ({closest.label}) "
        f"broke {worst['constraint']}: {worst['message']}{_excess_text(worst)}{more}"
    )


def _status_violation(message: str) -> Violation:
    return {"constraint": "status", "metric": None, "limit": None, "value": None, "excess": math.inf,
            "message": message}


def _judge(cand: CandidateRecord, baseline: CandidateRecord, constraints: Constraints) -> CandidateRecord:
    """`cand` annotated with its verdict (on_front not decided yet) and its accuracy drop."""
    if cand.status == "rejected":  # scored, refused on its drop before any measurement (`drop_violation`)
        drop = accuracy_drop_points(cand, baseline)
        broke = drop_violation(drop, constraints)
        return cand.with_verdict(Verdict(False, (broke or _status_violation(str(cand.error)),)), drop)
    if cand.status != "ok":
        return cand.with_verdict(Verdict(False, (_status_violation(f"candidate failed: {cand.error}"),)))
    try:
        drop = accuracy_drop_points(cand, baseline)
    except ValueError:
        drop = None
    scored = cand.with_verdict(Verdict(False), drop)
    violations = tuple(check_constraints(scored, constraints))
    return scored.with_verdict(Verdict(not violations, violations), drop)


def select(candidates: list[Candidate], profile: Profile) -> Selection:
    """Judge every candidate against `profile` and pick the best feasible one; `candidates` are not changed.

    - The baseline is the first candidate whose pipeline is empty; if there is none or it failed,
      raise ValueError("no successful baseline ...") — that is a run error, not a selection outcome.
    - Every scored candidate (ok or rejected) gets ``metrics.accuracy_drop`` in points.
    - Every candidate gets a verdict (feasible, violations); a failed one a single "status" violation.
    - The front is the Pareto front of the feasible candidates over DEFAULT_OBJECTIVES plus the
      profile's objective metric (when it is not one of them), so the best value of the objective is
      always on the front; with a front, each verdict says whether its candidate is on it.
    - The best is the front candidate with the best objective value in its goal's direction; ties go
      by ``objective.tie_break`` (default: the smaller, then the more accurate; `tie_break_key`), then
      id. With ``objective.tie_within`` above 0, every front candidate whose value is within that share
      of the best value ties with it.

    Raises NoFeasibleCandidate when no candidate is feasible; its message names the closest ok
    candidate and the constraint it broke by most, and its ``.selection`` holds the judged
    Selection (best None) so results can still be written.
    """
    records = [as_record(c) for c in candidates]
    baseline = next((c for c in records if c.is_baseline), None)
    if baseline is None:
        raise ValueError("no successful baseline: no candidate has an empty pipeline")
    if baseline.status != "ok":
        raise ValueError(f"no successful baseline: baseline {baseline.id} failed: {baseline.error}")

    judged = [_judge(c, baseline, profile.constraints) for c in records]
    feasible = [c for c in judged if c.verdict is not None and c.verdict.feasible]
    metric = profile.objective.metric
    maximize = profile.objective.goal == "maximize"
    front = pareto_front(feasible, front_objectives(metric))
    order = profile.objective.tie_break
    smallest = smallest_size(front)
    best = min(front, key=lambda c: _rank_key(c, metric, maximize, order, smallest)) if front else None
    tie = profile.objective.tie_within
    if best is not None and tie > 0:  # within the noise of the best value: the tie-break rules decide
        top = best.value(metric)
        tied = [c for c in front if (c.value(metric) >= top * (1 - tie) if maximize  # type: ignore[operator]
                                     else c.value(metric) <= top * (1 + tie))]  # type: ignore[operator]
        smallest = smallest_size(tied)

        def tie_break(cand: CandidateRecord) -> tuple[Any, ...]:
            value = _rank_key(cand, metric, maximize)[1]
            return (*tie_break_key(cand, order, smallest), value, cand.id)

        best = min(tied, key=tie_break)

    if best is not None:  # the front is known: every verdict says whether its candidate is on it
        on_front = {c.id for c in front}
        judged = [c.with_verdict(dataclasses.replace(c.verdict, on_front=c.id in on_front),  # type: ignore[arg-type]
                                 c.metrics.accuracy_drop) for c in judged]
        by_id = {c.id: c for c in judged}
        feasible, front = [by_id[c.id] for c in feasible], [by_id[c.id] for c in front]
        best, baseline = by_id[best.id], by_id[baseline.id]
    else:
        baseline = next(c for c in judged if c.is_baseline)
    selection = Selection(best=best, baseline=baseline, feasible=feasible, front=front, candidates=judged)
    if best is None:
        error = NoFeasibleCandidate(_no_feasible_message(judged, profile.name))
        error.selection = selection  # type: ignore[attr-defined]
        raise error
    return selection
