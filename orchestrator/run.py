"""One run of `orchestrate --profile`: prepare, search on Ray, select, write OUT/<run-id>/."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.devices import DeviceLease, local_device
from orchestrator.errors import DeviceUnreachable, NoFeasibleCandidate, OrchestratorError
from orchestrator.paths import cache_dir, store_path
from orchestrator.plugins import PluginRegistry
from orchestrator.profile import LoadedProfile
from orchestrator.selection import pipeline_label
from orchestrator.space import allowed_techniques, enumerate_candidates
from orchestrator.store import RunStore

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """What the command line asked for."""

    task: str = "digits"
    trials: int | None = None
    out_dir: Path = Path("runs")
    ray_address: str | None = None
    num_cpus: int | None = None


@dataclass
class RunOutcome:
    """What a finished (or stopped) run left behind."""

    run_id: str
    out_dir: Path
    results: dict[str, Any]
    status: str
    error: OrchestratorError | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)


def new_run_id(profile_name: str) -> str:
    """Sortable and unique: time, profile, random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{profile_name}-{uuid.uuid4().hex[:6]}"


def execute_run(
    loaded: LoadedProfile,
    registry: PluginRegistry,
    options: RunOptions,
    on_event: Callable[[str, dict[str, Any]], None] = lambda kind, data: None,
) -> RunOutcome:
    """Run the whole loop. Every candidate is stored as soon as it is measured; Ctrl-C keeps them."""
    from orchestrator.basemodel import get_base_model
    from orchestrator.search import ModelSink, TrialPayload, make_searcher, ray_session, recording_callback, run_trial

    profile = loaded.profile
    techniques = allowed_techniques(loaded, registry)
    task = registry.task(options.task)
    candidates = enumerate_candidates(techniques, profile.search.max_pipeline_length)
    trials = options.trials or profile.search.trials
    if profile.fallback_device != "local":
        raise DeviceUnreachable(f"profile {profile.name!r}: no registered device and no fallback device")
    device = local_device()
    cpus = options.num_cpus or os.cpu_count() or 1
    # The local device measures on the last core; compression trials keep to the others.
    device.pinned_cpu = cpus - 1 if cpus > 1 and not options.ray_address else None
    concurrency = max(1, cpus - 1) if device.pinned_cpu is not None else cpus

    run_id = new_run_id(profile.name)
    out = (options.out_dir / run_id).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(store_path())
    store.start_run(run_id, profile.name, str(loaded.path), task.name, str(out))
    store.set_device(run_id, device.describe())
    on_event("run_started", {"run_id": run_id, "out": out, "space": len(candidates), "trials": min(trials, len(candidates))})
    records: list[dict[str, Any]] = []
    status, error = "failed", None
    try:
        data = task.load_data(profile.search.seed)
        on_event("base_model", {"task": task.name})
        base = get_base_model(task, data, profile.search.seed)
        on_event("base_model_ready", {"accuracy": base.accuracy, "trained_now": base.trained_now})
        searcher, space, samples, labels = make_searcher(candidates, trials, profile.search.seed)
        with ray_session(options.ray_address, cpus) as ray:
            from ray import tune
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            lease = ray.remote(DeviceLease).options(num_cpus=0, scheduling_strategy=here).remote(device, profile)
            sink = ray.remote(ModelSink).options(num_cpus=0, scheduling_strategy=here).remote(
                str(cache_dir("models"))
            )
            payload = TrialPayload(task.name, base.state_dict_bytes, base.arch, profile, profile.search.seed,
                                   lease, sink, candidates if searcher is None else None, device.pinned_cpu)

            def on_candidate(record: dict[str, Any]) -> None:
                records.append(record)
                store.add_candidate(run_id, record)
                registry.notify("candidate_measured", run_id=run_id, candidate=record)
                on_event("candidate", record)

            trainable = tune.with_resources(
                tune.with_parameters(run_trial, payload=payload, labels=labels), {"cpu": 1}
            )
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    search_alg=searcher, num_samples=samples, reuse_actors=True, max_concurrent_trials=concurrency,
                    time_budget_s=profile.search.time_budget_s,
                    **({"metric": "accuracy", "mode": "max"} if searcher is None else {}),
                ),
                run_config=tune.RunConfig(
                    name=run_id, storage_path=str(cache_dir("tune")), verbose=0,
                    callbacks=[recording_callback(on_candidate)],
                ),
            )
            tuner.fit()
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
    except OrchestratorError as exc:
        status, error = "failed", exc
    finally:
        outcome = _finish(store, run_id, loaded, task.name, device.describe(), records, out, status, error)
    return outcome


def _finish(store: RunStore, run_id: str, loaded: LoadedProfile, task: str, device: dict[str, Any],
            records: list[dict[str, Any]], out: Path, status: str, error: OrchestratorError | None) -> RunOutcome:
    """Select, write results.json / report.html / best.onnx, close the run in the store."""
    from orchestrator.report import write_report
    from orchestrator.selection import select

    records = sorted(records, key=lambda r: r["id"])
    best = baseline = None
    if status == "finished":
        try:
            selection = select(records, loaded.profile)
            best, baseline = selection.best, selection.baseline
            front = {c["id"] for c in selection.front}
            for record in records:
                record["on_front"] = record["id"] in front
        except NoFeasibleCandidate as exc:
            status, error = "no_feasible", exc
            baseline = exc.selection.baseline
        except ValueError as exc:  # the baseline itself failed: nothing to compare against
            status, error = "failed", OrchestratorError(f"run {run_id}: {exc}")
        for record in records:
            store.add_candidate(run_id, record)
    results = {
        "schema_version": 1,
        "run_id": run_id,
        "status": status,
        "message": str(error) if error else None,
        "profile": loaded.profile.name,
        "profile_path": str(loaded.path),
        "task": task,
        "device": device,
        "constraints": loaded.profile.constraints.model_dump(),
        "objective": loaded.profile.objective.model_dump(),
        "baseline": baseline,
        "best": best,
        "candidates": records,
    }
    if best is not None:
        shutil.copyfile(cache_dir("models") / f"{best['model_sha256']}.onnx", out / "best.onnx")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, out / "report.html")
    store.finish_run(run_id, status, best["id"] if best else None, str(error) if error else None)
    return RunOutcome(run_id, out, results, status, error, records)


def describe(candidate: dict[str, Any]) -> str:
    """Short label of a candidate for terminal output."""
    return f"{candidate['id']} {pipeline_label(candidate)}"
