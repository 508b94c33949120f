"""The plan of a rollout: the run's chosen model, the devices in waves, what their health check compares.

`orchestrate deploy --dry-run` prints it (with what each device has now); orchestrator/rollout/execute.py runs it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.config.profile import load_profile
from orchestrator.devices.registry import DeviceRegistry, RegisteredDevice
from orchestrator.devices.transport import Deployable
from orchestrator.errors import DeployError, DeviceUnreachable, HostKeyMismatch, MeasurementError
from orchestrator.fleet.transports import deploy_target, deployable_reason
from orchestrator.models.modelfacts import model_precision
from orchestrator.rollout.healthcheck import HEALTH_RUNS, HEALTH_TIME_BUDGET_S, health_spec
from orchestrator.search.selection import pipeline_label
from orchestrator.state.paths import cache_dir, store_path
from orchestrator.state.store import SAMPLES_FILE, RunStore

#: What makes a device's `Deployable`: (registered device, command timeout, connect timeout) -> Deployable.
TargetFactory = Callable[..., Deployable]


@dataclass
class ChosenModel:
    """A run's pick for one profile, as read from its results.json and the model cache."""

    run_id: str
    profile: str
    candidate: str
    label: str
    sha256: str
    path: Path
    precision: str
    constraints: dict[str, Any]
    samples: Path | None = None  # the run's held-out input rows (samples.npz): what the health check feeds


@dataclass
class RolloutOptions:
    """How to roll out: canaries (N or P%), devices at a time, failure policy, versions kept, timeouts."""

    canary: str = "1"
    max_parallel: int = 1
    on_failure: str = "stop"  # "stop" | "continue"
    keep: int = 3
    command_timeout_s: float = 120.0
    connect_timeout_s: float | None = None
    health_runs: int = HEALTH_RUNS
    health_time_budget_s: float = HEALTH_TIME_BUDGET_S


@dataclass
class Plan:
    """Who gets the model, in which wave, and what their health check needs."""

    chosen: ChosenModel
    devices: dict[str, RegisteredDevice]
    waves: list[list[str]]
    canaries: int
    spec: dict[str, Any]
    not_deployable: dict[str, str] = field(default_factory=dict)  # name -> why its transport cannot be deployed to


# ------------------------------------------------------------------------------------------ the plan


def chosen_models(run_id: str, profile: str | None = None) -> list[ChosenModel]:
    """The run's chosen model per profile it covered (one profile per run today), checked by sha256."""
    run = RunStore(store_path()).get_run(run_id)
    out = Path(run["out_dir"] or "")
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        raise DeployError(f"run {run['id']} ({run['status']}) has no readable results.json in {out}") from None
    best = results.get("best")
    if not best or not best.get("model_sha256"):
        why = run["message"] or results.get("message") or "no candidate was picked"
        raise DeployError(f"run {run['id']} has no chosen model to deploy (status {results.get('status')}: {why})")
    if profile is not None and profile != results["profile"]:
        raise DeployError(f"run {run['id']} chose a model for profile {results['profile']!r}, not {profile!r}")
    sha = best["model_sha256"]
    for path in (cache_dir("models") / f"{sha}.onnx", out / "best.onnx"):
        if path.is_file():
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() == sha:
                break
    else:
        raise DeployError(f"run {run['id']}: its chosen model {sha[:12]} is neither in the model cache nor "
                          f"{out / 'best.onnx'} (or it no longer matches its sha256)")
    return [ChosenModel(run_id=run["id"], profile=results["profile"], candidate=best["id"],
                        label=pipeline_label(best), sha256=sha, path=path, precision=model_precision(data),
                        constraints=results.get("constraints") or {},
                        samples=out / SAMPLES_FILE if (out / SAMPLES_FILE).is_file() else None)]


def canary_count(spec: str, devices: int) -> int:
    """How many canaries `--canary N` or `--canary P%` means for this many devices (a percentage rounds up)."""
    text = str(spec).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
    if match:
        share = float(match.group(1))
        if not 0 < share <= 100:
            raise DeployError(f"--canary {text}: a percentage must be above 0 and at most 100")
        return min(devices, max(1, math.ceil(devices * share / 100)))
    if not text.isdigit():
        raise DeployError(f"--canary {text!r}: give a number of devices (2) or a percentage (10%)")
    return min(devices, int(text))


def make_plan(chosen: ChosenModel, options: RolloutOptions, registry: DeviceRegistry | None = None) -> Plan:
    """The waves for one chosen model: devices tagged `canary` first, then by name; canaries, then K at a time.

    Only devices whose transport can be deployed to (the `Deployable` capability) are in the waves;
    the others are in `not_deployable`, each with the reason, which the rollout reports.
    """
    canary_count(options.canary, 1)  # a bad --canary is refused before any device is looked at
    if options.on_failure not in ("stop", "continue"):
        raise DeployError(f"on_failure must be 'stop' or 'continue', not {options.on_failure!r}")
    registry = registry or DeviceRegistry()
    registered = registry.list(chosen.profile)
    reasons = {d.name: deployable_reason(d.device()) for d in registered}
    not_deployable = {name: why for name, why in reasons.items() if why is not None}
    devices = [d for d in registered if reasons[d.name] is None]
    if not devices:
        cannot = "".join(f"; {name}: {why}" for name, why in not_deployable.items())
        raise DeviceUnreachable(f"profile {chosen.profile!r} has no registered device to deploy to "
                                f"(orchestrate devices register NAME ... --profile <{chosen.profile}.yaml>){cannot}")
    devices.sort(key=lambda d: ("canary" not in d.tags, d.name))
    names = [d.name for d in devices]
    canaries = canary_count(options.canary, len(names))
    k = max(1, options.max_parallel)
    rest = names[canaries:]
    waves = ([names[:canaries]] if canaries else []) + [rest[i:i + k] for i in range(0, len(rest), k)]
    runtime, batch = {}, 1
    if Path(devices[0].profile_path).is_file():  # the devices were checked against this profile at registration
        profile = load_profile(devices[0].profile_path).profile
        runtime, batch = profile.runtime.model_dump(), profile.measurement.batch_size
        chosen.constraints = chosen.constraints or profile.constraints.model_dump()
    spec = health_spec(chosen.precision, chosen.constraints, runtime, batch, options.health_runs,
                       options.health_time_budget_s)
    return Plan(chosen, {d.name: d for d in devices}, waves, canaries, spec, not_deployable)


def device_views(plan: Plan, options: RolloutOptions, target_factory: TargetFactory = deploy_target) -> dict[str, str]:
    """What each device of a plan has now, one line each, asked of the devices at once (for --dry-run)."""
    def view(name: str) -> str:
        target = target_factory(plan.devices[name], options.command_timeout_s, options.connect_timeout_s)
        try:
            status = target.status()
        except (DeviceUnreachable, HostKeyMismatch, MeasurementError) as exc:
            return f"unreachable: {exc}"
        finally:
            target.close()
        current = status["current"]
        if current is None:
            return "no model deployed"
        health = current.get("health")
        said = "never checked" if not health else ("healthy" if health["healthy"] else "UNHEALTHY")
        same = " (already this version)" if current["version"] == plan.chosen.sha256 else ""
        return (f"{current['version'][:12]}{same} from run {current.get('run_id') or '?'} "
                f"({current.get('label') or '?'}), {said}; previous {(status['previous'] or '-')[:12]}")

    names = [n for wave in plan.waves for n in wave]
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        return dict(zip(names, pool.map(view, names)))
