"""The searcher: grid search when the whole space fits the trial budget, else Optuna's multi-objective
sampler through Ray Tune (accuracy up; the profile's metric down). We write no search algorithm of our own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from typing import Any, Callable, Iterator

from orchestrator.search.ray_runtime import Interrupts
from orchestrator.search.record import CandidateRecord, Pipeline, as_record
from orchestrator.search.refine import Refinement
from orchestrator.search.ruleout import RuleOut, outcome
from orchestrator.search.space import PipelineSpec
from orchestrator.search.trial import WORST, search_limits, search_objectives, trial_values

log = logging.getLogger(__name__)

# Set before Ray is imported anywhere in this process; workers inherit them.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C reaches us: we close the run ourselves
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray starts its workers at nice 15, and a local device's agent, started by its lease actor,
# would inherit it: anything else on the machine would then preempt the timed runs.
os.environ.setdefault("RAY_worker_niceness", "0")


class SpaceDefinition:
    """Optuna define-by-run space: the pipeline first, then only the parameters of its techniques."""

    def __init__(self, labels: dict[str, list[str]], choices: dict[str, list[Any]]) -> None:
        self.labels, self.choices = labels, choices

    def __call__(self, trial: Any) -> None:
        label = trial.suggest_categorical("pipeline", list(self.labels))
        with quiet_list_choices():
            for name in self.labels[label]:
                for key, values in self.choices.items():
                    if key.startswith(name + "."):
                        trial.suggest_categorical(key, values)


@contextlib.contextmanager
def quiet_list_choices() -> Iterator[None]:
    """Optuna warns about list-valued choices (a technique's `exclude_op_types: []`); they are fixed values
    it stores and hands back unchanged, which is all a parameter's value needs here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Choices for a categorical distribution", category=UserWarning)
        yield


def pipeline_key(pipeline: list[dict[str, Any]]) -> str:
    """Canonical text of a pipeline: two trials with the same key build the same candidate."""
    return json.dumps(pipeline, sort_keys=True)


def _warm_storage(prior: list[Any], labels: dict[str, list[str]], choices: dict[str, list[Any]],
                  profile: Any) -> Any:
    """An in-memory Optuna study holding the trials of an interrupted run as completed trials."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    objectives = search_objectives(profile)
    limits = search_limits(profile)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME,
                                directions=["maximize" if d == "max" else "minimize" for _, d in objectives])
    for record in map(as_record, prior):
        if record.label not in labels:
            continue
        params: dict[str, Any] = {"pipeline": record.label}
        dists: dict[str, Any] = {"pipeline": CategoricalDistribution(list(labels))}
        for step in record.pipeline.steps:
            for key, value in step.params.items():
                name = f"{step.technique}.{key}"
                if value in choices.get(name, []):
                    with quiet_list_choices():
                        params[name], dists[name] = value, CategoricalDistribution(choices[name])
        values = trial_values(record, profile)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, values=[values[name] for name, _ in objectives],
            constraints=dict(zip(limits, values["constraints"]))))
    return storage


STUDY_NAME = "edge-orchestrator"
#: After the starting points, one proposal in REFINE_EVERY is a starting point's neighbour (refine.py);
#: 1 would make every proposal one while any is left, 0 turns refinement off.
REFINE_EVERY = 2
REPEAT_ASKS = 100  # how often Optuna is asked again when it proposes a configuration it already has


def top_quarter(n: int) -> int:
    """TPE's "good" group: the best quarter of the finished trials (hyperopt's share), at most 25.

    Optuna's default for several objectives is the best 10%: 2-4 trials in a search of tens,
    too few to model a conditional categorical space. On bench/search_efficiency.py (size
    objective, 10 sampler seeds) a quarter took the median from 39% of the grid to 26%.
    """
    return min(math.ceil(0.25 * n), 25)


def tell_repeat(study: Any, trial: Any) -> None:
    """Tell Optuna a proposal it already has, without running it: the values and constraint values
    of the finished trial with the same parameters, as Optuna's FAQ does ("How can I ignore
    duplicated samples?"), so the sampler sees that point as it is. While that trial still runs
    nothing is known yet, and the proposal is told as failed (TPE leaves failed trials out).

    Told as pruned instead (TPE puts pruned trials among the worse ones), each repeat of a good
    configuration counted against it: on bench/search_efficiency.py (102 candidates, seeds
    1-15, budget 51) the size pick was then missed in 7 of 15 searches, and found in all 15 at
    a median 22 evaluations with the FAQ's way (docs/scaling.md).
    """
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.params == trial.params]
    if not done:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    for name, value in done[-1].constraints.items():
        trial.set_constraint(name, value)
    study.tell(trial, done[-1].values)


def tell_ruled_out(study: Any, trial: Any, told: tuple[list[float], list[tuple[str, float]]] | None) -> None:
    """Tell Optuna a proposal in a ruled-out family (ruleout.py) without running it: the values and
    constraint values of that family's last rejected or failed member, so the sampler learns the
    region is bad as if it had run it."""
    import optuna

    if told is None:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    values, constraints = told
    for name, value in constraints:
        trial.set_constraint(name, value)
    study.tell(trial, values)


def point_config(pipeline: PipelineSpec) -> dict[str, Any]:
    """A pipeline as the flat configuration the Optuna space suggests (`pipeline` label, `technique.param`)."""
    config: dict[str, Any] = {"pipeline": Pipeline.from_json(pipeline).label}
    for step in pipeline:
        config.update({f"{step['technique']}.{k}": v for k, v in step["params"].items()})
    return config


def make_searcher(candidates: list[PipelineSpec], trials: int, seed: int, profile: Any,
                  prior: list[dict[str, Any]] | None = None,
                  first: list[PipelineSpec] | None = None, quality: str = "accuracy",
                  on_ruled_out: Callable[[dict[str, Any]], None] | None = None) -> tuple[Any, dict, int, dict]:
    """(search_alg, param_space, num_samples, labels): grid when the space fits the budget, else Optuna.

    `candidates` is what is left to try and `trials` how many more to run; `prior` holds the
    candidates an interrupted run already has, which Optuna is told about as finished trials.
    Optuna's TPE sampler is multi-objective (`search_objectives`: accuracy and the profile's
    objective) and knows the profile's device limits as constraints (`search_limits`; trials
    report them, see `trial_values`; they reach Optuna through `Trial.set_constraint`). It
    models the parameters of one pipeline jointly (`multivariate`, `group`: the space is
    conditional on the pipeline), takes the best quarter of the trials as its "good" group
    (`top_quarter`), and its random start is at most a third of the budget. A
    configuration Optuna proposes again is not run (see ConstrainedOptunaSearch); should one
    still come through, it is answered from the caches and not counted (`recording_callback`
    stops the search once `trials` distinct candidates are in).

    `first` (orchestrator/search/starting.py) are evaluated before anything else, in order:
    as the head of the grid, or enqueued in Optuna's study (`points_to_evaluate`), whose
    sampler then learns from them like from any finished trial. After them, every
    REFINE_EVERY-th proposal is a one-parameter neighbour of a feasible starting point
    (orchestrator/search/refine.py), enqueued the same way; the sampler proposes the rest.

    A technique, or one value of a technique's parameter, whose candidates keep being rejected
    for quality or keep failing with the same cause is ruled out (orchestrator/search/ruleout.py):
    from then on no trial is spent on it (the searcher's `ruleout.ruled_out` lists each, for
    results.json; `on_ruled_out` is called with each as it happens; `quality` names the
    accuracy figure in its message). A grid search runs every candidate and rules nothing out.
    """
    from ray import tune

    labels: dict[str, list[str]] = {}
    for cand in candidates:
        labels.setdefault(Pipeline.from_json(cand).label, [s["technique"] for s in cand])
    keys = {pipeline_key(c) for c in candidates}
    every_first = first if first is not None else [[]]  # a resumed run's finished ones too (refinement's parents)
    first = [p for p in every_first if pipeline_key(p) in keys]
    if len(candidates) <= trials:
        head = {pipeline_key(p) for p in first}
        ordered = first + [c for c in candidates if pipeline_key(c) not in head]
        candidates[:] = ordered  # the trials index this list
        return None, {"index": tune.grid_search(list(range(len(candidates))))}, 1, labels

    import optuna
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.utils.util import unflatten_dict

    choices: dict[str, list[Any]] = {}
    for cand in candidates:
        for step in cand:
            for key, value in step["params"].items():
                values = choices.setdefault(f"{step['technique']}.{key}", [])
                if value not in values:
                    values.append(value)

    limits = search_limits(profile)

    class ConstrainedOptunaSearch(OptunaSearch):
        """Ray's OptunaSearch, handing Optuna the constraint values trials report, and asking again on a repeat.

        A categorical space makes TPE propose a configuration it already has, more and more
        often as it converges. Such a proposal is told what that configuration already got
        (`tell_repeat`) and Optuna is asked again, up to REPEAT_ASKS times, before a repeat
        goes to Tune (then answered from the caches).
        """

        proposed: set[str] | None = None
        suggested = 0  # proposals handed to Tune (repeats asked again do not count)
        refined = 0  # of which refinement's
        starts_declined = 0  # starting points not run: in a family ruled out before their turn

        def suggest(self, trial_id: str) -> dict | None:
            if self.proposed is None:  # a resumed run's finished trials count as proposed
                done = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                self.proposed = {json.dumps(unflatten_dict(t.params), sort_keys=True) for t in done}
                for t in done:  # a resumed run's finished starting points are parents already
                    refinement.finished(t.params, _feasible(t.values, t.constraints.values()))
            if rule_out.ruled_out and next(self._left(), None) is None:
                return Searcher.FINISHED  # all that is left of the space is ruled out (or was proposed)
            self.suggested += 1
            after_starts = self.suggested + self.starts_declined - len(starts)  # proposals since the last one
            if REFINE_EVERY and after_starts > 0 and self.refined * REFINE_EVERY < after_starts:
                config = refinement.next(self.proposed, allowed=lambda c: not rule_out.covers(c))
                if config is not None:  # Optuna's own warm start: the next ask() returns it
                    self.refined += 1
                    self._ot_study.enqueue_trial(config, skip_if_exists=False)
            for attempt in range(REPEAT_ASKS):
                config = self._ask(trial_id)
                if config is None:  # in a ruled-out family: told, not run
                    continue
                text = json.dumps(config, sort_keys=True)
                if text not in self.proposed or attempt == REPEAT_ASKS - 1:
                    break
                tell_repeat(self._ot_study, self._ot_trials.pop(trial_id))
            if config is None:  # Optuna kept proposing ruled-out configurations: the first one left
                for left in self._left():
                    self._ot_study.enqueue_trial(left, skip_if_exists=False)
                    config = self._ask(trial_id)
                    if config is not None:
                        break
                if config is None:
                    return Searcher.FINISHED
                text = json.dumps(config, sort_keys=True)
            self.proposed.add(text)
            return config

        def _left(self) -> Iterator[dict[str, Any]]:
            """The configurations not yet proposed and not ruled out, in the space's order."""
            return (c for c, text in zip(refinement.space, space_texts)
                    if text not in self.proposed and not rule_out.covers(c))

        def _ask(self, trial_id: str) -> dict | None:
            """Optuna's next proposal, or None when it is in a ruled-out family (then told, not run)."""
            config = super().suggest(trial_id)
            if rule_out.covers(config):
                self.starts_declined += json.dumps(config, sort_keys=True) in starts_texts
                tell_ruled_out(self._ot_study, self._ot_trials.pop(trial_id), rule_out.decline(config))
                return None
            return config

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result and "constraints" in result and trial_id in self._ot_trials:
                for name, value in zip(limits, result["constraints"]):
                    self._ot_trials[trial_id].set_constraint(name, value)
            if trial_id in self._ot_trials:
                values = [result.get(name) for name, _ in objectives] if result and not error else None
                constraints = (result or {}).get("constraints") or []
                params = self._ot_trials[trial_id].params
                feasible = _feasible(values, constraints)
                refinement.finished(params, feasible)
                record = json.loads(result.get("record") or "{}") if result and not error else None
                rule_out.finished(params, outcome(record, feasible),
                                  told=(values, list(zip(limits, constraints))) if values else crashed)
            super().on_trial_complete(trial_id, result, error)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prior = prior or []
    objectives = search_objectives(profile)
    starts = [point_config(p) for p in first]
    starts_texts = {json.dumps(c, sort_keys=True) for c in starts}
    refinement = Refinement([point_config(c) for c in candidates], [point_config(p) for p in every_first])
    space_texts = [json.dumps(c, sort_keys=True) for c in refinement.space]
    rule_out = RuleOut(labels, refinement.space, quality, notify=on_ruled_out)
    crashed = ([0.0, WORST], [(name, WORST) for name in limits])  # what a crashed trial would have reported

    def _feasible(values: list[Any] | None, constraints: Any) -> bool:
        """Measured (the objective is known: not failed, not rejected for accuracy) and within every device limit."""
        return bool(values) and values[1] is not None and values[1] < WORST and all(c <= 0 for c in constraints)

    for record in map(as_record, prior):  # a resumed run's trials count toward ruling out, as they did then
        if record.label in labels:
            reported = trial_values(record, profile)
            values = [reported[name] for name, _ in objectives]
            feasible = _feasible(values, reported["constraints"])
            rule_out.finished(point_config(record.pipeline.to_json()), outcome(record.to_json(), feasible),
                              told=(values, list(zip(limits, reported["constraints"]))))

    with warnings.catch_warnings():  # multivariate and group are marked experimental; gamma deprecated (pyproject)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, gamma=top_quarter,
                                             n_startup_trials=max(3, min(10, trials // 3)))
    searcher = ConstrainedOptunaSearch(
        space=SpaceDefinition(labels, choices),
        metric=[name for name, _ in objectives],
        mode=[direction for _, direction in objectives],
        sampler=sampler,
        points_to_evaluate=starts or None,
        storage=_warm_storage(prior, labels, choices, profile) if prior else None,
        study_name=STUDY_NAME,
    )
    searcher.ruleout = rule_out  # which families are ruled out, and why (results.json: ruled_out)
    return searcher, {}, 4 * trials + 8, labels


def recording_callback(on_candidate: Callable[[CandidateRecord], None], target: int | None = None,
                       known: set[str] | None = None, first_id: int = 0,
                       interrupts: Interrupts | None = None) -> tuple[Any, Any]:
    """(callback, stopper) for Tune, driver side: every finished trial becomes a stored candidate at once.

    A trial whose pipeline is already known (`known`: an interrupted run's, or an earlier
    trial's) is not stored again; the stopper ends the search once `target` new distinct
    candidates are stored, or once the baseline failed to build or score (its measurement
    failing on a device does not stop the others). Ids go on from `first_id` (c000, c001, ... in order of completion).
    With `interrupts`, every Tune step first raises a Ctrl-C that Python dropped.
    """
    from ray.tune import Callback
    from ray.tune.stopper import Stopper

    class _Recorder(Callback):
        def __init__(self, sink: Callable[[CandidateRecord], None]) -> None:
            self.seen: set[int] = set()
            self.keys: set[str] = set(known or ())
            self.new = 0
            self.duplicates = 0
            self.baseline_failed = False
            self.sink = sink
            self.interrupts = interrupts

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its run config; the sink (store, console) must not go with it.
            return {**self.__dict__, "sink": None, "interrupts": None}

        def on_step_begin(self, iteration, trials, **info):  # noqa: D102
            if self.interrupts is not None:
                self.interrupts.check()

        def emit(self, index: int, record: dict[str, Any], crashed: bool = False) -> None:
            if index in self.seen:
                return
            self.seen.add(index)
            if not crashed:
                key = pipeline_key(record["pipeline"])
                if key in self.keys:
                    self.duplicates += 1
                    return
                self.keys.add(key)
            self.sink(CandidateRecord.from_json({"id": f"c{first_id + self.new:03d}", **record}))
            self.new += 1
            if (not crashed and not record["pipeline"] and record.get("status") == "failed"
                    and (record.get("metrics") or {}).get("accuracy") is None):
                # the base model itself could not be built or scored: every candidate would fail alike,
                # so the search ends now (scored but not measured is a device's fault: the others go on)
                self.baseline_failed = True

        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: D102
            self.emit(trials.index(trial), json.loads(result["record"]))

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: D102
            self.emit(trials.index(trial), {"pipeline": [], "status": "failed",
                                            "error": "trial crashed (see the Ray logs)", "metrics": {}}, crashed=True)

    class _Enough(Stopper):
        def __init__(self, recorder: _Recorder) -> None:
            self.recorder = recorder

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return False

        def stop_all(self) -> bool:
            return self.recorder.baseline_failed or (target is not None and self.recorder.new >= target)

    recorder = _Recorder(on_candidate)
    return recorder, _Enough(recorder)
