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
from orchestrator.profile import LoadedProfile, Profile
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
    fresh: bool = False  # read no cache: build and measure every candidate again
    # Measure on exactly these devices instead of the registry's or the fallback (bench/scaling.py
    # pins local devices to chosen cores). Trials then use every CPU: none is kept for a device.
    devices: list[Device] | None = None


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
    resume: dict[str, Any] | None = None,
) -> RunOutcome:
    """Run the whole loop. Every candidate is stored as soon as it is measured; Ctrl-C keeps them.

    `resume` is a stored run (`RunStore.get_run`) that stopped before its end: its candidates
    are kept, only the trials it still lacks are run (see `resume_run`).
    """
    from orchestrator.basemodel import get_base_model
    from orchestrator.search import pipeline_key

    profile = loaded.profile
    techniques = allowed_techniques(loaded, registry)
    task = registry.task(options.task)
    candidates = enumerate_candidates(techniques, profile.search.max_pipeline_length)
    trials = options.trials or profile.search.trials
    cpus = options.num_cpus or os.cpu_count() or 1
    if options.devices:
        devices = list(options.devices)
        device_info = describe_devices(devices, "given", "this run measures on the devices it was given: "
                                       + ", ".join(d.name for d in devices), profile=profile)
    else:
        devices, device_info = choose_devices(profile.name, profile.fallback_device, cpus, options.ray_address, profile)
    avoid_cpu = devices[0].pinned_cpu if device_info["source"] == "fallback" else None
    concurrency = max(1, cpus - 1) if avoid_cpu is not None else cpus

    store = RunStore(store_path())
    prior: list[dict[str, Any]] = []
    time_budget = profile.search.time_budget_s
    if resume is None:
        run_id = new_run_id(profile.name)
        out = (options.out_dir / run_id).resolve()
        out.mkdir(parents=True, exist_ok=True)
        store.start_run(run_id, profile.name, str(loaded.path), task.name, str(out),
                        options={"task": task.name, "trials": trials, "fresh": options.fresh,
                                 "ray_address": options.ray_address, "num_cpus": options.num_cpus,
                                 "profile_sha256": file_sha256(loaded.path)})
    else:
        run_id, out = resume["id"], Path(resume["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        prior = [{k: v for k, v in c.items() if k not in ("on_front", "feasible", "violations")}
                 for c in resume["candidates"]]
        spent = (resume["last_candidate_at"] or resume["started_at"]) - resume["started_at"]
        store.reopen_run(run_id, spent_s=spent)
        if time_budget is not None:
            time_budget = max(time_budget - spent, 1.0)
    done = {pipeline_key(c["pipeline"]) for c in prior if c.get("pipeline") or c.get("status") == "ok"}
    remaining = [c for c in candidates if pipeline_key(c) not in done]
    trials_left = max(0, min(trials - len(done), len(remaining)))
    first_id = 1 + max((int(c["id"][1:]) for c in prior), default=-1)
    store.set_device(run_id, device_info)
    on_event("run_started", {"run_id": run_id, "out": out, "space": len(candidates), "trials": trials_left,
                             "resumed": len(prior) if resume is not None else None})
    on_event("devices", device_info)
    records: list[dict[str, Any]] = list(prior)
    extras: dict[str, Any] = {}
    plan = SearchPlan(devices, device_info, remaining, trials_left, prior, done, first_id, cpus, concurrency,
                      avoid_cpu, time_budget)

    def on_candidate(record: dict[str, Any]) -> None:
        records.append(record)
        store.add_candidate(run_id, record)
        registry.notify("candidate_measured", run_id=run_id, candidate=record)
        on_event("candidate", record)

    status, error = "failed", None
    try:
        data = task.load_data(profile.search.seed)
        on_event("base_model", {"task": task.name})
        base = get_base_model(task, data, profile.search.seed)
        on_event("base_model_ready", {"accuracy": base.accuracy, "trained_now": base.trained_now})
        if trials_left > 0:
            _search(options, profile, task, base, techniques, plan, on_candidate, run_id, extras)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
    except OrchestratorError as exc:
        status, error = "failed", exc
    finally:
        outcome = _finish(store, run_id, loaded, task.name, device_info, records, out, status, error, extras)
        registry.notify("run_finished", run_id=run_id, results=outcome.results)
    return outcome


@dataclass
class SearchPlan:
    """What a run's search still has to do (all of it, or a resumed run's rest), and on what."""

    devices: list[Device]
    device_info: dict[str, Any]
    remaining: list[Any]  # candidates not measured yet
    trials_left: int
    prior: list[dict[str, Any]]  # a resumed run's stored candidates
    done: set[str]  # their pipeline keys
    first_id: int  # the next candidate id's number
    cpus: int
    concurrency: int
    avoid_cpu: int | None  # the local device's core, kept free of trials
    time_budget: float | None


def _search(options: RunOptions, profile: Profile, task: Any, base: Any, techniques: list[Any], plan: SearchPlan,
            on_candidate: Callable[[dict[str, Any]], None], run_id: str, extras: dict[str, Any]) -> None:
    """The Ray Tune part of a run: leases, pool, sink, trials; every finished trial goes to `on_candidate` at once."""
    from orchestrator.cache import measurements_path
    from orchestrator.search import (
        Interrupts, ModelSink, TrialPayload, make_searcher, ray_session, recording_callback, run_trial,
    )

    searcher, space, samples, labels = make_searcher(plan.remaining, plan.trials_left, profile.search.seed, profile,
                                                      plan.prior)
    interrupts = Interrupts()
    with interrupts.installed(), ray_session(options.ray_address, plan.cpus) as ray:
        interrupts.check()
        from ray import tune
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        concurrency = plan.concurrency
        if options.ray_address:  # a cluster: as many trials at once as it has CPUs, not this machine
            concurrency = max(1, int(ray.cluster_resources().get("CPU", concurrency)))

        # The leases, the pool in front of them and the model sink stay on this node: it holds
        # the registry, the caches and the network path to the devices.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        registry_file = str(registry_path()) if plan.device_info["source"] == "registry" else None
        leases = [ray.remote(DeviceLease).options(num_cpus=0, scheduling_strategy=here).remote(
            device, profile, registry_file, str(measurements_path()), options.fresh) for device in plan.devices]
        pool = ray.remote(LeasePool).options(num_cpus=0, scheduling_strategy=here).remote(
            leases, profile.search.devices_per_candidate)
        sink = ray.remote(ModelSink).options(num_cpus=0, scheduling_strategy=here).remote(str(cache_dir("models")))
        predictor = None
        if any(hasattr(t, "architecture") for t in techniques):  # hardware-aware search is allowed
            from orchestrator.predictor import PredictorService, past_points

            seed = [] if options.fresh else past_points(plan.devices, profile, profile.constraints.latency_percentile)
            predictor = ray.remote(PredictorService).options(num_cpus=0, scheduling_strategy=here).remote(seed)
        payload = TrialPayload(task.name, base.state_dict_bytes, base.arch, profile, profile.search.seed,
                               pool, sink, plan.remaining if searcher is None else None, plan.avoid_cpu, predictor,
                               fresh=options.fresh)

        recorder, enough = recording_callback(on_candidate, target=plan.trials_left, known=plan.done,
                                             first_id=plan.first_id, interrupts=interrupts)
        trainable = tune.with_resources(tune.with_parameters(run_trial, payload=payload, labels=labels), {"cpu": 1})
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                search_alg=searcher, num_samples=samples, reuse_actors=True, max_concurrent_trials=concurrency,
                time_budget_s=plan.time_budget,
                **({"metric": "accuracy", "mode": "max"} if searcher is None else {}),
            ),
            run_config=tune.RunConfig(
                name=f"{run_id}-{int(time.time())}", storage_path=str(cache_dir("tune")), verbose=0,
                callbacks=[recorder], stop=enough,
            ),
        )
        try:
            tuner.fit()
            if predictor is not None:
                extras["latency_predictor"] = ray.get(predictor.quality.remote())
            if recorder.duplicates:
                extras["duplicate_trials"] = recorder.duplicates
        finally:
            for actor in (pool, *leases):  # their SSH connections close with them
                ray.kill(actor)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (the profile a run was started with, checked again on --resume)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resume_run(run_id: str, registry: PluginRegistry,
               on_event: Callable[[str, dict[str, Any]], None] = lambda kind, data: None,
               fresh: bool = False) -> RunOutcome:
    """Go on with a run that stopped before its end (Ctrl-C, a crash, kill -9), without repeating its trials.

    The run keeps its id, folder and candidates; the search runs the trials still missing
    from its budget (Optuna is told the finished ones), the rest of its time budget, and ends
    like an uninterrupted run (selection, results.json, report). Refused, with the reason,
    for a run that finished, one that a live process still runs, or one whose profile file
    changed since it started.
    """
    from orchestrator.errors import RunNotResumable
    from orchestrator.profile import load_profile

    store = RunStore(store_path())
    run = store.get_run(run_id)
    if run["status"] in ("finished", "no_feasible"):
        raise RunNotResumable(f"run {run['id']} already finished ({run['status']}): nothing to resume")
    if run["status"] == "running" and _alive(run.get("pid"), run.get("host")):
        raise RunNotResumable(f"run {run['id']} is still running (pid {run['pid']} on {run['host']})")
    opts = run["options"]
    profile_path = Path(run["profile_path"])
    if not profile_path.is_file():
        raise RunNotResumable(f"run {run['id']}: its profile {profile_path} is gone")
    if opts.get("profile_sha256") and file_sha256(profile_path) != opts["profile_sha256"]:
        raise RunNotResumable(f"run {run['id']}: {profile_path} changed since the run started; "
                              "start a new run instead")
    loaded = load_profile(profile_path)
    options = RunOptions(task=run["task"], trials=opts.get("trials"), out_dir=Path(run["out_dir"]).parent,
                         ray_address=opts.get("ray_address"), num_cpus=opts.get("num_cpus"),
                         fresh=fresh)
    return execute_run(loaded, registry, options, on_event, resume=run)


def _alive(pid: int | None, host: str | None) -> bool:
    """Whether the process that owned a run still runs (only knowable on the same host; elsewhere: assume so)."""
    import socket

    if not pid:
        return False
    if host and host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def choose_devices(profile_name: str, fallback: str, cpus: int,
                   ray_address: str | None = None,
                   profile: Profile | None = None) -> tuple[list[Device], dict[str, Any]]:
    """The devices a run measures on, and what results.json says of them.

    The registered devices of the profile that answer now; with none registered, the
    profile's fallback device: this machine (`local`), or the profile's QEMU-emulated device
    (`emulated`, built on first use; this machine when QEMU or its sysroot is unavailable), which
    the description says. Registered devices that all fail to answer raise DeviceUnreachable
    (exit code 4). `profile` is needed for the emulated fallback and its labels.
    """
    from orchestrator.emulated import emulated_fallback

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
    elif fallback in ("local", "emulated"):
        device, why = None, "the profile was not given"
        if fallback == "emulated" and profile is not None:
            device, why = emulated_fallback(profile, cpus, ray_address)
        if device is not None:
            note = (f"no device is registered for profile {profile_name!r}: this run measures on the profile's "
                    f"emulated device {device.name} (QEMU user mode, -cpu {device.extra['qemu_cpu']}){why}")
        else:
            device = local_device()
            # The local device measures on the last core; compression trials keep to the others.
            device.pinned_cpu = cpus - 1 if cpus > 1 and not ray_address else None
            note = (f"no device is registered for profile {profile_name!r}: this run measures on the fallback device "
                    f"{device.name} (this machine)")
            if fallback == "emulated":
                note += f", not on the profile's emulated device: {why}"
        devices, source = [device], "fallback"
    else:
        raise DeviceUnreachable(f"profile {profile_name!r}: no registered device and no fallback device")
    return devices, describe_devices(devices, source, note, unreachable, profile)


def describe_devices(devices: list[Device], source: str, note: str, unreachable: list[dict[str, str]] | None = None,
                     profile: Profile | None = None) -> dict[str, Any]:
    """What results.json says of a run's devices (`source`: registry, fallback or given)."""
    from orchestrator.emulated import emulation_note, latency_constraint

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
        "unreachable": unreachable or [],
    }
    if info["emulated"]:
        info["note"] += ". " + emulation_note(profile)
        cpus_emulated = sorted({str(d.extra.get("qemu_cpu")) for d in devices if d.emulated})
        info.update(latency_source="native-scaled", qemu_cpu=", ".join(cpus_emulated))
        if profile is not None and profile.emulation is not None:
            info.update(latency_scale=profile.emulation.latency_scale, latency_constraint=latency_constraint(profile))
    return info


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
