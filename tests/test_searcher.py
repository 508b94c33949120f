"""The Optuna side of the search: what trials report, constraints reaching the sampler, warm start.

Real Optuna and Ray Tune's OptunaSearch, driven directly (suggest / on_trial_complete) without
running trials; the end-to-end searches are in test_e2e.py and test_cache_resume.py.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from orchestrator.profile import Profile
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
