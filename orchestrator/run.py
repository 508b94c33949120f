"""One run of `orchestrate --profile`: prepare, search on Ray, select, write OUT/<run-id>/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.kernel import file_sha256
from orchestrator.config.profile import LoadedProfile, Profile, load_profile, profile_from_text
from orchestrator.devices.base import Device
from orchestrator.devices.registry import registry_path
from orchestrator.errors import BaselineError, DiskFull, NoFeasibleCandidate, OrchestratorError, RunNotResumable
from orchestrator.fleet.choice import choose_devices, describe_devices, device_facts
from orchestrator.fleet.lease import DeviceLease, LeasePool
from orchestrator.fleet.measurements import measurements_path
from orchestrator.hooks.manager import PluginRegistry
from orchestrator.models.modelfacts import model_ops
from orchestrator.models.tasks import model_options, resolve_task
from orchestrator.report.runfiles import full_disk_during_run, write_run_files, write_samples
from orchestrator.search.basemodel import get_base_model, progress_events
from orchestrator.search.cache import trim_caches
from orchestrator.search.fitting import fit_to_labels, refuse_torch_stages
from orchestrator.search.pipeline import as_onnx_bytes, evaluate_onnx, export_onnx, is_onnx
from orchestrator.search.predictor import PredictorService, past_points
from orchestrator.search.ray_runtime import Interrupts, ray_session
from orchestrator.search.record import CandidateRecord
from orchestrator.search.searcher import make_searcher, pipeline_key, recording_callback
from orchestrator.search.selection import Selection, select
from orchestrator.search.space import allowed_techniques, enumerate_candidates
from orchestrator.search.starting import starting_points
from orchestrator.search.trial import ModelSink, TrialPayload, run_trial
from orchestrator.signals import retake_sigterm
from orchestrator.state.cachelimit import cache_limit
from orchestrator.state.paths import cache_dir, state_dir, store_path
from orchestrator.state.store import SAMPLE_ROWS, RunStore, process_alive

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """What the command line asked for."""

    task: str | None = None  # a task plugin's name; None: the profile's `task`, else "digits"
    model: str | None = None  # a model of your own (orchestrator/models/ownmodel.py); None: the profile's `model`
    inputs: str | None = None  # its samples (.npz)
    train: str | None = None  # its training set (--train: label-free distillation; orchestrator/models/trainset.py)
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
    candidates: list[dict[str, Any]] = field(default_factory=list)  # as results.json lists them


def new_run_id(profile_name: str) -> str:
    """Sortable and unique: time, profile, random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{profile_name}-{uuid.uuid4().hex[:6]}"


def execute_run(
    loaded: LoadedProfile,
    registry: PluginRegistry,
    options: RunOptions,
    resume: dict[str, Any] | None = None,
) -> RunOutcome:
    """Run the whole loop. Every candidate is stored as soon as it is measured; Ctrl-C keeps them.

    Progress goes to the plugins' event hooks (orchestrator/hooks/specs.py): the terminal
    reporter is one such plugin (orchestrator/cli/console.py), an exporter another.

    `resume` is a stored run (`RunStore.get_run`) that stopped before its end: its candidates
    are kept, only the trials it still lacks are run (see `resume_run`).
    """
    cache_limit()  # a bad EDGE_ORCHESTRATOR_CACHE_MAX is refused now, not at the run's end
    profile = loaded.profile.model_copy(deep=True)  # the run may add measurement axes: never to the loaded one
    techniques = allowed_techniques(loaded, registry)
    task = resolve_task(loaded, registry, options.task, options.model, options.inputs, options.train)
    refuse_torch_stages(loaded, techniques, task)
    techniques = fit_to_labels(loaded, techniques, task)
    candidates = enumerate_candidates(techniques, profile.search.max_pipeline_length)
    trials = options.trials or profile.search.trials
    cpus = options.num_cpus or os.cpu_count() or 1
    if options.devices:
        devices = list(options.devices)
        device_info = describe_devices(devices, "given", "this run measures on the devices it was given: "
                                       + ", ".join(d.name for d in devices), profile=profile)
    else:
        devices, device_info = choose_devices(profile.name, profile.fallback_device, cpus, options.ray_address, profile)
    facts = device_facts(devices[0], profile)
    first = starting_points(techniques, candidates, facts, profile.search.max_pipeline_length)
    avoid_cpu = devices[0].pinned_cpu if device_info["source"] == "fallback" else None
    concurrency = max(1, cpus - 1) if avoid_cpu is not None else cpus

    store = RunStore(store_path())
    prior: list[CandidateRecord] = []
    time_budget = profile.search.time_budget_s
    if resume is None:
        run_id = new_run_id(profile.name)
        out = (options.out_dir / run_id).resolve()
        out.mkdir(parents=True, exist_ok=True)
        # the profile as it was: a resume reads this copy, from any folder, whatever became of the file
        store.start_run(run_id, profile.name, str(loaded.path.resolve()), task.name, str(out),
                        options={"task": task.name, "trials": trials, **model_options(task), "fresh": options.fresh,
                                 "ray_address": options.ray_address, "num_cpus": options.num_cpus,
                                 "profile_text": loaded.text})
    else:
        run_id, out = resume["id"], Path(resume["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        # what was measured, without the verdicts of a selection that may never have finished
        prior = [dataclasses.replace(CandidateRecord.from_json(c), verdict=None) for c in resume["candidates"]]
        spent = (resume["last_candidate_at"] or resume["started_at"]) - resume["started_at"]
        store.reopen_run(run_id, spent_s=spent)
        if time_budget is not None:
            time_budget = max(time_budget - spent, 1.0)
    done = {pipeline_key(c.pipeline.to_json()) for c in prior if not c.is_baseline or c.status == "ok"}
    remaining = [c for c in candidates if pipeline_key(c) not in done]
    trials_left = max(0, min(trials - len(done), len(remaining)))
    first_id = 1 + max((int(c.id[1:]) for c in prior), default=-1)
    store.set_device(run_id, device_info)
    registry.notify("run_started", run_id=run_id, run={
        "out": str(out), "profile": profile.name, "space": len(candidates), "trials": trials_left,
        "resumed": len(prior) if resume is not None else None})
    registry.notify("devices_chosen", run_id=run_id, devices=device_info)
    records: list[CandidateRecord] = list(prior)
    plan = SearchPlan(devices, device_info, remaining, trials_left, prior, done, first_id, cpus, concurrency,
                      avoid_cpu, time_budget, first, records=records)
    extras: dict[str, Any] = {"starting_points": {"device": {"arch": facts.arch, "isa": sorted(facts.isa),
                                                             "providers": list(facts.providers)},
                                                  "pipelines": [_step_text(p) for p in first]}}

    full: list[DiskFull] = []  # the store's disk filled (Ray Tune wraps what its callback raises)

    def on_candidate(record: CandidateRecord) -> None:
        records.append(record)
        try:
            store.add_candidate(run_id, record.to_json())
        except DiskFull as exc:
            full.append(exc)
            raise
        registry.notify("candidate_measured", run_id=run_id, candidate=record.to_json())

    status, error = "failed", None
    try:
        data = task.load_data(profile.search.seed)
        # time the model at its samples' sequence length (etc.), not 1: on the run's own copy of the profile
        for axis, size in task.measure_axes(profile.search.seed).items():
            profile.measurement.axes.setdefault(axis, size)
        registry.notify("base_model_started", run_id=run_id, task=task.name)
        base = get_base_model(task, data, profile.search.seed, progress_events(registry, run_id, task.name))
        plan.baseline_accuracy, baseline_onnx = _baseline_accuracy(task, base, data, prior)
        held_out = len(data["eval"])
        plan.sample = task.feeds(data["eval"].rows(0, min(SAMPLE_ROWS, held_out))) if held_out else None
        write_samples(out, plan.sample)
        if baseline_onnx is not None:  # the starting points may depend on what the model is made of
            facts = dataclasses.replace(facts, model_ops=model_ops(baseline_onnx))
            plan.first = starting_points(techniques, candidates, facts, profile.search.max_pipeline_length)
            extras["starting_points"]["pipelines"] = [_step_text(p) for p in plan.first]
        registry.notify("base_model_ready", run_id=run_id, trained_now=base.trained_now,
                        accuracy=plan.baseline_accuracy if task.pretrained else base.accuracy,
                        quality_metric=task.quality_metric,
                        quality_compares=task.quality_compares() if hasattr(task, "quality_compares") else "")
        if trials_left > 0:
            _search(options, profile, task, base, techniques, plan, on_candidate, run_id, extras, registry)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
    except OrchestratorError as exc:
        status, error = "failed", exc
    except Exception as exc:  # a full disk (the store, under Tune's callback; a cache; Ray Tune): one line
        folders = [state_dir(), out, Path(tempfile.gettempdir())]
        if (full := full[0] if full else full_disk_during_run(exc, folders) if isinstance(exc, OSError) else None) is None:
            raise
        status, error = "failed", full
    finally:
        extras["quality_metric"] = task.quality_metric
        if profile.measurement.axes:
            extras["measurement_axes"] = dict(profile.measurement.axes)
        if (described := task.describe()) is not None:
            extras["model"] = described
        outcome = finish_run(store, run_id, loaded, task.name, device_info, records, out, status, error, extras,
                             plan.selection)
        registry.notify("run_finished", run_id=run_id, results=outcome.results)
        _trim_caches()
    return outcome


def _trim_caches() -> None:
    """Keep the caches under their size limit (orchestrator/state/cachelimit.py); a failure there never fails the run."""
    try:
        trim_caches()
    except (OrchestratorError, OSError) as exc:
        log.warning("cache not trimmed: %s", exc)


@dataclass
class SearchPlan:
    """What a run's search still has to do (all of it, or a resumed run's rest), and on what."""

    devices: list[Device]
    device_info: dict[str, Any]
    remaining: list[Any]  # candidates not measured yet
    trials_left: int
    prior: list[CandidateRecord]  # a resumed run's stored candidates
    done: set[str]  # their pipeline keys
    first_id: int  # the next candidate id's number
    cpus: int
    concurrency: int
    avoid_cpu: int | None  # the local device's core, kept free of trials
    time_budget: float | None
    first: list[Any] = field(default_factory=list)  # known-good starting points (orchestrator/search/starting.py)
    baseline_accuracy: float | None = None  # the exported base model's: trials refuse to measure far worse ones
    sample: dict[str, Any] | None = None  # the first held-out inputs (SAMPLE_ROWS): what the device times
    records: list[CandidateRecord] = field(default_factory=list)  # every candidate so far (the run's own list)
    selection: Selection | OrchestratorError | ValueError | None = None  # the run's one (`_select`), or why none


def _search(options: RunOptions, profile: Profile, task: Any, base: Any, techniques: list[Any], plan: SearchPlan,
            on_candidate: Callable[[CandidateRecord], None], run_id: str, extras: dict[str, Any],
            registry: PluginRegistry) -> None:
    """The Ray Tune part of a run: leases, pool, sink, trials; every finished trial goes to `on_candidate` at once."""
    from orchestrator.search.final_round import run_final_round

    searcher, space, samples, labels = make_searcher(
        plan.remaining, plan.trials_left, profile.search.seed, profile, plan.prior, plan.first, task.quality_metric,
        lambda family: registry.notify("family_ruled_out", run_id=run_id, family=family))
    interrupts = Interrupts()
    with interrupts.installed(), ray_session(options.ray_address, plan.cpus) as ray:
        retake_sigterm()  # ray.init put its SIGTERM handler (sys.exit) over ours: a SIGTERM is a Ctrl-C again
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
        if any(t.stage == "architecture" for t in techniques):  # hardware-aware search is allowed

            seed = [] if options.fresh else past_points(plan.devices, profile, profile.constraints.latency_percentile)
            predictor = ray.remote(PredictorService).options(num_cpus=0, scheduling_strategy=here).remote(seed)
        payload = TrialPayload(task.spec(), base.state_dict_bytes, base.arch, profile, profile.search.seed,
                               pool, sink, plan.remaining if searcher is None else None, plan.avoid_cpu, predictor,
                               fresh=options.fresh, baseline_accuracy=plan.baseline_accuracy,
                               plugins=registry.origins(),
                               sample=plan.sample)

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
            interrupts.check()
            plan.selection = _select(plan.records, profile)  # once: the final round and the results read it
            extras["decision"] = run_final_round(
                plan.selection, profile, leases[0], cache_dir("models"),
                lambda finalists, rounds: registry.notify("final_round_started", run_id=run_id,
                                                          finalists=finalists, rounds=rounds), plan.sample)
            if predictor is not None:
                extras["latency_predictor"] = ray.get(predictor.quality.remote())
            if recorder.duplicates:
                extras["duplicate_trials"] = recorder.duplicates
        finally:
            if searcher is not None:  # what the search ruled out (an interrupted one too), and why
                extras["ruled_out"] = searcher.ruleout.ruled_out
            for actor in (pool, *leases, sink, *([predictor] if predictor is not None else [])):  # SSH closes with them
                ray.kill(actor)


def resume_run(run_id: str, registry: PluginRegistry,
               fresh: bool = False) -> RunOutcome:
    """Go on with a run that stopped before its end (Ctrl-C, a crash, kill -9), without repeating its trials.

    The run keeps its id, folder and candidates; the search runs the trials still missing
    from its budget (Optuna is told the finished ones), the rest of its time budget, and ends
    like an uninterrupted run (selection, results.json, report). Refused, with the reason,
    for a run that finished, or one that a live process still runs. The profile is the copy
    the store kept when the run started: the file may have moved, changed or gone since.
    """
    store = RunStore(store_path())
    run = store.get_run(run_id)
    if run["status"] in ("finished", "no_feasible"):
        raise RunNotResumable(f"run {run['id']} already finished ({run['status']}): nothing to resume")
    if run["status"] == "running" and _alive(run.get("pid"), run.get("host")):
        raise RunNotResumable(f"run {run['id']} is still running (pid {run['pid']} on {run['host']})")
    if run["damaged"]:  # what it did or was asked for is not all known: start a new run instead
        raise RunNotResumable(f"run {run['id']}: damaged in the run store ({run['damaged'][0]}); start a new run")
    opts = run["options"]
    profile_path = Path(run["profile_path"])
    if opts.get("profile_text") is not None:  # the copy the run started with
        loaded = profile_from_text(opts["profile_text"], profile_path)
        if not profile_path.is_file() or file_sha256(profile_path) != hashlib.sha256(
                opts["profile_text"].encode()).hexdigest():
            log.warning("run %s: %s %s; resuming with the profile as it was when the run started", run["id"],
                        profile_path, "changed since the run started" if profile_path.is_file() else "is gone")
    else:  # a run stored before profiles were kept in the store (its file's sha256 only): the file, unchanged
        if not profile_path.is_file():
            raise RunNotResumable(f"run {run['id']}: its profile {profile_path} is gone")
        if opts.get("profile_sha256") and file_sha256(profile_path) != opts["profile_sha256"]:
            raise RunNotResumable(f"run {run['id']}: {profile_path} changed since the run started; "
                                  "start a new run instead")
        loaded = load_profile(profile_path)
    options = RunOptions(task=run["task"], model=opts.get("model"), inputs=opts.get("inputs"), train=opts.get("train"), trials=opts.get("trials"), out_dir=Path(run["out_dir"]).parent,
                         ray_address=opts.get("ray_address"), num_cpus=opts.get("num_cpus"),
                         fresh=fresh)
    return execute_run(loaded, registry, options, resume=run)


def _alive(pid: int | None, host: str | None) -> bool:
    """Whether the process that owned a run still runs (this process itself does not count)."""
    return pid != os.getpid() and process_alive(pid, host)


def _select(records: list[CandidateRecord], profile: Profile) -> Selection | OrchestratorError | ValueError:
    """The run's one selection over its candidates (by id), or why there is none (`select`'s errors, kept)."""
    try:
        return select(sorted(records, key=lambda r: r.id), profile)
    except (NoFeasibleCandidate, ValueError) as exc:
        return exc


def finish_run(store: RunStore, run_id: str, loaded: LoadedProfile, task: str, device: dict[str, Any],
            records: list[CandidateRecord], out: Path, status: str, error: OrchestratorError | None,
            extras: dict[str, Any] | None = None, selected: Any = None) -> RunOutcome:
    """Write results.json / report.html / best.onnx from the run's one selection (`selected`), close the run."""
    records = sorted(records, key=lambda r: r.id)
    best = baseline = None
    if status == "finished":
        try:
            if isinstance(selection := selected or _select(records, loaded.profile), Exception):
                raise selection
            records, best, baseline = selection.candidates, selection.best, selection.baseline
            decided = (extras or {}).get("decision") or {}
            if decided.get("pick"):  # the final round decides among the feasible finalists
                best = next((c for c in selection.feasible if c.id == decided["pick"]), best)
        except NoFeasibleCandidate as exc:
            status, error = "no_feasible", exc
            records, baseline = exc.selection.candidates, exc.selection.baseline
        except ValueError as exc:  # the baseline itself failed: nothing to compare against
            status, error = "failed", OrchestratorError(f"run {run_id}: {exc}")
        try:
            for record in records:  # with their verdicts
                store.add_candidate(run_id, record.to_json())
        except DiskFull as exc:  # the store's disk is full: results.json still has them all
            status, error = "failed", exc
    candidates = [r.to_json() for r in records]
    results = {
        "schema_version": 1,
        "run_id": run_id,
        "status": status,
        "message": str(error) if error else None,
        "profile": loaded.profile.name,
        "profile_path": str(loaded.path.resolve()),
        "task": task,
        "device": device,
        "devices": device.get("devices") or [device],
        "constraints": loaded.profile.constraints.model_dump(),
        "objective": loaded.profile.objective.model_dump(),
        "baseline": baseline.to_json() if baseline is not None else None,
        "best": best.to_json() if best is not None else None,
        "candidates": candidates,
        **(extras or {}),
    }
    try:
        write_run_files(out, results, best.model_sha256 if best is not None else None)
    except DiskFull as exc:  # the run fails, in one line naming the folder (the first such); the store says so
        status, error = "failed", error if isinstance(error, DiskFull) else exc
    store.finish_run(run_id, status, best.id if best else None, str(error) if error else None)
    return RunOutcome(run_id, out, results, status, error, candidates)


def _step_text(pipeline: list[dict[str, Any]]) -> str:
    """'int8-static(activations=uint8, per_channel=True, ...)' + ..., or 'baseline'."""
    if not pipeline:
        return "baseline"
    return " + ".join(f"{s['technique']}({', '.join(f'{k}={v}' for k, v in sorted(s['params'].items()))})"
                      for s in pipeline)


def _baseline_accuracy(task: Any, base: Any, data: dict[str, Any],
                       prior: list[CandidateRecord]) -> tuple[float, bytes | None]:
    """(quality, ONNX bytes) of the exported base model on the held-out split: what the drop is measured from
    (a resumed run reads its stored baseline's; bytes None). A base model that cannot be loaded, exported or
    evaluated stops the run here, before any trial, with one line naming the stage."""
    for record in prior:
        if record.is_baseline and record.status == "ok" and record.metrics.accuracy is not None:
            return float(record.metrics.accuracy), None
    stage = "load"
    try:
        model = base.load(task)
        stage = "export"
        # an ONNX base model (`--model file.onnx`) is its own export
        onnx_bytes = as_onnx_bytes(model) if is_onnx(model) else export_onnx(task, model, data.get("calibration"))
        stage = "evaluate"
        return evaluate_onnx(task, onnx_bytes, data["eval"]), onnx_bytes
    except OrchestratorError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise BaselineError(f"the base model ({task.name}) failed at {stage}: {type(exc).__name__}: "
                            f"{text[0] if text else ''}") from exc
