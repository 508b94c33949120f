"""The typed candidate record: results.json's shape in and out, unchanged; verdicts on copies."""

from __future__ import annotations

import copy
import json

import pytest

from orchestrator.search.record import CandidateRecord, Metrics, Pipeline, Step, Verdict

# the shapes a trial reports (orchestrator/search/trial.py) and a run stores, one per status
MEASURED = {
    "id": "c003", "pipeline": [{"technique": "prune-structured", "params": {"ratio": 0.5, "epochs": 4}}],
    "status": "ok", "error": None,
    "metrics": {"accuracy": 0.986, "size_bytes": 283015, "compressed_size_bytes": 255605,
                "latency_ms": {"p50": 0.437, "p90": 0.503, "p99": 0.561, "mean": 0.414, "std": 0.075, "cv": 0.181},
                "peak_memory_mb": 66.7, "model_memory_mb": 12.7, "energy_mj": 5.18, "energy_source": "estimated"},
    "device": "local:vm", "model_sha256": "ea" * 32,
    "timing": {"setup_s": 0.002, "build_s": 0.014, "measure_s": 0.429, "trial_s": 0.451},
    "build": {"prune-structured": 18.2, "export": 0.124},
    "cached": {"steps": ["prune-structured", "export"], "accuracy": True, "measurement": False},
    "measurement": {"runs": 200, "warmup_runs": 20, "noisy": True, "inputs_source": "sample", "emulated": False},
    "flags": ["thermal"],
}
REJECTED = {"id": "c004", "pipeline": [{"technique": "prune-structured", "params": {"ratio": 0.75}}],
            "status": "rejected", "error": "rejected before measuring: accuracy drop 40.00 points > 1.00",
            "metrics": {"accuracy": 0.59, "size_bytes": 90000, "compressed_size_bytes": 80000}, "device": None,
            "timing": {"trial_s": 1.0}, "model_sha256": "ab" * 32, "build": {}, "cached": {"steps": []}}
SKIPPED = {"id": "c005", "pipeline": [{"technique": "nas", "params": {"width": 64}}], "status": "skipped",
           "error": "skipped before training: predicted latency p90 9.00 ms > 2.00 ms", "metrics": {},
           "device": None, "timing": {}, "predicted_latency_ms": 9.0}
FAILED = {"id": "c006", "pipeline": [{"technique": "int8-static", "params": {}}], "status": "failed",
          "error": "RuntimeError: boom", "metrics": {}, "device": None, "timing": {"trial_s": 0.1}}
JUDGED = {**MEASURED, "metrics": {**MEASURED["metrics"], "accuracy_drop": 0.83},
          "violations": [], "feasible": True, "on_front": False}


@pytest.mark.parametrize("data", [MEASURED, REJECTED, SKIPPED, FAILED, JUDGED],
                         ids=["measured", "rejected", "skipped", "failed", "judged"])
def test_a_record_reads_and_writes_results_json_unchanged(data: dict) -> None:
    given = copy.deepcopy(data)
    record = CandidateRecord.from_json(data)
    assert record.to_json() == given
    assert data == given  # reading does not change the dict
    assert json.loads(json.dumps(record.to_json())) == given


def test_typed_fields_read_what_selection_needs() -> None:
    record = CandidateRecord.from_json(MEASURED)
    assert record.pipeline == Pipeline((Step("prune-structured", {"ratio": 0.5, "epochs": 4}),))
    assert record.label == "prune-structured" and not record.is_baseline
    assert record.value("latency_p90") == 0.503 and record.value("size_bytes") == 283015.0
    assert record.value("energy_mj") == 5.18 and record.value("accuracy_drop") is None
    assert record.measurement["inputs_source"] == "sample"
    with pytest.raises(ValueError, match="unknown metric"):
        record.value("speed")
    assert CandidateRecord.from_json({"id": "c000", "pipeline": []}).label == "baseline"


def test_a_verdict_annotates_a_copy() -> None:
    record = CandidateRecord.from_json(MEASURED)
    judged = record.with_verdict(Verdict(True, (), on_front=True), accuracy_drop=0.5)
    assert record.verdict is None and record.metrics.accuracy_drop is None
    out = judged.to_json()
    assert out["feasible"] is True and out["on_front"] is True and out["violations"] == []
    assert out["metrics"]["accuracy_drop"] == 0.5
    # no front (nothing feasible): the JSON has no on_front, as before
    assert "on_front" not in record.with_verdict(Verdict(False, ())).to_json()


def test_unknown_keys_are_kept() -> None:
    data = {**FAILED, "metrics": {"accuracy": 0.9, "size_bytes": 1, "compressed_size_bytes": None, "npu_ms": 3.0},
            "future_key": {"x": 1}}
    assert CandidateRecord.from_json(data).to_json() == data
    assert Metrics.from_json(data["metrics"]).extra == {"npu_ms": 3.0}
