"""The table of metrics (orchestrator/metrics.py): an objective is one row, read everywhere from there.

Issue 28 item 3: adding an objective is one row in the table plus the agent's reading. Here a row
is added (model load time, a figure an agent could report next to its latencies) and peak memory,
a row no table showed by default, is named as the objective: each is seen in the profile, the
selection, the trial's report to the sampler, the terminal and report.html.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from orchestrator.cli.console import pick_line, print_candidates
from orchestrator.config.profile import Profile
from orchestrator.metrics import METRICS, Metric, front_objectives, limits, metric, objective_metrics, quality_drop
from orchestrator.report.render import render_report
from orchestrator.search.final_round import objective_percentile
from orchestrator.search.record import CandidateRecord
from orchestrator.search.selection import accuracy_drop_points, check_constraints, select
from orchestrator.search.trial import accuracy_rejection, trial_values


def profile(metric: str, **constraints: Any) -> Profile:
    return Profile.model_validate({
        "name": "rpi4", "hardware": {"arch": "aarch64", "cpu": "Cortex-A72", "cores": 4, "memory_mb": 4096},
        "objective": {"metric": metric}, "power": {"idle_watts": 2.7, "active_watts": 6.4, "source": "test"},
        "constraints": constraints})


def cand(cid: str, steps: int, acc: float, p50: float, size: int, mem: float, **extra: Any) -> dict[str, Any]:
    return {"id": cid, "pipeline": [{"technique": f"t{i}", "params": {}} for i in range(steps)], "status": "ok",
            "error": None, "metrics": {"accuracy": acc, "size_bytes": size,
                                       "latency_ms": {"p50": p50, "p90": p50 * 1.2, "p99": p50 * 1.5},
                                       "peak_memory_mb": mem, "energy_mj": p50 * 2, "energy_source": "estimated",
                                       **extra}}


# c001 is the fastest, c002 the smallest, c003 the lightest in memory and the quickest to load
CANDIDATES = [
    cand("c000", 0, 0.99, 10.0, 4_000_000, 150.0, load_ms=90.0),
    cand("c001", 1, 0.985, 3.0, 1_500_000, 120.0, load_ms=60.0),
    cand("c002", 2, 0.984, 5.0, 1_000_000, 110.0, load_ms=50.0),
    cand("c003", 1, 0.986, 6.0, 2_000_000, 70.0, load_ms=20.0),
]


def results_of(prof: Profile) -> dict[str, Any]:
    """results.json's parts the terminal and the report read, from a real selection."""
    sel = select(CANDIDATES, prof)
    return {"run_id": "r1", "status": "finished", "message": None, "profile": prof.name, "profile_path": "p.yaml",
            "task": "digits", "device": {"name": "local", "transport": "local", "arch": "x86_64"},
            "constraints": prof.constraints.model_dump(), "objective": prof.objective.model_dump(),
            "baseline": sel.baseline.to_json(), "best": sel.best.to_json(), "candidates": sel.to_json()}


def terminal(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    print_candidates(results["candidates"], results["best"]["id"], console=Console(file=buf, width=250),
                     objective=results["objective"]["metric"])
    return buf.getvalue() + pick_line(results)


def test_every_objective_and_limit_is_a_row_of_the_table() -> None:
    from orchestrator.config.profile import OBJECTIVE_METRICS, Constraints

    assert OBJECTIVE_METRICS == objective_metrics()
    assert {name for name, _ in front_objectives()} == {"accuracy", "latency_p50", "size_bytes", "energy_mj"}
    limited = {row.limit.field for row in METRICS.values() if row.limit}
    assert limited == {f for f in Constraints.model_fields if f.startswith("max_")}
    assert [f for f, _ in limits(Constraints(latency_percentile="p99"))] == [
        "max_latency_ms", "max_peak_memory_mb", "max_model_size_mb", "max_energy_mj", "max_accuracy_drop"]
    assert dict(limits(Constraints(latency_percentile="p99")))["max_latency_ms"].name == "latency_p99"
    with pytest.raises(ValueError, match="unknown metric"):
        metric("throughput")


def test_the_drop_is_computed_once_for_the_trial_and_the_selection() -> None:
    prof = profile("latency_p50", max_accuracy_drop=1.0)
    assert quality_drop(0.98, 0.99) == 1.0  # exactly: rounded to 9 decimals
    assert accuracy_drop_points({"metrics": {"accuracy": 0.98}}, {"metrics": {"accuracy": 0.99}}) == 1.0
    assert accuracy_rejection(0.98, 0.99, prof) is None  # at the limit: allowed by both
    reason = accuracy_rejection(0.9799, 0.99, prof)
    rejected = {**cand("c009", 1, 0.9799, 1.0, 1, 1.0), "status": "rejected", "error": reason, "metrics": {
        "accuracy": 0.9799, "size_bytes": 1}}
    verdict = next(c for c in select([CANDIDATES[0], rejected], prof).candidates if c.id == "c009").verdict
    assert verdict is not None and not verdict.feasible
    assert verdict.violations[0]["constraint"] == "max_accuracy_drop" and "1.01 points > 1.00" in reason


def test_peak_memory_as_the_objective_is_seen_in_selection_terminal_and_report() -> None:
    prof = profile("peak_memory_mb")
    assert prof.objective.goal == "minimize"
    results = results_of(prof)
    assert results["best"]["id"] == "c003"  # the lightest, not the fastest (c001)
    text = terminal(results)
    assert "peak mem MB" in text and "70.0" in text  # a column the terminal has only for this objective
    assert "peak memory 70.0 MB" in text.splitlines()[-1]
    page = render_report(results)
    assert "<th>peak mem (MB)</th>" in page and "peak memory (MB)" in page  # the table's column, a plot's axis
    assert objective_percentile(prof) == "p90"  # not a latency: the final round times the constraints' percentile


def test_adding_an_objective_is_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    row = Metric("load_ms", "min", "ms", "model load time", lambda m: m.get("load_ms"), header="load", digits=1)
    monkeypatch.setitem(METRICS, "load_ms", row)  # the one row; the candidates' metrics carry the agent's reading

    prof = profile("load_ms")  # the profile accepts it, with its natural goal
    assert prof.objective.goal == "minimize"
    results = results_of(prof)
    assert results["best"]["id"] == "c003"  # selection: the quickest to load
    assert CandidateRecord.from_json(CANDIDATES[1]).value("load_ms") == 60.0  # the record reads it
    assert trial_values(CANDIDATES[1], prof)["load_ms"] == 60.0  # the sampler is told it
    assert trial_values({**CANDIDATES[1], "status": "failed"}, prof)["load_ms"] == 1e12  # worst when unmeasured
    text = terminal(results)
    assert "load ms" in text and "20.0" in text and "model load time 20.0 ms" in text.splitlines()[-1]
    page = render_report(results)
    assert "<th>load (ms)</th>" in page and "model load time (ms)" in page  # column and plot axis
    assert check_constraints(CANDIDATES[3], prof.constraints) == []  # no limit in the row: nothing to break
