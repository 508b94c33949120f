"""The search: one Ray Tune trial per candidate; devices are leased by one Ray actor each.

Grid search when the whole space fits the trial budget, else Optuna's multi-objective
sampler through Ray Tune (accuracy up; latency and size down). We write no search
algorithm of our own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from orchestrator.selection import pipeline_label
from orchestrator.space import Candidate

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

# What an emulated device's measurement adds (orchestrator/emulated.py); absent keys are left out.
EMULATION_KEYS = ("emulated", "arch", "latency_source", "latency_scale", "latency_constraint", "native_latency_ms",
                  "native_protocol", "emulated_latency_ms", "parity", "qemu_cpu", "emulation_note")
WORST = 1e12  # what a failed or unmeasured trial reports for a metric to be minimised (and 0 accuracy)


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[Any]:
    """Join `address`, or start a quiet local Ray bound to loopback; always shut it down."""
    import ray

    if ray.is_initialized():  # a caller (a test session, a notebook) owns Ray: use it, leave it running
        yield ray
        return
    kwargs: dict[str, Any] = dict(
        include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True
    )
    if address:
        ray.init(address=address, **{k: v for k, v in kwargs.items() if k != "include_dashboard"})
    else:
        # "local": always a new local Ray, even where RAY_ADDRESS points elsewhere
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1", **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


class Interrupts:
    """Ctrl-C during a search, kept even where Python drops the KeyboardInterrupt it raised.

    Python ignores an exception raised while a finalizer (`__del__`, a weakref callback) runs
    in the main thread ("Exception ignored in ..."), and Ray runs many there: a Ctrl-C that
    lands in one would be lost and the search would go on to its end. While `installed`, the
    SIGINT handler also remembers it, and `check()` (after Ray's start, and at every Tune
    step) raises it again.
    """

    def __init__(self) -> None:
        self.received = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C came, even one that was dropped."""
        if self.received:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """The handler, in the main thread and where SIGINT still has Python's default handler."""
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield self
            return
        signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)


class ModelSink:
    """Receives candidate models from trials on any node and keeps them on the driver's disk by sha256."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, model_bytes: bytes) -> str:
        """Store a model; returns its sha256 (the file is `<sha256>.onnx`)."""
        sha = hashlib.sha256(model_bytes).hexdigest()
        path = self.folder / f"{sha}.onnx"
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(model_bytes)
            os.replace(tmp, path)
        return sha


@dataclass
class TrialPayload:
    """What every trial needs, shipped once through the object store."""

    task_name: str
    base_state: bytes
    base_arch: dict[str, Any]
    profile: Any
    seed: int
    pool: Any  # LeasePool actor: hands each measurement to a free device
    sink: Any
    grid: list[Candidate] | None
    avoid_cpu: int | None
    predictor: Any = None  # PredictorService actor: the device's latency predictor (orchestrator/predictor.py)
    fresh: bool = False  # read no cache (stages, accuracy); still write them


def search_limits(profile: Any) -> list[str]:
    """The profile's limits the sampler is told about as constraints: all but the accuracy drop.

    Accuracy is one of the sampler's objectives: a candidate just over the drop limit still
    tells it where the accuracy/objective trade-off lies, which a constraint would hide (it
    ranks every infeasible trial below every feasible one). The selection applies the limit.
    """
    from orchestrator.selection import constraint_names

    return [name for name in constraint_names(profile.constraints) if name != "max_accuracy_drop"]


def trial_values(record: dict[str, Any], profile: Any) -> dict[str, Any]:
    """What a trial reports to Tune: every objective metric, and the sampler's constraint values.

    A failed or unmeasured metric reports its worst value. "constraints" holds one number per
    limit in `search_limits`: 0 when met, else how far over it is (value/limit - 1, as the
    selection computes it).
    """
    from orchestrator.profile import OBJECTIVE_METRICS
    from orchestrator.selection import check_constraints, metric_value

    ok = record.get("status") == "ok" and bool((record.get("metrics") or {}).get("latency_ms"))
    out: dict[str, Any] = {}
    for name, direction in OBJECTIVE_METRICS.items():
        value = metric_value(record, name) if ok else None
        out[name] = value if value is not None else (0.0 if direction == "max" else WORST)
    names = search_limits(profile)
    over = {v["constraint"]: min(v["excess"], WORST) for v in check_constraints(record, profile.constraints)} \
        if ok and names else {}
    out["constraints"] = [over.get(n, 0.0) if ok else WORST for n in names]
    return out


def search_objectives(profile: Any) -> list[tuple[str, str]]:
    """What Optuna optimises: accuracy up, and the profile's objective down (latency p50 if it is accuracy)."""
    metric = profile.objective.metric
    return [("accuracy", "max"), ("latency_p50" if metric == "accuracy" else metric, "min")]


def config_to_pipeline(config: dict[str, Any], payload: TrialPayload, labels: dict[str, list[str]]) -> Candidate:
    """The candidate a trial's config stands for (grid index, or Optuna's flat parameters)."""
    if payload.grid is not None:
        return payload.grid[config["index"]]
    names = labels[config["pipeline"]]
    return [
        {"technique": name, "params": {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(name + ".")}}
        for name in names
    ]


_WORKER_STATE: dict[tuple[str, int, int], tuple[Any, Any, Any, Any]] = {}


def _worker_state(payload: TrialPayload) -> tuple[Any, Any, Any, Any]:
    """(registry, task, data, base model), built once per worker process (Tune reuses trial actors)."""
    from orchestrator.basemodel import TrainedModel
    from orchestrator.plugins import get_plugin_manager

    key = (payload.task_name, payload.seed, hash(payload.base_state))
    if key not in _WORKER_STATE:
        registry = get_plugin_manager()
        task = registry.task(payload.task_name)
        data = task.load_data(payload.seed)
        base = TrainedModel(task.name, "", payload.base_arch, payload.base_state, 0.0, False).load(task)
        _WORKER_STATE.clear()
        _WORKER_STATE[key] = (registry, task, data, base)
    return _WORKER_STATE[key]


def _predicted_too_slow(registry: Any, task: Any, base: Any, pipeline: Any, ctx_kwargs: dict[str, Any],
                        payload: TrialPayload) -> tuple[str, float] | None:
    """(reason, predicted ms) when the device's latency predictor says this candidate breaks the limit."""
    import ray

    from orchestrator.predictor import onnx_features, preview_candidate

    limit = payload.profile.constraints.max_latency_ms
    if limit is None:
        return None
    preview = preview_candidate(registry, task, base, pipeline, ctx_kwargs)
    if preview is None:
        return None
    predicted = ray.get(payload.predictor.predict.remote(onnx_features(preview)))
    if predicted is None or predicted <= limit:
        return None
    percentile = payload.profile.constraints.latency_percentile
    return (f"skipped before training: predicted latency {percentile} {predicted:.2f} ms > {limit:.2f} ms "
            f"(latency predictor fitted on this device's measurements)", predicted)


def run_trial(config: dict[str, Any], payload: TrialPayload, labels: dict[str, list[str]]) -> None:
    """One Tune trial: build the candidate, score it on held-out data, measure it on a free leased device."""
    import ray
    import torch
    from ray import tune

    from orchestrator.cache import AccuracyCache, StageCache
    from orchestrator.errors import MeasurementError
    from orchestrator.pipeline import build_candidate, evaluate_onnx

    started = time.perf_counter()
    timing: dict[str, float] = {}
    torch.set_num_threads(1)
    if payload.avoid_cpu is not None and hasattr(os, "sched_setaffinity"):
        others = set(range(os.cpu_count() or 1)) - {payload.avoid_cpu}
        if others:  # keep compression work off the core the local device measures on
            os.sched_setaffinity(0, others)
    pipeline = config_to_pipeline(config, payload, labels)
    record: dict[str, Any] = {"pipeline": pipeline, "status": "ok", "error": None, "metrics": {}, "device": None,
                              "timing": timing}
    try:
        registry, task, data, base = _worker_state(payload)
        ctx_kwargs = {"data": data, "profile": payload.profile, "seed": payload.seed}
        if payload.predictor is not None:
            skip = _predicted_too_slow(registry, task, base, pipeline, ctx_kwargs, payload)
            if skip:
                record["status"], record["error"], record["predicted_latency_ms"] = "skipped", skip[0], skip[1]
                tune.report({**trial_values(record, payload.profile), "record": json.dumps(record)})
                return
        stages, accuracies = StageCache(read=not payload.fresh), AccuracyCache(read=not payload.fresh)
        root = StageCache.root_key(payload.base_state, task.fingerprint(), payload.seed,
                                   payload.profile.runtime.model_dump())
        timing["setup_s"] = time.perf_counter() - started
        mark = time.perf_counter()
        model_bytes, info = build_candidate(registry, task, base, pipeline, ctx_kwargs, cache=stages, root_key=root)
        timing["build_s"] = time.perf_counter() - mark
        record["model_sha256"] = ray.get(payload.sink.put.remote(model_bytes))
        record["build"] = info["build_seconds"]
        record["cached"] = {"steps": info["cached_steps"]}
        accuracy = accuracies.get(info["sha256"], task.fingerprint(), payload.seed)
        record["cached"]["accuracy"] = accuracy is not None
        if accuracy is None:
            mark = time.perf_counter()
            accuracy = evaluate_onnx(task, model_bytes, data["eval"])
            timing["evaluate_s"] = time.perf_counter() - mark
            accuracies.put(info["sha256"], task.fingerprint(), payload.seed, accuracy)
        record["metrics"] = {"accuracy": accuracy, "size_bytes": len(model_bytes),
                             "compressed_size_bytes": info.get("compressed_size_bytes")}
        mark = time.perf_counter()
        bench = ray.get(payload.pool.measure.remote(model_bytes))
        timing["measure_s"] = time.perf_counter() - mark  # includes waiting for a free device
        record["device"] = bench.get("device")
        if "error" in bench:
            raise MeasurementError(bench["error"])
        energy = bench.get("energy") or {}
        record["metrics"].update(
            latency_ms={k: bench["latency_ms"][k] for k in ("p50", "p90", "p99", "mean", "std", "cv")},
            peak_memory_mb=bench["peak_memory_mb"],
            model_memory_mb=bench.get("model_memory_mb"),
            energy_mj=energy.get("energy_mj"),
            energy_source=energy.get("source", "unavailable"),
        )
        record["measurement"] = {
            k: bench.get(k) for k in ("runs", "warmup_runs", "noisy", "execution_provider", "threads", "pinned_cpu",
                                      "niceness", "per_device", "started_at", "finished_at", *EMULATION_KEYS)
            if k in bench or k not in EMULATION_KEYS
        }
        record["cached"]["measurement"] = bool(bench.get("cached"))
        if bench.get("flags"):
            record["flags"] = bench["flags"]
        if payload.predictor is not None:
            from orchestrator.predictor import onnx_features

            percentile = payload.profile.constraints.latency_percentile
            payload.predictor.observe.remote(onnx_features(model_bytes), bench["latency_ms"][percentile])
    except MeasurementError as exc:  # the device's reason already says what happened where
        record["status"], record["error"] = "failed", f"measurement failed: {exc}".splitlines()[0]
    except Exception as exc:  # a broken candidate fails alone; the run goes on
        record["status"], record["error"] = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
    timing["trial_s"] = time.perf_counter() - started
    tune.report({**trial_values(record, payload.profile), "record": json.dumps(record)})


class SpaceDefinition:
    """Optuna define-by-run space: the pipeline first, then only the parameters of its techniques."""

    def __init__(self, labels: dict[str, list[str]], choices: dict[str, list[Any]]) -> None:
        self.labels, self.choices = labels, choices

    def __call__(self, trial: Any) -> None:
        label = trial.suggest_categorical("pipeline", list(self.labels))
        for name in self.labels[label]:
            for key, values in self.choices.items():
                if key.startswith(name + "."):
                    trial.suggest_categorical(key, values)


def pipeline_key(pipeline: list[dict[str, Any]]) -> str:
    """Canonical text of a pipeline: two trials with the same key build the same candidate."""
    return json.dumps(pipeline, sort_keys=True)


def _warm_storage(prior: list[dict[str, Any]], labels: dict[str, list[str]], choices: dict[str, list[Any]],
                  profile: Any) -> Any:
    """An in-memory Optuna study holding the trials of an interrupted run as completed trials."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    objectives = search_objectives(profile)
    limits = search_limits(profile)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME,
                                directions=["maximize" if d == "max" else "minimize" for _, d in objectives])
    for record in prior:
        label = pipeline_label(record) if record.get("pipeline") else "baseline"
        if label not in labels:
            continue
        params: dict[str, Any] = {"pipeline": label}
        dists: dict[str, Any] = {"pipeline": CategoricalDistribution(list(labels))}
        for step in record["pipeline"]:
            for key, value in step["params"].items():
                name = f"{step['technique']}.{key}"
                if value in choices.get(name, []):
                    params[name], dists[name] = value, CategoricalDistribution(choices[name])
        values = trial_values(record, profile)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, values=[values[name] for name, _ in objectives],
            constraints=dict(zip(limits, values["constraints"]))))
    return storage


STUDY_NAME = "edge-orchestrator"
REPEAT_ASKS = 100  # how often Optuna is asked again when it proposes a configuration it already has


def top_quarter(n: int) -> int:
    """TPE's "good" group: the best quarter of the finished trials (hyperopt's share), at most 25.

    Optuna's default for several objectives is the best 10%: 2-4 trials in a search of tens,
    too few to model a conditional categorical space. On bench/search_efficiency.py (size
    objective, 10 sampler seeds) a quarter took the median from 39% of the grid to 26%.
    """
    return min(math.ceil(0.25 * n), 25)


def make_searcher(candidates: list[Candidate], trials: int, seed: int, profile: Any,
                  prior: list[dict[str, Any]] | None = None) -> tuple[Any, dict, int, dict]:
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
    """
    from ray import tune

    labels: dict[str, list[str]] = {}
    for cand in candidates:
        labels.setdefault(pipeline_label({"pipeline": cand}), [s["technique"] for s in cand])
    if len(candidates) <= trials:
        return None, {"index": tune.grid_search(list(range(len(candidates))))}, 1, labels
    import warnings

    import optuna
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
        often as it converges. Such a proposal is told to Optuna as pruned (TPE counts pruned
        trials among the worse ones, so it moves on) and Optuna is asked again, up to
        REPEAT_ASKS times, before a repeat goes to Tune (then answered from the caches).
        """

        proposed: set[str] | None = None

        def suggest(self, trial_id: str) -> dict | None:
            if self.proposed is None:  # a resumed run's finished trials count as proposed
                done = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                self.proposed = {json.dumps(unflatten_dict(t.params), sort_keys=True) for t in done}
            for attempt in range(REPEAT_ASKS):
                config = super().suggest(trial_id)
                text = json.dumps(config, sort_keys=True)
                if text not in self.proposed or attempt == REPEAT_ASKS - 1:
                    break
                self._ot_study.tell(self._ot_trials.pop(trial_id), state=optuna.trial.TrialState.PRUNED)
            self.proposed.add(text)
            return config

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result and "constraints" in result and trial_id in self._ot_trials:
                for name, value in zip(limits, result["constraints"]):
                    self._ot_trials[trial_id].set_constraint(name, value)
            super().on_trial_complete(trial_id, result, error)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prior = prior or []
    baseline_done = any(not r.get("pipeline") and r.get("status") == "ok" for r in prior)
    objectives = search_objectives(profile)
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
        points_to_evaluate=None if baseline_done else [{"pipeline": "baseline"}],
        storage=_warm_storage(prior, labels, choices, profile) if prior else None,
        study_name=STUDY_NAME,
    )
    return searcher, {}, 4 * trials + 8, labels


def recording_callback(on_candidate: Callable[[dict[str, Any]], None], target: int | None = None,
                       known: set[str] | None = None, first_id: int = 0,
                       interrupts: Interrupts | None = None) -> tuple[Any, Any]:
    """(callback, stopper) for Tune, driver side: every finished trial becomes a stored candidate at once.

    A trial whose pipeline is already known (`known`: an interrupted run's, or an earlier
    trial's) is not stored again; the stopper ends the search once `target` new distinct
    candidates are stored. Ids go on from `first_id` (c000, c001, ... in order of completion).
    With `interrupts`, every Tune step first raises a Ctrl-C that Python dropped.
    """
    from ray.tune import Callback
    from ray.tune.stopper import Stopper

    class _Recorder(Callback):
        def __init__(self, sink: Callable[[dict[str, Any]], None]) -> None:
            self.seen: set[int] = set()
            self.keys: set[str] = set(known or ())
            self.new = 0
            self.duplicates = 0
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
            self.sink({"id": f"c{first_id + self.new:03d}", **record})
            self.new += 1

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
            return target is not None and self.recorder.new >= target

    recorder = _Recorder(on_candidate)
    return recorder, _Enough(recorder)
