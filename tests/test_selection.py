"""Selection: constraints, Pareto front, objective pick and the no-feasible-candidate error."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from orchestrator.config.profile import Constraints, Profile
from orchestrator.errors import NoFeasibleCandidate
from orchestrator.search.record import CandidateRecord
from orchestrator.search.selection import (
    Selection,
    accuracy_drop_points,
    check_constraints,
    metric_value,
    pareto_front,
    pipeline_label,
    select,
)


def cand(
    id: str,
    *techniques: str,
    acc: float | None = 0.98,
    p50: float = 4.0,
    p90: float = 5.0,
    p99: float = 8.0,
    size: int = 2_000_000,
    mem: float = 100.0,
    energy: float | None = 3.0,
    status: str = "ok",
    error: str | None = None,
) -> dict[str, Any]:
    """A hand-made candidate in results.json shape."""
    return {
        "id": id,
        "pipeline": [{"technique": t, "params": {}} for t in techniques],
        "status": status,
        "error": error,
        "metrics": {
            "accuracy": acc,
            "size_bytes": size,
            "latency_ms": {"p50": p50, "p90": p90, "p99": p99},
            "peak_memory_mb": mem,
            "energy_mj": energy,
            "energy_source": "estimated" if energy is not None else "unavailable",
        },
    }


def profile(metric: str = "latency_p50", **constraints: Any) -> Profile:
    return Profile.model_validate(
        {
            "name": "rpi4",
            "hardware": {"arch": "aarch64", "cpu": "Cortex-A72", "cores": 4, "memory_mb": 4096},
            "objective": {"metric": metric},
            "power": {"idle_watts": 2.7, "active_watts": 6.4, "source": "test"},
            "constraints": constraints,
        }
    )


BASE = dict(acc=0.99, p50=10.0, p90=12.0, p99=15.0, size=4_000_000, mem=150.0, energy=5.0)


def ids(cands: list[CandidateRecord | dict[str, Any]]) -> list[str]:
    return [c.id if isinstance(c, CandidateRecord) else c["id"] for c in cands]


def judged(sel: Selection, cid: str) -> CandidateRecord:
    """The selection's annotated copy of candidate `cid`."""
    return next(c for c in sel.candidates if c.id == cid)


# --- metric_value, labels, accuracy drop -------------------------------------------------------


def test_metric_value_reads_plain_and_latency_metrics() -> None:
    c = cand("c1", p50=1.5, p90=2.5, p99=3.5, energy=None)
    assert metric_value(c, "latency_p50") == 1.5
    assert metric_value(c, "latency_p90") == 2.5
    assert metric_value(c, "latency_p99") == 3.5
    assert metric_value(c, "size_bytes") == 2_000_000.0
    assert metric_value(c, "energy_mj") is None
    assert metric_value(c, "accuracy_drop") is None
    assert metric_value({"id": "x", "status": "failed"}, "latency_p50") is None
    with pytest.raises(ValueError, match="unknown metric"):
        metric_value(c, "throughput")


def test_pipeline_label() -> None:
    assert pipeline_label(cand("b")) == "baseline"
    assert pipeline_label(cand("c", "prune-structured", "int8-static")) == "prune-structured+int8-static"


def test_accuracy_drop_in_points() -> None:
    base = cand("b", acc=0.99)
    assert accuracy_drop_points(cand("c", acc=0.98), base) == 1.0
    assert accuracy_drop_points(cand("c", acc=0.9725), base) == pytest.approx(1.75)
    assert accuracy_drop_points(cand("c", acc=0.995), base) == pytest.approx(-0.5)


def test_select_fills_accuracy_drop_for_ok_candidates() -> None:
    cands = [cand("b", **BASE), cand("c1", "int8-static", acc=0.975), cand("c2", "x", status="failed", error="boom")]
    del cands[2]["metrics"]
    given = copy.deepcopy(cands)
    sel = select(cands, profile())
    assert judged(sel, "b").metrics.accuracy_drop == 0.0
    assert judged(sel, "c1").metrics.accuracy_drop == pytest.approx(1.5)
    assert judged(sel, "c1").to_json()["metrics"]["accuracy_drop"] == pytest.approx(1.5)
    assert judged(sel, "c2").metrics.accuracy_drop is None
    assert cands == given  # select changes nothing it was given: it returns its verdicts


def test_select_returns_verdicts_and_results_json_shape() -> None:
    cands = [cand("b", **BASE), cand("c1", "int8-static", acc=0.975, p50=2.0)]
    sel = select(cands, profile(max_accuracy_drop=1.0))
    verdicts = sel.verdicts()
    assert verdicts["b"].feasible and verdicts["b"].on_front
    assert not verdicts["c1"].feasible and verdicts["c1"].on_front is False
    (row,) = [c for c in sel.to_json() if c["id"] == "c1"]
    assert row["feasible"] is False and row["on_front"] is False
    assert row["violations"][0]["constraint"] == "max_accuracy_drop"
    assert {k: v for k, v in row.items() if k not in ("feasible", "violations", "on_front")} == {
        **cands[1], "device": None, "metrics": {**cands[1]["metrics"], "compressed_size_bytes": None, "model_memory_mb": None,
                                "accuracy_drop": pytest.approx(1.5)}}


# --- constraints ---------------------------------------------------------------------------------

# (constraints, candidate overrides at the limit, overrides just over it, metric)
BOUNDARY = [
    pytest.param(
        {"latency_percentile": "p50", "max_latency_ms": 4.0}, {"p50": 4.0}, {"p50": 4.01}, "latency_p50", id="p50"
    ),
    pytest.param(
        {"latency_percentile": "p90", "max_latency_ms": 5.0}, {"p90": 5.0}, {"p90": 5.01}, "latency_p90", id="p90"
    ),
    pytest.param(
        {"latency_percentile": "p99", "max_latency_ms": 8.0}, {"p99": 8.0}, {"p99": 8.01}, "latency_p99", id="p99"
    ),
    pytest.param({"max_peak_memory_mb": 100.0}, {"mem": 100.0}, {"mem": 100.5}, "peak_memory_mb", id="memory"),
    pytest.param({"max_model_size_mb": 2.0}, {"size": 2_000_000}, {"size": 2_000_001}, "size_bytes", id="size"),
    pytest.param({"max_energy_mj": 3.0}, {"energy": 3.0}, {"energy": 3.3}, "energy_mj", id="energy"),
    pytest.param({"max_accuracy_drop": 1.0}, {"acc": 0.98}, {"acc": 0.9799}, "accuracy_drop", id="accuracy-drop"),
]


@pytest.mark.parametrize(("constraints", "at_limit", "over", "metric"), BOUNDARY)
def test_constraint_allows_limit_and_rejects_above(
    constraints: dict[str, Any], at_limit: dict[str, Any], over: dict[str, Any], metric: str
) -> None:
    prof = profile(**constraints)
    cands = [cand("b", acc=0.99), cand("ok", "t", **at_limit), cand("bad", "t", **over)]
    sel = select(cands, prof)
    assert judged(sel, "ok").verdict.feasible is True and judged(sel, "ok").verdict.violations == ()
    assert judged(sel, "bad").verdict.feasible is False
    (violation,) = judged(sel, "bad").verdict.violations
    field = next(iter(k for k in constraints if k.startswith("max_")))
    assert violation["constraint"] == field
    assert violation["metric"] == metric
    assert violation["limit"] == constraints[field]
    assert violation["value"] > violation["limit"]
    assert violation["excess"] == pytest.approx(violation["value"] / violation["limit"] - 1)
    assert "ok" in ids(sel.feasible) and "bad" not in ids(sel.feasible)


def test_latency_uses_the_profile_percentile_only() -> None:
    c = cand("c", p50=4.0, p90=6.1, p99=9.0)
    assert check_constraints(c, Constraints(latency_percentile="p50", max_latency_ms=5.0)) == []
    (v,) = check_constraints(c, Constraints(max_latency_ms=5.0))  # p90 is the default
    assert v["metric"] == "latency_p90"
    assert v["message"] == "latency p90 6.10 ms > 5.00 ms"
    assert v["excess"] == pytest.approx(0.22)
    (v,) = check_constraints(c, Constraints(latency_percentile="p99", max_latency_ms=8.0))
    assert v["metric"] == "latency_p99" and v["value"] == 9.0


def test_size_is_in_decimal_megabytes() -> None:
    (v,) = check_constraints(cand("c", size=5_200_000), Constraints(max_model_size_mb=5.0))
    assert v["value"] == pytest.approx(5.2)
    assert v["message"] == "model size 5.20 MB > 5.00 MB"
    # 5 MiB is more than 5 MB
    assert check_constraints(cand("c", size=5 * 1024 * 1024), Constraints(max_model_size_mb=5.0))


def test_several_violations_are_all_reported() -> None:
    c = cand("c", p90=6.0, mem=200.0, size=3_000_000)
    c["metrics"]["accuracy_drop"] = 0.5
    cons = Constraints(max_latency_ms=5.0, max_peak_memory_mb=128, max_model_size_mb=4, max_accuracy_drop=1.0)
    assert [v["constraint"] for v in check_constraints(c, cons)] == ["max_latency_ms", "max_peak_memory_mb"]


def test_accuracy_drop_limit_zero_uses_value_as_excess() -> None:
    c = cand("c")
    c["metrics"]["accuracy_drop"] = 0.4
    (v,) = check_constraints(c, Constraints(max_accuracy_drop=0))
    assert v["excess"] == pytest.approx(0.4)
    c["metrics"]["accuracy_drop"] = 0.0
    assert check_constraints(c, Constraints(max_accuracy_drop=0)) == []


def test_missing_energy_with_energy_constraint_is_a_violation() -> None:
    (v,) = check_constraints(cand("c", energy=None), Constraints(max_energy_mj=10.0))
    assert v["constraint"] == "max_energy_mj"
    assert v["value"] is None and v["excess"] == math.inf
    assert "not measured" in v["message"]
    # without the constraint, missing energy is fine
    assert check_constraints(cand("c", energy=None), Constraints(max_latency_ms=10.0)) == []


def test_failed_candidates_are_never_feasible() -> None:
    cands = [cand("b", **BASE), cand("c1", "int8-static", status="failed", error="quantizer crashed")]
    cands[1]["metrics"] = {"accuracy": 0.99}  # partial metrics that would otherwise pass
    sel = select(cands, profile())
    assert judged(sel, "c1").verdict.feasible is False
    (v,) = judged(sel, "c1").verdict.violations
    assert v["constraint"] == "status"
    assert v["message"] == "candidate failed: quantizer crashed"
    assert sel.best is judged(sel, "b") and ids(sel.feasible) == ["b"]


@pytest.mark.parametrize("status", ["failed", None])
def test_missing_or_failed_baseline_is_a_run_error(status: str | None) -> None:
    cands = [cand("c1", "int8-static")]
    if status:
        cands.append(cand("b", status=status, error="export failed"))
    with pytest.raises(ValueError, match="no successful baseline"):
        select(cands, profile())


# --- Pareto front ---------------------------------------------------------------------------------


def front_set() -> list[dict[str, Any]]:
    """b: most accurate; a: fastest; s: smallest; p: middle ground; d: dominated by p; a2: identical to a."""
    return [
        cand("b", acc=0.99, p50=10.0, size=4_000_000, energy=5.0),
        cand("a", "int8-static", acc=0.98, p50=4.0, size=1_500_000, energy=2.0),
        cand("p", "prune-structured", acc=0.985, p50=6.0, size=2_000_000, energy=3.0),
        cand("d", "prune-unstructured", acc=0.97, p50=7.0, size=2_500_000, energy=4.0),
        cand("s", "prune-structured", "int8-static", acc=0.975, p50=5.0, size=1_000_000, energy=2.5),
        cand("a2", "int8-dynamic", acc=0.98, p50=4.0, size=1_500_000, energy=2.0),
    ]


def test_pareto_front_drops_dominated_keeps_ties_and_order() -> None:
    assert ids(pareto_front(front_set())) == ["b", "a", "p", "s", "a2"]


def test_pareto_front_ignores_an_objective_missing_for_any_candidate() -> None:
    cands = front_set()
    # d would be on the front by energy alone; with energy unknown for one candidate, energy is ignored
    cands[3]["metrics"]["energy_mj"] = 0.1
    assert "d" in ids(pareto_front(cands))
    cands[0]["metrics"]["energy_mj"] = None
    assert ids(pareto_front(cands)) == ["b", "a", "p", "s", "a2"]


def test_pareto_front_custom_objectives_and_edge_cases() -> None:
    cands = front_set()
    assert ids(pareto_front(cands, (("accuracy", "max"),))) == ["b"]
    assert ids(pareto_front(cands, (("size_bytes", "min"),))) == ["s"]
    assert pareto_front([]) == []
    assert ids(pareto_front(cands[:1])) == ["b"]


# --- objective pick and tie-breaks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "expected"),
    [("latency_p50", "a"), ("size_bytes", "s"), ("accuracy", "b"), ("energy_mj", "a")],
)
def test_objective_decides_the_pick(metric: str, expected: str) -> None:
    sel = select(front_set(), profile(metric))
    assert isinstance(sel, Selection)
    assert sel.best is not None and sel.best.id == expected
    assert sel.baseline.id == "b"
    assert ids(sel.front) == ["b", "a", "p", "s", "a2"]
    assert len(sel.candidates) == 6 and all(c.verdict is not None for c in sel.candidates)


def test_constraints_narrow_the_pick() -> None:
    # a is fastest but loses too much accuracy; p is the fastest within 0.5 points
    sel = select(front_set(), profile("latency_p50", max_accuracy_drop=0.5))
    assert sel.best is not None and sel.best.id == "p"
    assert ids(sel.feasible) == ["b", "p"]


def test_objective_outside_default_objectives_is_honoured() -> None:
    # q has the best p90 but a worse p50 than r, and ties everything else: it must still win on p90.
    cands = [
        cand("b", **BASE),
        cand("q", "t", p50=5.0, p90=5.5),
        cand("r", "t", p50=4.0, p90=6.0),
    ]
    assert select(cands, profile("latency_p90")).best.id == "q"
    assert select(copy.deepcopy(cands), profile("latency_p50")).best.id == "r"


@pytest.mark.parametrize(
    ("x", "y", "expected", "order"),
    [
        # equal latency: the smaller wins, though less accurate (x is more accurate, so both stay on the front)
        ({"acc": 0.985, "size": 3_000_000, "energy": 2.0}, {"acc": 0.98, "size": 2_000_000, "energy": 1.0}, "y", None),
        # equal latency and size (within 1%): the more accurate wins (y uses more energy, so both stay on the front)
        ({"acc": 0.985, "size": 2_010_000, "energy": 1.0}, {"acc": 0.98, "size": 2_000_000, "energy": 2.0}, "x", None),
        # identical: lower id wins
        ({}, {}, "c05", None),
        # a profile that orders accuracy first: the more accurate wins, though larger
        ({"acc": 0.985, "size": 3_000_000, "energy": 2.0}, {"acc": 0.98, "size": 2_000_000, "energy": 1.0}, "x",
         ["accuracy", "size"]),
    ],
    ids=["size", "accuracy", "id", "accuracy-first"],
)
def test_tie_break_order(x: dict[str, Any], y: dict[str, Any], expected: str, order: list[str] | None) -> None:
    cx, cy = cand("c09", "t", p50=3.0, **x), cand("c05", "t", p50=3.0, **y)
    expected_id = {"x": "c09", "y": "c05"}.get(expected, expected)
    prof = profile("latency_p50")
    if order:
        prof = Profile.model_validate({**prof.model_dump(), "objective": {"metric": "latency_p50", "tie_break": order}})
    sel = select([cand("b", **BASE), cx, cy], prof)
    assert {"c09", "c05"} <= set(ids(sel.front))
    assert sel.best is not None and sel.best.id == expected_id


# --- no feasible candidate -------------------------------------------------------------------------


def test_no_feasible_candidate_names_the_closest() -> None:
    cands = [
        cand("c001", **BASE),  # latency p90 12.0: 140% over
        cand("c004", "int8-static", p90=6.1),  # 22% over
        cand("c005", "prune-structured", p90=5.5, mem=300.0),  # 10% over latency, but 200% over memory
        cand("c006", "int8-dynamic", status="failed", error="boom"),
    ]
    with pytest.raises(NoFeasibleCandidate) as info:
        select(cands, profile("latency_p50", max_latency_ms=5.0, max_peak_memory_mb=100.0))
    message = str(info.value)
    assert message == (
        "no candidate met the profile 'rpi4'; closest: c004 (int8-static) broke max_latency_ms: "
        "latency p90 6.10 ms > 5.00 ms (22% over)"
    )
    sel = info.value.selection
    assert isinstance(sel, Selection)
    assert sel.best is None and sel.feasible == [] and sel.front == []
    assert sel.baseline.id == "c001"
    assert [c.verdict.feasible for c in sel.candidates] == [False] * 4
    assert all(c.verdict.violations for c in sel.candidates)


def test_no_feasible_names_worst_violation_and_counts_the_rest() -> None:
    cands = [cand("b", **BASE)]
    with pytest.raises(NoFeasibleCandidate) as info:
        select(cands, profile(max_latency_ms=11.0, max_peak_memory_mb=100.0))
    assert "closest: b (baseline) broke max_peak_memory_mb: peak memory 150.00 MB > 100.00 MB (50% over)" in str(
        info.value
    )
    assert str(info.value).endswith("and 1 more constraint")


def test_no_feasible_when_energy_is_not_measured() -> None:
    cands = [cand("b", **{**BASE, "energy": None})]
    with pytest.raises(NoFeasibleCandidate, match=r"broke max_energy_mj: energy not measured \(limit 10\.00 mJ\)$"):
        select(cands, profile(max_energy_mj=10.0))


def profile_with_tie(tie: float, metric: str = "latency_p50", **constraints: Any) -> Profile:
    prof = profile(metric, **constraints)
    return Profile.model_validate({**prof.model_dump(), "objective": {"metric": metric, "tie_within": tie}})


def test_tie_within_gives_latencies_inside_the_noise_to_the_more_accurate() -> None:
    # f is 2% faster than m but 0.6 points less accurate; s is 10% slower than f and the most accurate
    cands = [cand("b", **BASE), cand("f", "t", p50=3.00, p90=3.2, acc=0.974),
             cand("m", "t", p50=3.06, p90=3.3, acc=0.980), cand("s", "t", p50=3.30, p90=3.6, acc=0.985)]
    assert select(copy.deepcopy(cands), profile("latency_p50")).best.id == "f"
    assert select(copy.deepcopy(cands), profile_with_tie(0.03)).best.id == "m"
    assert select(copy.deepcopy(cands), profile_with_tie(0.01)).best.id == "f"
    assert select(copy.deepcopy(cands), profile_with_tie(0.15)).best.id == "s"
    # a tie never brings in an infeasible candidate: s is over a p90 limit of 3.4 ms
    assert select(copy.deepcopy(cands), profile_with_tie(0.15, max_latency_ms=3.4)).best.id == "m"


def test_tie_within_is_validated() -> None:
    with pytest.raises(ValueError, match="tie_within"):
        profile_with_tie(-0.1)
    with pytest.raises(ValueError, match="tie_within"):
        profile_with_tie(1.5)
