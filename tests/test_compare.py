"""`runs compare`: candidates are matched by pipeline, and the changes are what was measured."""

from orchestrator.cli.compare import compare_runs


def _cand(cid, technique, p50, acc=0.99):
    pipeline = [{"technique": technique, "params": {"per_channel": True}}] if technique else []
    return {"id": cid, "pipeline": pipeline, "status": "ok", "feasible": True,
            "metrics": {"accuracy": acc, "size_bytes": 1000, "latency_ms": {"p50": p50}, "energy_mj": None}}


def _run(rid, best, cands):
    return {"id": rid, "profile": "rpi4", "task": "digits", "status": "finished", "best_id": best, "candidates": cands}


def test_compare_matches_by_pipeline_not_by_id():
    a = _run("A", "c001", [_cand("c000", None, 2.0), _cand("c001", "int8-static", 1.0)])
    b = _run("B", "c001", [_cand("c000", "int8-static", 1.5), _cand("c001", None, 2.0), _cand("c002", "fp16", 1.8)])
    diff = compare_runs(a, b)
    rows = {r["pipeline"]: r for r in diff["shared"]}
    assert rows["int8-static"]["a"] == "c001" and rows["int8-static"]["b"] == "c000"
    assert rows["int8-static"]["metrics"]["latency_p50"] == {"a": 1.0, "b": 1.5, "relative_change": 0.5}
    assert rows["baseline"]["metrics"]["energy_mj"]["relative_change"] is None
    assert diff["only_in_b"] == ["c002"] and diff["only_in_a"] == []
    assert diff["same_pick"] is False  # A picked int8, B picked the baseline
