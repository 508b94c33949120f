"""report.html, checked from inside a real headless Chromium: plots drawn, every candidate in the table."""

from __future__ import annotations

import copy

import pytest

from orchestrator.report.render import write_report
from tests.helpers.browser import CHROMIUM, REPORT_CHECK, run_in_page


def _cand(cid, pipeline, acc, p50, size, feasible=True, on_front=False, status="ok"):
    metrics = {} if status != "ok" else {
        "accuracy": acc, "accuracy_drop": round((0.99 - acc) * 100, 2), "size_bytes": size,
        "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3}, "peak_memory_mb": 80.0,
        "energy_mj": p50 * 12.5, "energy_source": "estimated",
    }
    return {"id": cid, "pipeline": [{"technique": t, "params": {}} for t in pipeline], "status": status,
            "error": None if status == "ok" else "RuntimeError: boom", "metrics": metrics, "feasible": feasible,
            "violations": [] if feasible else [{"constraint": "max_latency_ms", "message": "latency p90 too high"}],
            "on_front": on_front, "build": {"export": 0.2}, "device": "local:test"}


@pytest.fixture
def results():
    cands = [
        _cand("c000", [], 0.99, 1.0, 1_000_000, on_front=True),
        _cand("c001", ["int8-static"], 0.985, 0.6, 300_000, on_front=True),
        _cand("c002", ["int8-static"], 0.97, 0.7, 310_000),
        _cand("c003", ["int8-dynamic"], 0.98, 6.0, 300_000, feasible=False),
        _cand("c004", ["prune-structured"], None, None, None, feasible=False, status="failed"),
    ]
    return {"run_id": "r1", "status": "finished", "message": None, "profile": "rpi4", "profile_path": "rpi4.yaml",
            "task": "digits", "device": {"name": "pi-1", "transport": "qemu", "arch": "aarch64", "emulated": True},
            "constraints": {"max_latency_ms": 5.0, "latency_percentile": "p90"},
            "objective": {"metric": "latency_p50", "goal": "minimize"},
            "baseline": cands[0], "best": cands[1], "candidates": cands}


def test_report_is_self_contained_and_marks_estimates(results, tmp_path):
    page = tmp_path / "report.html"
    write_report(results, page)
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text  # nothing fetched from anywhere
    assert "ESTIMATED" in text and "EMULATED" in text  # on the plot axes
    assert text.count('class="tag">estimated') >= 4 and 'class="tag">emulated' in text


def test_report_says_points_lost_or_gained(results, tmp_path):
    write_report(results, tmp_path / "lost.html")
    assert "(0.50 points lost)" in (tmp_path / "lost.html").read_text()
    results = copy.deepcopy(results)
    results["best"]["metrics"].update(accuracy=0.9928, accuracy_drop=-0.28)  # a student better than its teacher
    write_report(results, tmp_path / "gained.html")
    assert "(0.28 points gained)" in (tmp_path / "gained.html").read_text()


def test_report_without_a_pick_says_why(results, tmp_path):
    results = copy.deepcopy(results)
    results.update(best=None, status="no_feasible", message="no candidate met the profile 'rpi4'")
    write_report(results, tmp_path / "report.html")
    assert "no candidate met the profile" in (tmp_path / "report.html").read_text()


@pytest.mark.skipif(not CHROMIUM, reason="Debian's chromium is not installed (make test installs it as root)")
def test_report_renders_in_chromium(results, tmp_path):
    page = tmp_path / "report.html"
    write_report(results, page)
    check = run_in_page(page, REPORT_CHECK)
    assert "error" not in check, check
    assert len(check["plots"]) == 3  # latency, energy, size
    for plot in check["plots"]:
        assert plot["width"] > 200 and plot["height"] > 150
        groups = plot["groups"]
        for gid in ("points-feasible", "points-infeasible", "points-front", "points-baseline", "points-pick"):
            assert groups[gid]["width"] > 0 or groups[gid]["height"] > 0, (gid, groups)
        assert groups["points-feasible"]["children"] >= 1
    assert check["ids"] == ["c000", "c001", "c002", "c003", "c004"]
    assert check["sorted_by_accuracy"][:4] == ["c002", "c003", "c001", "c000"]
    assert check["external"] == 0


def test_report_shows_the_final_round_with_each_finalists_noise(results, tmp_path):
    """The decision's table: median, round-to-round CV and interval per finalist; a block from before the CV says '-'."""
    from orchestrator.search.final_round import decide

    rounds = {"c000": [1.00, 1.10, 0.90, 1.00], "c001": [0.60, 0.60, 0.60, 0.60], "c002": [0.70, 0.77, 0.63, 0.70]}
    results = copy.deepcopy(results)
    results["decision"] = decide(results["candidates"][:3], rounds, "c000", tie_within=0.03)
    write_report(results, tmp_path / "final.html")
    text = (tmp_path / "final.html").read_text()
    assert "CV across rounds" in text and "<td>0.0%</td>" in text and "<td>7.1%</td>" in text  # std / mean: 0 for c001, 7.1% for c000 and c002
    for finalist in results["decision"]["finalists"]:
        del finalist["cv"]
    write_report(results, tmp_path / "older.html")
    assert "<td>-</td>" in (tmp_path / "older.html").read_text()
