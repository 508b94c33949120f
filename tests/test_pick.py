"""A pick you can trust: known-good starting points first, accuracy before the device, a final round that decides.

Real Optuna / Ray Tune searchers driven directly, the real agent (`compare`) through the real
local transport and a real Ray lease, real ONNX models whose speeds really differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from orchestrator import DeviceFacts, Technique, choice
from orchestrator.config.profile import Profile
from orchestrator.devices.local import local_device
from orchestrator.fleet.lease import DeviceLease
from orchestrator.search.final_round import choose_finalists, decide, run_final_round
from orchestrator.search.record import CandidateRecord
from orchestrator.search.searcher import make_searcher, point_config
from orchestrator.search.selection import select
from orchestrator.search.starting import starting_points
from orchestrator.search.trial import accuracy_rejection, trial_values


def profile(**constraints: Any) -> Profile:
    return Profile.model_validate({
        "name": "pick-test",
        "hardware": {"arch": "x86_64", "cpu": "test", "cores": 2, "memory_mb": 4096},
        "objective": {"metric": "latency_p50", "tie_within": 0.02},
        "power": {"idle_watts": 2.0, "active_watts": 6.0, "source": "test"},
        "constraints": constraints,
        "measurement": {"warmup_runs": 5, "runs": 40, "time_budget_s": 2, "final_rounds": 9,
                        "final_time_budget_s": 4},
    })


class Quant(Technique):
    name, stage = "q", "graph"
    search_space: ClassVar = {"bits": choice([4, 8]), "mode": choice(["a", "b", "c"])}

    def recommended(self, device: DeviceFacts) -> list[dict[str, Any]]:
        return [{"bits": 8, "mode": "c" if device.has("avx512_vnni") else "b"}]


class Prune(Technique):
    name, stage = "p", "training"
    search_space: ClassVar = {"ratio": choice([0.25, 0.5, 0.75])}

    def recommended(self, device: DeviceFacts) -> list[dict[str, Any]]:
        return [{"ratio": 0.5}, {"ratio": 0.9}]  # the second is outside the space: skipped


class Silent(Technique):
    name, stage = "s", "graph"
    search_space: ClassVar = {"x": choice([1, 2])}


def _space() -> list[list[dict[str, Any]]]:
    q = [{"technique": "q", "params": {"bits": b, "mode": m}} for b in (4, 8) for m in "abc"]
    p = [{"technique": "p", "params": {"ratio": r}} for r in (0.25, 0.5, 0.75)]
    s = [{"technique": "s", "params": {"x": x}} for x in (1, 2)]
    return [[]] + [[x] for x in q + p + s] + [[a, b] for a in p for b in q]


def test_starting_points_are_the_recommendations_alone_then_combined() -> None:
    vnni = DeviceFacts("x86_64", frozenset({"avx2", "avx512_vnni"}))
    points = starting_points([Quant(), Prune(), Silent()], _space(), vnni, max_pipeline_length=2)
    q8c = {"technique": "q", "params": {"bits": 8, "mode": "c"}}
    p50 = {"technique": "p", "params": {"ratio": 0.5}}
    assert points == [[], [q8c], [p50], [p50, q8c]]
    plain = starting_points([Quant(), Prune()], _space(), DeviceFacts("x86_64"), max_pipeline_length=1)
    assert plain == [[], [{"technique": "q", "params": {"bits": 8, "mode": "b"}}], [p50]]  # the device decides


class Settings(Technique):
    """A graph step that comes last (as ort-session does), recommended at x=2."""

    name, stage = "s", "graph"
    search_space: ClassVar = {"x": choice([1, 2])}

    def recommended(self, device: DeviceFacts) -> list[dict[str, Any]]:
        return [{"x": 2}]


def test_two_graph_recommendations_combine_last_in_the_order_the_space_allows() -> None:
    q8b = {"technique": "q", "params": {"bits": 8, "mode": "b"}}
    s2 = {"technique": "s", "params": {"x": 2}}
    space = _space() + [[q8b, s2], [{"technique": "q", "params": {"bits": 4, "mode": "a"}}, s2]]
    points = starting_points([Settings(), Quant()], space, DeviceFacts("x86_64"), max_pipeline_length=2)
    # singles first, then q -> s (in the space); s -> q is not in the space, so never proposed
    assert points == [[], [s2], [q8b], [q8b, s2]]
    assert starting_points([Settings(), Quant()], space, DeviceFacts("x86_64"), max_pipeline_length=1) == \
        [[], [s2], [q8b]]


def test_recommended_configurations_are_evaluated_first_then_the_sampler_explores() -> None:
    space = _space()
    first = starting_points([Quant(), Prune(), Silent()], space, DeviceFacts("x86_64", frozenset({"avx512_vnni"})), 2)
    prof = profile(max_accuracy_drop=1.0)
    searcher, _, _, _ = make_searcher(space, 8, 3, profile=prof, first=first)
    suggested = []
    for i in range(6):
        config = searcher.suggest(f"t{i}")
        suggested.append(config)
        record = {"pipeline": [], "status": "ok", "metrics": {"accuracy": 0.9, "size_bytes": 10,
                                                              "latency_ms": {"p50": 1.0 + i, "p90": 1.0, "p99": 1.0}}}
        searcher.on_trial_complete(f"t{i}", {**trial_values(record, prof), "record": "{}"})
    flat = [{k: v for k, v in point_config(p).items()} for p in first]
    assert [{k: c[k] for k in f} for c, f in zip(suggested, flat)] == flat
    done = {repr(sorted(t.params.items())) for t in searcher._ot_study.trials if t.state.name == "COMPLETE"}
    assert len(done) == 6  # the sampler went on after the starting points (repeats are told as copies)


def test_grid_puts_the_starting_points_first() -> None:
    space = _space()[:6]
    first = [space[4], space[2]]
    make_searcher(space, 100, 0, profile=profile(), first=first)
    assert space[:2] == first  # the grid's trial indexes follow this order


def test_a_candidate_over_the_accuracy_limit_is_rejected_before_measuring() -> None:
    prof = profile(max_accuracy_drop=1.0)
    assert accuracy_rejection(0.985, 0.99, prof) is None  # 0.5 points: allowed
    reason = accuracy_rejection(0.95, 0.99, prof)
    assert reason and "rejected before measuring: accuracy drop 4.00 points > 1.00" in reason
    assert "quality drop 4.00 points > 1.00 (cosine 0.9500, baseline 0.9900)" in accuracy_rejection(0.95, 0.99, prof,
                                                                                                    "cosine")
    assert accuracy_rejection(0.5, 0.99, profile()) is None  # no limit, nothing to refuse
    rejected = {"id": "c001", "pipeline": [{"technique": "p", "params": {}}], "status": "rejected", "error": reason,
                "metrics": {"accuracy": 0.95, "size_bytes": 10}}
    values = trial_values(rejected, prof)
    assert values["accuracy"] == 0.95 and values["latency_p50"] > 1e9  # the sampler learns it is no good
    base = {"id": "c000", "pipeline": [], "status": "ok",
            "metrics": {"accuracy": 0.99, "size_bytes": 40, "latency_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0}}}
    sel = select([base, rejected], prof)
    verdict = sel.verdicts()["c001"]
    assert not verdict.feasible and verdict.violations[0]["constraint"] == "max_accuracy_drop"
    assert sel.best is not None and sel.best.id == "c000"


@pytest.mark.slow
def test_an_accuracy_infeasible_candidate_is_never_sent_to_a_device(tmp_path, ray_local, monkeypatch) -> None:
    """A real search where every compressed candidate breaks the accuracy limit: none is measured.

    The limit is made unreachable by raising the baseline's reference accuracy (a fault injected at
    the one place it is computed); the baseline itself is the reference and is always measured.
    """
    import yaml

    from orchestrator import run as run_module
    from orchestrator.config.profile import load_profile
    from orchestrator.hooks.manager import get_plugin_manager

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "device_profiles" / "x86-host.yaml").read_text())
    data["name"] = "pick-rejects"
    data["search"].update(techniques=["int8-static"], max_pipeline_length=1, trials=3)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(run_module, "_baseline_accuracy", lambda *args: (1.5, None))  # 150%: nothing is within 1 point
    outcome = run_module.execute_run(load_profile(path), get_plugin_manager(),
                                     run_module.RunOptions(trials=3, out_dir=tmp_path / "runs"))
    by_status = {c["id"]: c["status"] for c in outcome.candidates}
    assert sorted(by_status.values()) == ["ok", "rejected", "rejected"], by_status
    for c in outcome.candidates:
        if c["status"] == "rejected":
            assert c["device"] is None and "latency_ms" not in c["metrics"] and "measurement" not in c
            assert c["error"].startswith("rejected before measuring: accuracy drop") and not c["feasible"]
        else:
            assert c["pipeline"] == [] and c["metrics"]["latency_ms"]["p50"] > 0
    assert outcome.results["best"]["pipeline"] == []


# ----------------------------------------------------------------------------- the final round


def _matmul_model(n: int, path: Path, repeats: int = 1) -> bytes:
    rng = np.random.default_rng(n)
    nodes, inits, prev = [], [], "x"
    for i in range(repeats):
        inits.append(numpy_helper.from_array(rng.random((n, n), dtype=np.float32) / n, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["logits"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    path.write_bytes(data)
    return data


def _record(cid: str, sha: str, p50: float, acc: float, size: int, pipeline: list) -> dict[str, Any]:
    return {"id": cid, "pipeline": pipeline, "status": "ok", "model_sha256": sha,
            "metrics": {"accuracy": acc, "size_bytes": size, "latency_ms": {"p50": p50, "p90": p50, "p99": p50}}}


def test_the_final_round_picks_the_truly_faster_model_when_single_measurements_were_swapped(tmp_path, ray_local):
    import hashlib

    models = tmp_path / "models"
    models.mkdir()
    shas = {}
    for name, n, repeats in (("base", 256, 6), ("slow", 256, 3), ("fast", 64, 1)):
        data = _matmul_model(n, tmp_path / f"{name}.onnx", repeats)
        sha = hashlib.sha256(data).hexdigest()
        (models / f"{sha}.onnx").write_bytes(data)
        shas[name] = sha
    step = [{"technique": "q", "params": {}}]
    # injected noise: the search's single measurements say "slow" is the fastest
    records = [_record("c000", shas["base"], 3.0, 0.99, 3000, []),
               _record("c001", shas["slow"], 0.10, 0.99, 2000, step),
               _record("c002", shas["fast"], 0.90, 0.99, 1000, step + step)]
    prof = profile(max_accuracy_drop=1.0)
    selection = select(records, prof)  # the run's one selection: the final round is handed it
    assert selection.best.id == "c001"  # what a single measurement would pick
    lease = ray_local.remote(DeviceLease).remote(local_device(), prof)
    block = run_final_round(selection, prof, lease, models)
    ray_local.kill(lease)
    assert block["pick"] == "c002", block
    assert block["rounds"] >= 3 and {f["id"] for f in block["finalists"]} == {"c000", "c001", "c002"}
    assert block["vs_baseline"]["low"] > 1.0 and "c002 is" in block["sentence"] and "95%" in block["sentence"]


def test_a_tie_goes_to_the_more_accurate() -> None:
    rng = np.random.default_rng(0)
    noise = lambda: list(1.0 + 0.2 * rng.random(20))
    contenders = [
        {"id": "c000", "pipeline": [], "metrics": {"accuracy": 0.99, "size_bytes": 4000}},
        {"id": "c001", "pipeline": [{"technique": "a"}], "metrics": {"accuracy": 0.97, "size_bytes": 1000}},
        {"id": "c002", "pipeline": [{"technique": "b"}], "metrics": {"accuracy": 0.985, "size_bytes": 1000}},
    ]
    rounds = {"c000": [3.0 + x for x in noise()], "c001": noise(), "c002": noise()}
    block = decide(contenders, rounds, "c000", tie_within=0.02)
    assert set(block["tied_with_leader"]) | {block["leader"]} == {"c001", "c002"}
    assert block["pick"] == "c002"  # within the noise of the fastest, and more accurate
    if block["leader"] == "c001":
        assert block["tie_broken_by"] == "accuracy" and "1.50 points more accurate" in block["sentence"]
    rounds["c001"] = [x * 0.5 for x in rounds["c001"]]  # now really twice as fast: accuracy no longer decides
    assert decide(contenders, rounds, "c000", tie_within=0.02)["pick"] == "c001"


def test_a_negligible_quality_or_size_difference_does_not_decide_a_tie() -> None:
    """Cosine 0.9941 vs 0.9939 and 22.8 vs 22.9 MB are no better than the noise: the faster median wins."""
    contenders = [
        {"id": "c000", "pipeline": [], "metrics": {"accuracy": 1.0, "size_bytes": 90_400_000}},
        {"id": "c002", "pipeline": [{"technique": "a"}], "metrics": {"accuracy": 0.9939, "size_bytes": 22_900_000}},
        {"id": "c010", "pipeline": [{"technique": "b"}], "metrics": {"accuracy": 0.9941, "size_bytes": 22_800_000}},
    ]
    # c010's median is 10% slower, but its rounds scatter so much that the lead is inside the noise
    rounds = {"c000": [2.0] * 12, "c002": [1.0] * 12,
              "c010": [0.8, 1.4, 0.9, 1.3, 1.0, 1.2, 0.85, 1.35, 0.95, 1.25, 1.1, 1.1]}
    block = decide(contenders, rounds, "c000", tie_within=0.03)
    assert block["leader"] == "c002" and block["tied_with_leader"] == ["c010"]
    assert block["pick"] == "c002"
    cv = {f["id"]: f["cv"] for f in block["finalists"]}  # round to round, what the report shows per finalist
    assert cv["c002"] == 0.0 and cv["c010"] == round(float(np.std(rounds["c010"]) / np.mean(rounds["c010"])), 4) > 0.1
    contenders[2]["metrics"]["accuracy"] = 0.9955  # 0.14 points more accurate: that decides the tie
    assert decide(contenders, rounds, "c000", tie_within=0.03)["pick"] == "c010"
    contenders[2]["metrics"].update(accuracy=0.9939, size_bytes=11_000_000)  # as accurate, half the size
    block = decide(contenders, rounds, "c000", tie_within=0.03)
    assert block["pick"] == "c010" and block["tie_broken_by"] == "size"
    assert "it ties on latency with the fastest, c002, within the noise" in block["sentence"]
    assert "and is 2.08x smaller (as accurate; rule: size first)" in block["sentence"], block["sentence"]
    # as small (within 1%): the next rule, accuracy, decides, and the sentence says both rules
    contenders[2]["metrics"].update(accuracy=0.9955, size_bytes=22_900_000)
    block = decide(contenders, rounds, "c000", tie_within=0.03)
    assert block["pick"] == "c010" and block["tie_broken_by"] == "accuracy"
    assert "is 0.16 points more accurate (as small; rule: size, then accuracy)" in block["sentence"], block["sentence"]


def _baseline_tie() -> tuple[list[dict], dict[str, list[float]]]:
    """The issue's case: fp32 and an int8 model 3.9x smaller, at the same speed within the noise."""
    rng = np.random.default_rng(1)
    contenders = [
        {"id": "c000", "pipeline": [], "metrics": {"accuracy": 1.0, "size_bytes": 88_300_000}},
        {"id": "c010", "pipeline": [{"technique": "int8-dynamic"}], "metrics": {"accuracy": 0.9916,
                                                                               "size_bytes": 22_400_000}},
    ]
    base = 23.0 + rng.normal(0, 1.0, 20)
    rounds = {"c000": list(base), "c010": list(base * 1.03 + rng.normal(0, 1.0, 20))}
    return contenders, rounds


def test_a_tie_with_the_baseline_goes_to_the_smaller_candidate() -> None:
    contenders, rounds = _baseline_tie()
    block = decide(contenders, rounds, "c000", tie_within=0.02)
    assert block["leader"] == "c000" and block["tied_with_leader"] == ["c010"], block
    assert block["pick"] == "c010" and block["tie_broken_by"] == "size"
    assert block["tie"]["size_ratio"] == round(88.3 / 22.4, 4) and block["tie"]["accuracy_points"] == -0.84
    assert block["sentence"].startswith("c010 ties on latency with the baseline c000 within the noise"), block
    assert "and is 3.94x smaller (0.84 points less accurate; rule: size first)" in block["sentence"], block["sentence"]
    assert block["tie_break"] == ["size", "accuracy"] and "the smaller (by 1% or more), then" in block["rule"]


def test_a_profile_that_orders_accuracy_first_keeps_the_more_accurate() -> None:
    contenders, rounds = _baseline_tie()
    block = decide(contenders, rounds, "c000", tie_within=0.02, tie_break=["accuracy", "size"])
    assert block["pick"] == "c000" and "tie_broken_by" not in block
    assert "c000 (the baseline) was not measurably beaten" in block["sentence"]
    assert block["rule"].index("more accurate") < block["rule"].index("smaller")
    # and through a profile: the field is validated and reaches the selection's own tie rule
    raw = profile().model_dump()
    prof = Profile.model_validate({**raw, "objective": {**raw["objective"], "tie_break": ["accuracy"]}})
    assert prof.objective.tie_break == ["accuracy"] and profile().objective.tie_break == ["size", "accuracy"]
    for bad in (["size", "size"], ["speed"], []):
        with pytest.raises(ValueError, match="tie_break"):
            Profile.model_validate({**raw, "objective": {**raw["objective"], "tie_break": bad}})


def test_a_baseline_outside_the_profile_is_a_reference_and_the_sentence_says_so() -> None:
    """The baseline over the size cap is fastest, but cannot lead: the pick is the fastest feasible one."""
    contenders = [
        {"id": "c000", "pipeline": [], "metrics": {"accuracy": 1.0, "size_bytes": 88_300_000}},
        {"id": "c015", "pipeline": [{"technique": "fp16"}], "metrics": {"accuracy": 0.999, "size_bytes": 44_000_000}},
        {"id": "c016", "pipeline": [{"technique": "x"}], "metrics": {"accuracy": 0.999, "size_bytes": 40_000_000}},
    ]
    rounds = {"c000": [10.0] * 12, "c015": [18.5] * 12, "c016": [30.0] * 12}
    block = decide(contenders, rounds, "c000", tie_within=0.02,
                   outside={"c000": "model size 88.30 MB > 50.00 MB"})
    assert block["leader"] == "c015" and block["pick"] == "c015"
    assert "the baseline is outside the profile (model size 88.30 MB > 50.00 MB), a reference only" in block["sentence"]
    assert "c015 is 1.85x slower than the baseline c000" in block["sentence"]
    assert "was not measurably beaten" not in block["sentence"]


def test_finalists_are_the_best_feasible_on_the_objective_plus_the_baseline() -> None:
    base = _record("c000", "x", 3.0, 0.99, 10, [])
    others = [_record(f"c00{i}", "x", float(i), 0.99, 10, [{"technique": "t"}]) for i in range(1, 6)]
    base, *others = map(CandidateRecord.from_json, [base, *others])
    got = choose_finalists([base, *others], base, "latency_p50", False, 3)
    assert [c.id for c in got] == ["c001", "c002", "c003", "c000"]


def test_builtin_recommendations_are_valid_and_follow_the_device(eo_recommendations) -> None:
    from orchestrator.hooks.manager import get_plugin_manager

    registry = get_plugin_manager()
    int8 = eo_recommendations(registry.technique("int8-static"))
    assert int8["x86-64 AVX2"][0]["activations"] == "uint8" and int8["x86-64 AVX2"][0]["reduce_range"] is True
    assert int8["x86-64 AVX-512 VNNI"][0]["reduce_range"] is False  # VNNI does not saturate: full range
    assert int8["Cortex-A76 (rpi5)"][0]["activations"] == "int8"  # S8S8 with the dot product
    assert int8["Jetson CUDA"] == []
    fp16 = eo_recommendations(registry.technique("fp16"))
    assert fp16["x86-64 AVX2"] == [] and fp16["Cortex-A76 (rpi5)"] and fp16["Jetson TensorRT"]
    assert eo_recommendations(registry.technique("int8-dynamic"))["x86-64 AVX2"] == []
    prune = eo_recommendations(registry.technique("prune-structured"))
    assert all(p and p[0]["epochs"] >= 1 for p in prune.values())  # never pruning without fine-tuning
    session = eo_recommendations(registry.technique("ort-session"))
    assert session["x86-64 AVX2"] == [] and session["Jetson CUDA"] == []  # model unknown, or a GPU
    for label in ("x86-64 AVX-512 VNNI, transformer", "Cortex-A76 (rpi5), transformer"):
        assert [p["denormal_as_zero"] for p in session[label]] == [True]
        assert eo_recommendations(registry.technique("int8-dynamic"))[label][0]["per_channel"] is True


def test_a_slower_comparison_reads_as_a_slowdown_with_its_interval_inverted() -> None:
    from orchestrator.search.final_round import _x

    assert _x({"speedup": 1.58, "low": 1.49, "high": 1.66}) == ("1.58x faster than", "1.49–1.66")
    assert _x({"speedup": 0.9, "low": 0.86, "high": 0.97}) == ("1.11x slower than", "1.03–1.16")
