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

from orchestrator.devices import Device, DeviceLease, LeasePool, local_device
from orchestrator.errors import DeviceUnreachable, NoFeasibleCandidate, OrchestratorError
from orchestrator.fleet import reachable_devices
from orchestrator.paths import cache_dir, store_path
from orchestrator.plugins import PluginRegistry
from orchestrator.profile import LoadedProfile
from orchestrator.registry import DeviceRegistry, registry_path
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
    cpus = options.num_cpus or os.cpu_count() or 1
    devices, device_info = choose_devices(profile.name, profile.fallback_device, cpus, options.ray_address)
    avoid_cpu = devices[0].pinned_cpu if device_info["source"] == "fallback" else None
    concurrency = max(1, cpus - 1) if avoid_cpu is not None else cpus

    run_id = new_run_id(profile.name)
    out = (options.out_dir / run_id).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(store_path())
    store.start_run(run_id, profile.name, str(loaded.path), task.name, str(out))
    store.set_device(run_id, device_info)
    on_event("run_started", {"run_id": run_id, "out": out, "space": len(candidates), "trials": min(trials, len(candidates))})
    on_event("devices", device_info)
    records: list[dict[str, Any]] = []
    extras: dict[str, Any] = {}
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

            # The leases, the pool in front of them and the model sink stay on this node: it holds
            # the registry, the model cache and the network path to the devices.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            registry_file = str(registry_path()) if device_info["source"] == "registry" else None
            leases = [ray.remote(DeviceLease).options(num_cpus=0, scheduling_strategy=here).remote(
                device, profile, registry_file) for device in devices]
            pool = ray.remote(LeasePool).options(num_cpus=0, scheduling_strategy=here).remote(leases)
            sink = ray.remote(ModelSink).options(num_cpus=0, scheduling_strategy=here).remote(
                str(cache_dir("models"))
            )
            predictor = None
            if any(hasattr(t, "architecture") for t in techniques):  # hardware-aware search is allowed
                from orchestrator.predictor import PredictorService

                predictor = ray.remote(PredictorService).options(num_cpus=0, scheduling_strategy=here).remote()
            payload = TrialPayload(task.name, base.state_dict_bytes, base.arch, profile, profile.search.seed,
                                   pool, sink, candidates if searcher is None else None, avoid_cpu, predictor)

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
            try:
                tuner.fit()
                if predictor is not None:
                    extras["latency_predictor"] = ray.get(predictor.quality.remote())
            finally:
                for actor in (pool, *leases):  # their SSH connections close with them
                    ray.kill(actor)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
    except OrchestratorError as exc:
        status, error = "failed", exc
    finally:
        outcome = _finish(store, run_id, loaded, task.name, device_info, records, out, status, error, extras)
        registry.notify("run_finished", run_id=run_id, results=outcome.results)
    return outcome


def choose_devices(profile_name: str, fallback: str, cpus: int,
                   ray_address: str | None = None) -> tuple[list[Device], dict[str, Any]]:
    """The devices a run measures on, and what results.json says of them.

    The registered devices of the profile that answer now; with none registered, the
    profile's fallback device (this machine), which the description says. Registered
    devices that all fail to answer raise DeviceUnreachable (exit code 4).
    """
    registry = DeviceRegistry()
    unreachable: list[dict[str, str]] = []
    if registry.list(profile_name):
        devices, unreachable = reachable_devices(profile_name, registry)
        names = ", ".join(f"{d.name} ({d.ssh.address if d.ssh else d.transport})" for d in devices)
        plural = "s" if len(devices) > 1 else ""
        note = f"this run measures on the registered device{plural} of profile {profile_name!r}: {names}"
        if unreachable:
            note += "; unreachable, skipped: " + ", ".join(u["name"] for u in unreachable)
        source = "registry"
    elif fallback == "local":
        device = local_device()
        # The local device measures on the last core; compression trials keep to the others.
        device.pinned_cpu = cpus - 1 if cpus > 1 and not ray_address else None
        devices, source = [device], "fallback"
        note = (f"no device is registered for profile {profile_name!r}: this run measures on the fallback device "
                f"{device.name} (this machine)")
    else:
        raise DeviceUnreachable(f"profile {profile_name!r}: no registered device and no fallback device")
    described = [d.describe() for d in devices]
    archs = sorted({d["arch"] for d in described})
    info = {
        "name": ", ".join(d["name"] for d in described),
        "arch": ", ".join(archs),
        "transport": ", ".join(sorted({d["transport"] for d in described})),
        "emulated": any(d["emulated"] for d in described),
        "pinned_cpu": described[0]["pinned_cpu"] if len(described) == 1 else None,
        "source": source,
        "note": note,
        "devices": described,
        "unreachable": unreachable,
    }
    return devices, info


def _finish(store: RunStore, run_id: str, loaded: LoadedProfile, task: str, device: dict[str, Any],
            records: list[dict[str, Any]], out: Path, status: str, error: OrchestratorError | None,
            extras: dict[str, Any] | None = None) -> RunOutcome:
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
        "devices": device.get("devices") or [device],
        "constraints": loaded.profile.constraints.model_dump(),
        "objective": loaded.profile.objective.model_dump(),
        "baseline": baseline,
        "best": best,
        "candidates": records,
        **(extras or {}),
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
