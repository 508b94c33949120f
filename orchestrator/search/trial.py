"""One Ray Tune trial: build a candidate, score it, measure it on a leased device, report the objectives."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.api import Task
from orchestrator.errors import MeasurementError, PluginError
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.metrics import objective_metrics, quality_drop
from orchestrator.search.basemodel import TrainedModel
from orchestrator.search.cache import AccuracyCache, StageCache
from orchestrator.search.pipeline import build_candidate, evaluate_onnx
from orchestrator.search.predictor import onnx_features, preview_candidate
from orchestrator.search.record import as_record
from orchestrator.search.selection import check_constraints, constraint_names, drop_violation, metric_value
from orchestrator.search.space import PipelineSpec

# What an emulated device's measurement adds (orchestrator/emulation/rule.py); absent keys are left out.
EMULATION_KEYS = ("emulated", "arch", "latency_source", "latency_scale", "latency_constraint", "native_latency_ms",
                  "native_protocol", "emulated_latency_ms", "parity", "qemu_cpu", "emulation_note",
                  "calibrated", "cost_model", "instructions", "count_protocol")
WORST = 1e12  # what a failed or unmeasured trial reports for a metric to be minimised (and 0 accuracy)


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

    task_spec: dict[str, Any]  # Task.spec(): what a worker rebuilds the task from (`rebuild_task`), any kind of task
    base_state: bytes
    base_arch: dict[str, Any]
    profile: Any
    seed: int
    pool: Any  # LeasePool actor: hands each measurement to a free device
    sink: Any
    grid: list[PipelineSpec] | None
    avoid_cpu: int | None
    predictor: Any = None  # PredictorService actor: the device's latency predictor (orchestrator/search/predictor.py)
    fresh: bool = False  # read no cache (stages, accuracy); still write them
    baseline_accuracy: float | None = None  # the exported base model's, on the same held-out data
    plugins: dict[str, str] | None = None  # the driver's plugins and their files: every worker must load the same
    sample: dict[str, Any] | None = None  # real held-out input rows, which the device times (modelfacts.with_sample)


def trial_values(record: Any, profile: Any) -> dict[str, Any]:
    """What a trial reports to Tune: every objective metric, and the sampler's constraint values.

    A failed or unmeasured metric reports its worst value. "constraints" holds one number per
    limit in `search_limits`: 0 when met, else how far over it is (value/limit - 1, as the
    selection computes it).
    """
    record = as_record(record)
    ok = record.status == "ok" and bool(record.metrics.latency_ms)
    out: dict[str, Any] = {}
    scored = ok or record.status == "rejected"  # rejected: its accuracy is real, nothing else was measured
    for name, direction in objective_metrics().items():
        value = metric_value(record, name) if ok or (scored and name == "accuracy") else None
        out[name] = value if value is not None else (0.0 if direction == "max" else WORST)
    names = search_limits(profile)
    over = {v["constraint"]: min(v["excess"], WORST) for v in check_constraints(record, profile.constraints)} \
        if ok and names else {}
    out["constraints"] = [over.get(n, 0.0) if ok else WORST for n in names]
    return out


def accuracy_rejection(accuracy: float, baseline: float | None, profile: Any, metric: str = "accuracy") -> str | None:
    """Why a scored candidate breaks the profile's accuracy-drop limit (so is not measured), or None.

    The drop and the test are the selection's (`orchestrator.metrics.quality_drop`,
    `selection.drop_violation`). `metric` names the quality in the message (a task's accuracy, or
    cosine, top1, ... for a model brought with --model)."""
    if baseline is None:
        return None
    drop = quality_drop(accuracy, baseline)
    broke = drop_violation(drop, profile.constraints)
    if broke is None:
        return None
    name = "accuracy" if metric in ("accuracy", "labels") else metric
    what = "accuracy" if name == "accuracy" else "quality"
    return (f"rejected before measuring: {what} drop {drop:.2f} points > {broke['limit']:.2f} "
            f"({name} {accuracy:.4f}, baseline {baseline:.4f})")


def config_to_pipeline(config: dict[str, Any], payload: TrialPayload, labels: dict[str, list[str]]) -> PipelineSpec:
    """The candidate a trial's config stands for (grid index, or Optuna's flat parameters)."""
    if payload.grid is not None:
        return payload.grid[config["index"]]
    names = labels[config["pipeline"]]
    return [
        {"technique": name, "params": {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(name + ".")}}
        for name in names
    ]


def rebuild_task(registry: Any, spec: dict[str, Any], where: str) -> Any:
    """The task `spec` (`Task.spec()`) describes, rebuilt in `where` (a Ray worker), any kind alike.

    A spec with a "class" (module:qualname of a Task subclass, e.g. a model brought with --model)
    is rebuilt by that class's `from_spec`; otherwise it names a task plugin. The rebuilt task
    checks itself against the driver's (`Task.check_rebuilt`).
    """
    if spec.get("class"):
        module, _, qualname = str(spec["class"]).partition(":")
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
        if not (isinstance(target, type) and issubclass(target, Task)):
            raise PluginError(f"task spec class {spec['class']!r} is not a Task")
        task = target.from_spec(spec)
    else:
        task = registry.task(spec["task"])
    task.check_rebuilt(spec, where)
    return task


def _worker_state(payload: TrialPayload) -> tuple[Any, Any, Any, Any]:
    """(registry, task, data, base model), built once per worker process (Tune reuses trial actors)."""
    key = (payload.seed, hash(payload.base_state), repr(payload.task_spec))
    if key not in _WORKER_STATE:
        registry = get_plugin_manager()
        where = f"the Ray worker (pid {os.getpid()} on {socket.gethostname()})"
        if payload.plugins is not None:
            registry.check_same_plugins(payload.plugins, where)
        task = rebuild_task(registry, payload.task_spec, where)
        data = task.load_data(payload.seed)
        base = TrainedModel(task.name, "", payload.base_arch, payload.base_state, 0.0, False).load(task)
        _WORKER_STATE.clear()
        _WORKER_STATE[key] = (registry, task, data, base)
    return _WORKER_STATE[key]


def _predicted_too_slow(registry: Any, task: Any, base: Any, pipeline: Any, ctx_kwargs: dict[str, Any],
                        payload: TrialPayload) -> tuple[str, float] | None:
    """(reason, predicted ms) when the device's latency predictor says this candidate breaks the limit."""
    import ray


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
        if info.get("training"):  # a brought model's fine-tuning: rows, seconds, passes per technique (owntrain.py)
            record["training"] = info["training"]
        accuracy = accuracies.get(info["sha256"], task.fingerprint(), payload.seed)
        record["cached"]["accuracy"] = accuracy is not None
        if accuracy is None:
            mark = time.perf_counter()
            accuracy = evaluate_onnx(task, model_bytes, data["eval"])
            timing["evaluate_s"] = time.perf_counter() - mark
            accuracies.put(info["sha256"], task.fingerprint(), payload.seed, accuracy)
        record["metrics"] = {"accuracy": accuracy, "size_bytes": len(model_bytes),
                             "compressed_size_bytes": info.get("compressed_size_bytes")}
        # the baseline is the reference: it is always measured
        rejection = (accuracy_rejection(accuracy, payload.baseline_accuracy, payload.profile, task.quality_metric)
                     if pipeline else None)
        if rejection:  # cheap before expensive: the device is never asked about a model the profile refuses
            record["status"], record["error"] = "rejected", rejection
            timing["trial_s"] = time.perf_counter() - started
            tune.report({**trial_values(record, payload.profile), "record": json.dumps(record)})
            return
        mark = time.perf_counter()
        from orchestrator.models.modelfacts import with_sample

        bench = ray.get(payload.pool.measure.remote(with_sample(model_bytes, payload.sample)))
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
                                      "niceness", "per_device", "started_at", "finished_at", "inputs",
                                      "inputs_source", "session_settings", *EMULATION_KEYS)
            if k in bench or k not in (*EMULATION_KEYS, "session_settings")
        }
        if bench.get("warnings"):  # what the device could not do as asked (a session setting it ignored, ...)
            record["measurement"]["warnings"] = [str(w)[:300] for w in bench["warnings"][:10]]
        record["cached"]["measurement"] = bool(bench.get("cached"))
        if bench.get("flags"):
            record["flags"] = bench["flags"]
        if payload.predictor is not None:
            from orchestrator.search.predictor import onnx_features

            percentile = payload.profile.constraints.latency_percentile
            payload.predictor.observe.remote(onnx_features(model_bytes), bench["latency_ms"][percentile])
    except MeasurementError as exc:  # the device's reason already says what happened where
        record["status"], record["error"] = "failed", f"measurement failed: {exc}".splitlines()[0]
    except Exception as exc:  # a broken candidate fails alone; the run goes on
        record["status"], record["error"] = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
    timing["trial_s"] = time.perf_counter() - started
    tune.report({**trial_values(record, payload.profile), "record": json.dumps(record)})


_WORKER_STATE: dict[tuple[str, int, int, str], tuple[Any, Any, Any, Any]] = {}


def search_limits(profile: Any) -> list[str]:
    """The profile's limits the sampler is told about as constraints: all but the accuracy drop.

    Accuracy is one of the sampler's objectives: a candidate just over the drop limit still
    tells it where the accuracy/objective trade-off lies, which a constraint would hide (it
    ranks every infeasible trial below every feasible one). The selection applies the limit.
    """
    return [name for name in constraint_names(profile.constraints) if name != "max_accuracy_drop"]


def search_objectives(profile: Any) -> list[tuple[str, str]]:
    """What Optuna optimises: accuracy up, and the profile's objective down (latency p50 if it is accuracy)."""
    metric = profile.objective.metric
    return [("accuracy", "max"), ("latency_p50" if metric == "accuracy" else metric, "min")]
