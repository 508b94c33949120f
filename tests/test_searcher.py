"""The Optuna side of the search: what trials report, constraints reaching the sampler, warm start.

Real Optuna and Ray Tune's OptunaSearch, driven directly (suggest / on_trial_complete) without
running trials; the end-to-end searches are in test_e2e.py and test_cache_resume.py.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any, Callable

import pytest

from orchestrator.config.profile import Profile
from orchestrator.search.ray_runtime import Interrupts
from orchestrator.search.searcher import make_searcher
from orchestrator.search.trial import WORST, search_limits, search_objectives, trial_values


def profile(metric: str = "latency_p50", **constraints: Any) -> Profile:
    return Profile.model_validate({
        "name": "test",
        "hardware": {"arch": "x86_64", "cpu": "test", "cores": 2, "memory_mb": 4096},
        "objective": {"metric": metric},
        "power": {"idle_watts": 2.0, "active_watts": 6.0, "source": "test"},
        "constraints": constraints,
    })


def record(acc: float = 0.97, p50: float = 2.0, p90: float = 2.5, size: int = 1_000_000,
           status: str = "ok", pipeline: list | None = None) -> dict[str, Any]:
    return {"pipeline": pipeline if pipeline is not None else [{"technique": "q", "params": {"bits": 8}}],
            "status": status,
            "metrics": {} if status != "ok" else {
                "accuracy": acc, "size_bytes": size, "peak_memory_mb": 50.0, "energy_mj": 1.5,
                "latency_ms": {"p50": p50, "p90": p90, "p99": 3.0}}}


def test_trial_values_report_every_metric_and_the_device_limits() -> None:
    prof = profile(max_latency_ms=2.0, max_accuracy_drop=1.0, max_model_size_mb=5.0)
    assert search_limits(prof) == ["max_latency_ms", "max_model_size_mb"]  # accuracy is an objective instead
    values = trial_values(record(acc=0.97, p90=2.5, size=6_000_000), prof)
    assert values["accuracy"] == 0.97 and values["latency_p50"] == 2.0 and values["size_bytes"] == 6_000_000
    assert values["constraints"] == pytest.approx([0.25, 0.2])  # p90 2.5 ms over 2.0; 6 MB over 5
    assert trial_values(record(acc=0.5, p90=1.9), prof)["constraints"] == [0.0, 0.0]
    failed = trial_values(record(status="failed"), prof)
    assert failed["accuracy"] == 0.0 and failed["latency_p50"] == WORST and failed["constraints"] == [WORST] * 2


def test_objectives_follow_the_profile() -> None:
    assert search_objectives(profile("energy_mj")) == [("accuracy", "max"), ("energy_mj", "min")]
    assert search_objectives(profile("latency_p90")) == [("accuracy", "max"), ("latency_p90", "min")]
    assert search_objectives(profile("accuracy")) == [("accuracy", "max"), ("latency_p50", "min")]


CANDIDATES = [[]] + [[{"technique": "q", "params": {"bits": b, "mode": m}}] for b in (4, 8) for m in ("a", "b", "c")] \
    + [[{"technique": "p", "params": {"ratio": r}}] for r in (0.25, 0.5, 0.75)]


def test_constraints_reach_optuna() -> None:
    prof = profile(max_latency_ms=2.0, max_accuracy_drop=1.0)
    searcher, space, samples, labels = make_searcher(CANDIDATES, 4, 7, profile=prof)
    assert space == {} and samples == 4 * 4 + 8 and set(labels) == {"baseline", "q", "p"}
    assert searcher.metric == ["accuracy", "latency_p50"] and searcher.mode == ["max", "min"]
    first = searcher.suggest("t0")
    assert first == {"pipeline": "baseline"}  # the baseline is evaluated first
    searcher.on_trial_complete("t0", {**trial_values(record(acc=0.99, p90=3.0, pipeline=[]), prof),
                                      "record": "{}"})
    second = searcher.suggest("t1")
    searcher.on_trial_complete("t1", {**trial_values(record(acc=0.95, p90=1.0), prof), "record": "{}"})
    trials = searcher._ot_study.trials
    # latency p90 3.0 ms over 2.0 ms: 0.5 over; the accuracy drop is not a sampler constraint
    assert [t.constraints for t in trials] == [{"max_latency_ms": 0.5}, {"max_latency_ms": 0.0}]
    assert trials[1].params["pipeline"] == second["pipeline"]


def test_grid_when_the_space_fits_the_budget() -> None:
    searcher, space, samples, _ = make_searcher(CANDIDATES, len(CANDIDATES), 0, profile=profile())
    assert searcher is None and samples == 1 and "index" in space


def test_warm_start_tells_optuna_the_finished_trials_with_their_constraints() -> None:
    prof = profile(max_latency_ms=2.0)
    prior = [record(acc=0.99, p90=3.0, pipeline=[]),
             record(acc=0.98, p90=1.5, pipeline=[{"technique": "p", "params": {"ratio": 0.5}}]),
             record(status="failed", pipeline=[{"technique": "q", "params": {"bits": 4, "mode": "a"}}])]
    searcher, _, _, _ = make_searcher(CANDIDATES[3:], 3, 1, prior=prior, profile=prof)
    searcher.suggest("t0")  # the study is created on first use
    done = searcher._ot_study.trials[:2]  # what the run had (repeats proposed after them are told as copies)
    assert all(t.state.name == "COMPLETE" for t in done)
    # the baseline is not in what is left to try (a resumed run has it): Optuna is not told about it
    assert [t.params["pipeline"] for t in done] == ["p", "q"]
    assert [t.constraints for t in done] == [{"max_latency_ms": 0.0}, {"max_latency_ms": WORST}]
    assert done[0].values == [0.98, 2.0]


def test_a_repeated_proposal_is_asked_again_not_run() -> None:
    # a space of 4 candidates and a budget of 3: every suggestion must be a new configuration
    space = CANDIDATES[:1] + CANDIDATES[7:]
    searcher, _, _, _ = make_searcher(space, 3, 3, profile=profile())
    configs = []
    for i in range(4):
        config = searcher.suggest(f"t{i}")
        configs.append(json.dumps(config, sort_keys=True))
        searcher.on_trial_complete(f"t{i}", {**trial_values(record(acc=0.9 + i / 100), profile()),
                                             "record": "{}"})
    assert len(set(configs)) == 4, configs
    trials = searcher._ot_study.trials
    assert len(trials) > 4  # Optuna did propose repeats on the way
    first = {}
    for t in trials:  # each repeat was told what its configuration got the first time
        assert t.state.name == "COMPLETE"
        assert t.values == first.setdefault(json.dumps(t.params, sort_keys=True), t.values)


def test_a_repeat_is_told_the_values_of_its_finished_twin_and_nothing_while_that_runs() -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution

    from orchestrator.search.searcher import tell_repeat

    study = optuna.create_study(directions=["maximize", "minimize"])
    space = {"pipeline": CategoricalDistribution(["p", "q"])}
    running = study.ask(space)
    study.enqueue_trial(running.params)
    tell_repeat(study, study.ask(space))
    assert study.trials[1].state.name == "FAIL"  # its twin still runs: nothing is known yet
    running.set_constraint("max_latency_ms", 0.5)
    study.tell(running, [0.9, 3.0])
    study.enqueue_trial(running.params)
    tell_repeat(study, study.ask(space))
    told = study.trials[2]
    assert told.state.name == "COMPLETE" and told.values == [0.9, 3.0]
    assert told.constraints == {"max_latency_ms": 0.5}


def test_a_resumed_search_does_not_propose_what_the_run_already_has() -> None:
    prof = profile()
    prior = [record(acc=0.99, pipeline=[])] + [
        record(acc=0.98, pipeline=[{"technique": "p", "params": {"ratio": r}}]) for r in (0.25, 0.5)]
    space = CANDIDATES[7:]  # p with ratio 0.25, 0.5, 0.75
    for seed in range(6):  # without the run's trials counted as proposed, seeds 3 and 5 propose ratio 0.5
        searcher, _, _, _ = make_searcher(space, 1, seed, prior=prior, profile=prof)
        assert searcher.suggest("t0") == {"pipeline": "p", "p.ratio": 0.75}


def q(bits: int, mode: str) -> list[dict[str, Any]]:
    return [{"technique": "q", "params": {"bits": bits, "mode": mode}}]


def p(ratio: float) -> list[dict[str, Any]]:
    return [{"technique": "p", "params": {"ratio": ratio}}]


def test_the_feasible_starting_points_neighbours_come_every_other_proposal() -> None:
    prof = profile(max_accuracy_drop=1.0)
    first = [[], q(8, "a"), p(0.5)]
    searcher, _, _, _ = make_searcher(CANDIDATES, 8, 5, profile=prof, first=first)
    results = {json.dumps(q(8, "a")): record(acc=0.99, p50=1.0, pipeline=q(8, "a")),
               json.dumps(p(0.5)): {**record(pipeline=p(0.5), status="rejected"), "metrics": {"accuracy": 0.5}}}
    got = []
    for i in range(8):
        config = searcher.suggest(f"t{i}")
        steps = [] if config["pipeline"] == "baseline" else \
            [{"technique": config["pipeline"], "params": {k.split(".", 1)[1]: v for k, v in config.items()
                                                           if k != "pipeline"}}]
        got.append(steps)
        rec = results.get(json.dumps(steps), record(acc=0.99 if steps else 0.995, p50=2.0, pipeline=steps))
        searcher.on_trial_complete(f"t{i}", {**trial_values(rec, prof), "record": "{}"})
    assert got[:3] == first  # the starting points first, in order
    # then every other proposal is a neighbour of the feasible starting point (one parameter changed);
    # the pruning point was rejected for accuracy: its neighbours are left to the sampler
    neighbours = [q(4, "a"), q(8, "b"), q(8, "c")]
    assert got[3] == neighbours[0] and got[5] in neighbours[1:]
    assert all(n in got for n in neighbours)  # the last one by refinement or by the sampler before it
    assert searcher.refined in (2, 3) and len({json.dumps(g) for g in got}) == 8


def test_refinement_takes_the_feasible_starting_points_in_turn() -> None:
    from orchestrator.search.refine import Refinement, neighbours
    from orchestrator.search.searcher import point_config

    space = [point_config(c) for c in CANDIDATES]
    starts = [point_config(c) for c in ([], q(8, "a"), p(0.5))]
    assert neighbours(starts[2], space) == [point_config(p(0.25)), point_config(p(0.75))]
    assert neighbours(starts[0], space) == []  # the baseline has no parameter to change
    refinement = Refinement(space, starts)
    assert refinement.next(set()) is None  # nothing finished yet
    refinement.finished(starts[2], feasible=True)
    refinement.finished(starts[1], feasible=True)
    refinement.finished(point_config(q(4, "b")), feasible=True)  # not a starting point: no parent
    proposed = {json.dumps(point_config(q(4, "a")), sort_keys=True)}  # the sampler had proposed this one
    order = []
    while (config := refinement.next(proposed)) is not None:
        order.append(config)
        proposed.add(json.dumps(config, sort_keys=True))
    assert order == [point_config(c) for c in (q(8, "b"), p(0.25), q(8, "c"), p(0.75))]


def test_neighbours_vary_each_parameter_once_before_any_twice() -> None:
    from orchestrator.search.refine import neighbours
    from orchestrator.search.searcher import point_config

    def r(ratio: float, importance: str, epochs: int) -> dict[str, Any]:
        return point_config([{"technique": "r", "params": {"ratio": ratio, "importance": importance,
                                                           "epochs": epochs}}])

    space = [r(a, b, c) for a in (0.25, 0.5, 0.75) for b in ("l1", "l2") for c in (0, 1, 2, 4)]
    assert neighbours(r(0.5, "l1", 4), space) == [
        r(0.25, "l1", 4), r(0.5, "l2", 4), r(0.5, "l1", 2),  # one other value of each parameter
        r(0.75, "l1", 4), r(0.5, "l1", 1),  # then a second one (numbers: the nearest first)
        r(0.5, "l1", 0)]


def steps_of(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The pipeline a one-technique configuration stands for."""
    if config["pipeline"] == "baseline":
        return []
    return [{"technique": config["pipeline"],
             "params": {k.split(".", 1)[1]: v for k, v in config.items() if k != "pipeline"}}]


def drive(searcher: Any, outcome_of: Callable[[list], dict[str, Any]], prof: Profile, limit: int = 40) -> list:
    """Suggest and complete trials one at a time, as Tune does with one trial at once, until the searcher
    says it has nothing left (or `limit`); returns the pipelines it ran."""
    from ray.tune.search import Searcher

    ran = []
    for i in range(limit):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        steps = steps_of(config)
        ran.append(steps)
        rec = outcome_of(steps)
        searcher.on_trial_complete(f"t{i}", {**trial_values(rec, prof), "record": json.dumps(rec)})
    return ran


def rejected(steps: list, accuracy: float) -> dict[str, Any]:
    return {"pipeline": steps, "status": "rejected", "metrics": {"accuracy": accuracy},
            "error": f"rejected before measuring: quality drop {100 * (1 - accuracy):.2f} points > 1.00"}


def test_a_technique_whose_candidates_keep_being_rejected_is_ruled_out_after_the_third() -> None:
    # issue 29: q's candidates all collapse in quality; p's and the baseline are fine
    prof = profile(max_accuracy_drop=1.0)
    told: list[dict[str, Any]] = []
    first = [[], q(8, "a"), q(4, "a"), q(8, "b"), q(4, "b"), p(0.5)]  # a 4th q starting point is queued
    searcher, _, _, _ = make_searcher(CANDIDATES, 9, 2, profile=prof, first=first, quality="cosine",
                                      on_ruled_out=told.append)
    scores = iter([0.84, 0.74, 0.80, 0.5, 0.5, 0.5])

    def outcome_of(steps: list) -> dict[str, Any]:
        if steps and steps[0]["technique"] == "q":
            return rejected(steps, next(scores))
        return record(acc=0.99, pipeline=steps)

    ran = drive(searcher, outcome_of, prof)
    runs_of_q = [i for i, steps in enumerate(ran) if steps and steps[0]["technique"] == "q"]
    assert runs_of_q == [1, 2, 3]  # the three first q starting points; after the third, no q trial at all
    assert ran[:4] == first[:4] and ran[4] == p(0.5)  # the 4th q starting point was not run
    # what is left, the baseline and p's three ratios, ran; then the searcher said it had nothing more
    assert len(ran) == 7 and sorted(json.dumps(s) for s in ran[4:]) == sorted(
        json.dumps(s) for s in (p(0.25), p(0.5), p(0.75)))
    assert [t["message"] for t in told] == ["q ruled out: rejected for quality in 3 of 3 (cosine 0.7400–0.8400)"]
    entry = searcher.ruleout.ruled_out[0]
    assert entry["family"] == "q" and entry["reason"] == "quality" and entry["after_trials"] == 4
    assert entry["quality"] == {"metric": "cosine", "min": 0.74, "max": 0.84}
    assert entry["declined"] >= 1  # the queued q(4, b) at least: proposed, told to Optuna, never run
    declined = [t for t in searcher._ot_study.trials if t.params.get("pipeline") == "q"][3:]
    assert len(declined) == entry["declined"]
    assert all(t.state.name == "COMPLETE" and t.values[0] == 0.80 for t in declined)  # the last rejected's


def test_a_parameter_value_that_keeps_failing_alike_is_ruled_out_and_its_technique_is_not() -> None:
    prof = profile(max_accuracy_drop=1.0)
    space = [[]] + [q(b, m) for b in (2, 4, 8) for m in ("a", "b", "c")]
    told: list[dict[str, Any]] = []
    searcher, _, _, _ = make_searcher(space, 8, 0, profile=prof, first=[[], q(8, "b"), q(8, "a"), q(4, "b"),
                                                                          q(2, "b"), q(4, "c")],
                                      on_ruled_out=told.append)
    tensors = iter(range(100, 200))

    def outcome_of(steps: list) -> dict[str, Any]:
        if steps and steps[0]["params"]["mode"] == "b":  # the same cause, a different tensor each time
            return {"pipeline": steps, "status": "failed", "metrics": {},
                    "error": f"ValueError: entropy calibration cannot bin tensor {next(tensors)} (range 3.4e38)"}
        return record(acc=0.99, pipeline=steps)

    ran = drive(searcher, outcome_of, prof, limit=8)
    modes = [s[0]["params"]["mode"] if s else None for s in ran]
    assert modes[:5] == [None, "b", "a", "b", "b"] and "b" not in modes[5:]  # none after the third failure
    assert len(ran) == 8  # the budget is spent on what is left
    assert [t["family"] for t in told] == ["q(mode=b)"]  # q itself had a feasible member: never ruled out
    assert told[0]["reason"] == "failure" and told[0]["failed"] == 3 and told[0]["after_trials"] == 5
    assert told[0]["message"] == ("q(mode=b) ruled out: failed in 3 of 3 with the same cause "
                                  "(ValueError: entropy calibration cannot bin tensor 100 (range 3.4e38))")


def test_what_rules_a_family_out_and_what_does_not() -> None:
    from orchestrator.search.ruleout import RuleOut, outcome
    from orchestrator.search.searcher import point_config

    space = [point_config(c) for c in CANDIDATES]
    labels = {"baseline": [], "q": ["q"], "p": ["p"]}
    bad = rejected(q(4, "a"), 0.5)

    rule = RuleOut(labels, space)  # a feasible member first: q is never ruled out, 4 bits (none feasible) is
    rule.finished(point_config(q(8, "a")), outcome(record(pipeline=q(8, "a")), feasible=True))
    for config in (q(4, "a"), q(4, "b")):
        assert rule.finished(point_config(config), outcome(bad, feasible=False)) == []
    [entry] = rule.finished(point_config(q(4, "c")), outcome(bad, feasible=False))
    assert entry["family"] == "q(bits=4)" and entry["params"] == {"bits": 4}
    assert entry["message"] == "q(bits=4) ruled out: rejected for quality in 3 of 3 (accuracy 0.5000)"
    assert rule.covers(point_config(q(4, "a"))) is entry and rule.covers(point_config(q(8, "c"))) is None

    rule = RuleOut(labels, space)  # failures with different causes, and failed measurements, do not count
    errors = ["ValueError: entropy calibration cannot bin", "RuntimeError: out of memory",
              "measurement failed: device offline", "measurement failed: device offline",
              "measurement failed: device offline"]
    for config, error in zip([q(4, "a"), q(4, "b"), q(8, "a"), q(8, "b"), q(8, "c")], errors):
        failed = {"pipeline": config, "status": "failed", "error": error, "metrics": {}}
        assert rule.finished(point_config(config), outcome(failed, feasible=False)) == []
    assert rule.ruled_out == []

    rule = RuleOut(labels, space, after=2)  # RULE_OUT_AFTER is a parameter; two crashes are one cause
    rule.finished(point_config(p(0.25)), outcome(None, feasible=False))
    assert rule.covers(point_config(p(0.5))) is None
    [entry] = rule.finished(point_config(p(0.75)), outcome(None, feasible=False))
    assert entry["family"] == "p" and entry["message"].startswith("p ruled out: failed in 2 of 2 with the same")
    assert rule.covers(point_config(p(0.5))) is entry and rule.covers(point_config(q(8, "a"))) is None

    rule = RuleOut(labels, space)  # a technique that does not apply to the model: out at its first failure, alone
    first_line = ("CandidateBuildError: p: NotApplicable: the model has no nn.ModuleList of 2 or more blocks of one "
                  "class (transformer layers) to drop")
    [entry] = rule.finished(point_config(p(0.25)), outcome({"pipeline": p(0.25), "status": "failed", "metrics": {},
                                                            "error": first_line + "\nTraceback ..."}, feasible=False))
    assert entry["family"] == "p" and entry["reason"] == "not applicable" and entry["failed"] == 1
    assert entry["message"] == f"p ruled out: it does not apply to this model ({first_line})"
    assert rule.covers(point_config(p(0.5))) is entry and rule.covers(point_config(q(8, "a"))) is None
    other = {"pipeline": q(8, "a"), "status": "failed", "metrics": {}, "error": "CandidateBuildError: q: ValueError: x"}
    assert rule.finished(point_config(q(8, "a")), outcome(other, feasible=False)) == []  # a plain failure: 1 of 3


def test_refinement_skips_a_ruled_out_neighbour() -> None:
    from orchestrator.search.refine import Refinement
    from orchestrator.search.searcher import point_config

    space = [point_config(c) for c in CANDIDATES]
    refinement = Refinement(space, [point_config(q(8, "a"))])
    refinement.finished(point_config(q(8, "a")), feasible=True)
    out = point_config(q(4, "a"))  # its first neighbour, in a ruled-out family
    assert refinement.next(set(), allowed=lambda c: c != out) == point_config(q(8, "b"))


def test_a_searcher_that_rules_out_pickles_without_its_event_sink() -> None:
    import ray.cloudpickle as cloudpickle

    class Unpicklable:
        def __reduce__(self):
            raise TypeError("the terminal reporter cannot be pickled")

    sink = Unpicklable()
    searcher, _, _, _ = make_searcher(CANDIDATES, 4, 0, profile=profile(), on_ruled_out=lambda e: sink)
    copy = cloudpickle.loads(cloudpickle.dumps(searcher))  # as Tune does for its tuner.pkl
    assert copy.ruleout.notify is None


class SigintInFinalizer:
    """Sends this process a real SIGINT from inside `__del__`: Python runs the handler there, and drops
    the KeyboardInterrupt it raises ("Exception ignored in ...")."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs between these bytecodes, still inside __del__
            pass


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler for the test, whatever the process was started with (`nohup ... &`
    starts it with SIGINT ignored, and then Python installs none); the one found is put back after."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if before is not None:  # None: a handler set outside Python, which cannot be put back from here
            signal.signal(signal.SIGINT, before)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop is the point
def test_a_ctrl_c_that_python_drops_is_raised_again(python_sigint_handler) -> None:
    dropped = SigintInFinalizer()
    del dropped  # without the guard the Ctrl-C is simply lost: no KeyboardInterrupt here
    interrupts = Interrupts()
    with interrupts.installed():
        kept = SigintInFinalizer()
        del kept
        assert interrupts.received
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
