"""One table of metrics: every figure of a candidate that a run sorts, filters or prints.

A row (`Metric`) says, in one place: the metric's name (as in results.json and a profile's
`objective.metric`), which way is better, its unit and label, how to read it from a candidate's
measured metrics (the `metrics` dict of a record, docs/results.md), how a profile limits it
(`Limit`: the constraint field, its unit and scale) and where it is shown (the terminal's table,
the report's table and plots, `runs compare`, the Pareto front's default objectives). The
profile (which objectives it accepts and their goal), the record, the trial, the selection, the
final round, the terminal, `runs compare` and the report all read this table.

Adding a metric is one row here, plus the agent's reading of it (agents/benchmark.py, combined
across devices in fleet/lease.py) into the candidate's metrics; a row with a limit also needs its
field in `profile.Constraints`. The profile's objective metric is always shown, in the terminal's
table and the report's (table and a plot), whatever the row says.

`quality_drop` is the one computation of the quality (accuracy) drop against the baseline.

A top-level leaf module (it imports nothing of the project): the profile, every wing and the
report read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

#: Where a row may be shown (`Metric.shown`).
TERMINAL, REPORT, COMPARE, PLOT, FRONT = "terminal", "report", "compare", "plot", "front"


@dataclass(frozen=True)
class Limit:
    """How a profile bounds a metric: `constraints.<field>`, in `unit`; the metric's value × `scale` is in that unit.

    `percentile`: for a latency row, the limit applies only when `constraints.latency_percentile` is it.
    """

    field: str
    unit: str
    scale: float = 1.0
    label: str | None = None  # in violation messages; default: the metric's label


@dataclass(frozen=True)
class Metric:
    """One row of the table. `read` takes a candidate's metrics dict and returns the raw value (None: not measured).

    Shown values are raw × `show_scale`, in `unit`, with `digits` decimals; `header` names the column.
    `objective`: a profile may name it as `objective.metric`. `percentile`: a latency percentile
    (the final round re-measures it, the latency limit applies to one). `note` gives a tag for a
    value (energy: "estimated").
    """

    name: str
    direction: str  # "min" | "max": which way is better
    unit: str
    label: str
    read: Callable[[Mapping[str, Any]], Any]
    header: str = ""
    digits: int = 3
    show_scale: float = 1.0
    limit: Limit | None = None
    objective: bool = True
    percentile: str | None = None
    shown: frozenset[str] = frozenset()
    note: Callable[[Mapping[str, Any]], str | None] | None = None

    @property
    def goal(self) -> str:
        """The profile's word for the direction: "minimize" or "maximize"."""
        return "minimize" if self.direction == "min" else "maximize"

    def value(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The metric as a float from a candidate's metrics dict, or None when not measured."""
        raw = self.read(metrics or {})
        return None if raw is None else float(raw)

    def shown_value(self, metrics: Mapping[str, Any] | None) -> float | None:
        value = self.value(metrics)
        return None if value is None else value * self.show_scale

    def text(self, metrics: Mapping[str, Any] | None, empty: str = "-") -> str:
        """The value as the tables print it: `digits` decimals in `unit`, or `empty` when not measured."""
        return self.format(self.value(metrics), empty)

    def format(self, raw: float | None, empty: str = "-") -> str:
        """A raw value (in the metric's own unit) as the tables print it, in `unit`."""
        return empty if raw is None else f"{raw * self.show_scale:.{self.digits}f}"

    def tag(self, metrics: Mapping[str, Any] | None) -> str | None:
        """A word that qualifies the value ("estimated" energy), or None."""
        return self.note(metrics or {}) if self.note is not None and self.value(metrics) is not None else None

    def column(self, style: str = "terminal") -> str:
        """The column's header: 'size KiB' in the terminal, 'size (KiB)' in the report."""
        head = self.header or self.label
        if not self.unit or (style == "terminal" and self.name == "accuracy_drop"):
            return head
        return f"{head} {self.unit}" if style == "terminal" else f"{head} ({self.unit})"


def _key(name: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda m: m.get(name)


def _latency(pct: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda m: (m.get("latency_ms") or {}).get(pct)


def _estimated(m: Mapping[str, Any]) -> str | None:
    return "estimated" if m.get("energy_source") == "estimated" else None


def _latency_row(pct: str, shown: frozenset[str]) -> Metric:
    return Metric(f"latency_{pct}", "min", "ms", f"latency {pct}", _latency(pct), header=pct, digits=3,
                  limit=Limit("max_latency_ms", "ms"), percentile=pct, shown=shown)


#: Bytes in one MB, as used by `max_model_size_mb` (1 MB = 1,000,000 bytes, not MiB).
BYTES_PER_MB = 1_000_000

#: The table, in the order the tables show their columns.
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", "max", "", "accuracy", _key("accuracy"), digits=4,
           shown=frozenset({TERMINAL, REPORT, COMPARE, FRONT})),
    Metric("accuracy_drop", "min", "pts", "accuracy drop", _key("accuracy_drop"), header="drop", digits=2,
           limit=Limit("max_accuracy_drop", "points"), objective=False, shown=frozenset({TERMINAL, REPORT})),
    Metric("size_bytes", "min", "KiB", "size", _key("size_bytes"), digits=1, show_scale=1 / 1024,
           limit=Limit("max_model_size_mb", "MB", 1 / BYTES_PER_MB, label="model size"),
           shown=frozenset({TERMINAL, REPORT, COMPARE, PLOT, FRONT})),
    _latency_row("p50", frozenset({TERMINAL, REPORT, COMPARE, PLOT, FRONT})),
    _latency_row("p90", frozenset({TERMINAL, REPORT})),
    _latency_row("p99", frozenset({REPORT})),
    Metric("peak_memory_mb", "min", "MB", "peak memory", _key("peak_memory_mb"), header="peak mem", digits=1,
           limit=Limit("max_peak_memory_mb", "MB"), shown=frozenset({REPORT, COMPARE})),
    Metric("energy_mj", "min", "mJ", "energy per inference", _key("energy_mj"), header="energy", digits=4,
           limit=Limit("max_energy_mj", "mJ", label="energy"),
           note=_estimated, shown=frozenset({TERMINAL, REPORT, COMPARE, PLOT, FRONT})),
)}


def metric(name: str) -> Metric:
    """The row of `name`; ValueError for a name that is not a metric."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}") from None


def objective_metrics() -> dict[str, str]:
    """The metrics a profile's objective may name, and which way is better for each ("min" | "max")."""
    return {m.name: m.direction for m in METRICS.values() if m.objective}


def shown_in(place: str, objective: str | None = None) -> list[Metric]:
    """The rows shown in `place` (TERMINAL, REPORT, COMPARE, PLOT, FRONT), in table order.

    `objective` (the profile's metric) is always among them, except on a plot's x axis when it is
    the accuracy (every plot's y axis).
    """
    rows = [m for m in METRICS.values() if place in m.shown]
    if objective is not None and objective in METRICS and METRICS[objective] not in rows \
            and not (place == PLOT and objective == "accuracy"):
        rows.append(METRICS[objective])
    return rows


def front_objectives(objective: str | None = None) -> tuple[tuple[str, str], ...]:
    """The Pareto front's objectives as (name, "max" | "min"): the FRONT rows, and the profile's objective."""
    return tuple((m.name, m.direction) for m in shown_in(FRONT, objective))


def limits(constraints: Any) -> list[tuple[str, Metric]]:
    """(constraint field, metric) for every limit `constraints` can set, in the order of its fields.

    The latency limit bounds the percentile `constraints.latency_percentile` names.
    """
    pct = getattr(constraints, "latency_percentile", None)
    by_field: dict[str, Metric] = {}
    for m in METRICS.values():
        if m.limit is not None and (m.percentile is None or m.percentile == pct):
            by_field.setdefault(m.limit.field, m)
    order = list(type(constraints).model_fields) if hasattr(type(constraints), "model_fields") else list(by_field)
    return [(f, by_field[f]) for f in order if f in by_field]


def quality_drop(accuracy: float, baseline: float) -> float:
    """Quality (accuracy) lost against the baseline, in percentage points: (baseline − accuracy) × 100.

    Negative when the candidate is better. Rounded to 9 decimals so that 0.99 − 0.98 gives exactly 1.0.
    The one computation of the drop: the trial's early rejection and the selection both use it.
    """
    return round((float(baseline) - float(accuracy)) * 100.0, 9)


def within(value: float, limit: float, rel_tol: float = 1e-9) -> bool:
    """A value meets its limit when it is at most the limit (float noise at the boundary allowed)."""
    return value <= limit or math.isclose(value, limit, rel_tol=rel_tol)
