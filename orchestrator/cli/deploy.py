"""`orchestrate deploy` and `orchestrate rollback`: the rollout of a run's chosen model (docs/rollout.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from orchestrator.cli.format import printable
from orchestrator.devices.registry import DeviceRegistry
from orchestrator.errors import DeployError, DeviceUnreachable, RunNotFound
from orchestrator.fleet.transports import deployable_reason
from orchestrator.rollout.deployments import DeploymentStore
from orchestrator.state.paths import store_path
from orchestrator.state.store import RunStore, read_results


def _say(text: str) -> None:
    """One line of the rollout's output; escaped, as device names and the errors devices report are in it."""
    click.echo(printable(text))


def _canary(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """`--canary abc`, `150%` or `-1` is a usage error (exit 2), found before any device or run is looked at."""
    from orchestrator.rollout.plan import canary_count

    try:
        canary_count(value, 1)
    except DeployError as exc:  # its message starts "--canary VALUE: ", which click says already
        raise click.BadParameter(f"{value!r}: {str(exc).split(': ', 1)[-1]}") from None
    return value


def _check_results(run_id: str) -> None:
    """The run's results.json, if there, has the shape a run writes (else one line naming it, exit 2)."""
    run = RunStore(store_path()).get_run(run_id)
    path = Path(run["out_dir"] or "") / "results.json"
    try:
        read_results(path)
    except (OSError, ValueError):
        pass  # missing or not JSON: the plan says so itself (no readable results.json)


def _resume_target(ident: str) -> None:
    """`deploy --resume ID`: ID must name a rollout (a prefix of its id) or a run; anything else is a usage error."""
    try:
        RunStore(store_path()).get_run(ident)
        return
    except RunNotFound:
        pass
    try:
        if DeploymentStore().get_rollout(ident)["id"].startswith(ident):  # its LIKE reads % and _ as wildcards
            return
    except DeployError:
        pass
    raise click.BadParameter(f"{ident!r} is neither a rollout nor a run id (orchestrate runs list)",
                             param_hint="'--resume RUN_ID'")


def _model_line(plan: Any) -> str:
    c = plan.chosen
    return (f"run {c.run_id}, profile {c.profile}: model {c.candidate} ({c.label}), version {c.sha256[:12]}, "
            f"{c.precision}")


def _check_line(plan: Any, options: Any) -> str:
    spec = plan.spec
    limit = (f"latency {spec['latency_percentile']} <= {spec['max_latency_ms']:g} ms" if spec["max_latency_ms"]
             else "latency not limited by the profile")
    waves = f"canary {plan.canaries}, then {options.max_parallel} at a time" if plan.canaries else \
        f"no canary, {options.max_parallel} at a time"
    return (f"  health check: outputs within rtol {spec['rtol']:g} / atol {spec['atol']:g} of the host's, {limit}; "
            f"{sum(len(w) for w in plan.waves)} device(s): {waves}; on failure: {options.on_failure}")


def _wave_title(index: int, plan: Any) -> str:
    return f"wave {index + 1}{' (canary)' if index == 0 and plan.canaries else ''}"


def _printer(verbose_health: bool = True):
    """How the rollout's events are shown: one line per wave and per device outcome."""
    from orchestrator.rollout.healthcheck import describe_health

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "rollout":
            plan = data["plan"]
            verb = "resuming" if data["resumed"] else "rollout"
            _say(f"{verb} {data['rollout_id']}: {_model_line(plan)}")
            _say(_check_line(plan, data["options"]))
            for name, why in plan.not_deployable.items():
                _say(f"  not deployed to {name}: {why}")
        elif kind == "wave":
            title = f"wave {data['index']}{' (canary)' if data['canary'] else ''}"
            _say(f"{title}: {', '.join(data['devices'])}")
        elif kind == "device":
            state, name = data["state"], data["name"]
            if state == "healthy":
                was = data.get("previous_version")
                _say(f"  {name}: installed{f' (was {was[:12]})' if was else ''}, {describe_health(data.get('health'))}")
            elif state == "rolled-back":
                _say(f"  {name}: ROLLED BACK: {data.get('error')}")
            elif state == "failed":
                _say(f"  {name}: FAILED: {data.get('error')}")
            elif state == "offline":
                _say(f"  {name}: offline, left for --resume: {data.get('error')}")
            elif state == "skipped":
                _say(f"  {name}: skipped ({data.get('error')})")
        elif kind == "finished" and data["status"] == "done":
            _say(f"done: rollout {data['rollout_id']}: {data['message']}")
        elif kind == "rolled_back":
            if "error" in data:
                _say(f"  {data['name']}: NOT rolled back: {data['error']}")
            else:
                to = data["to"][:12] if data["to"] else "nothing (current removed)"
                _say(f"  {data['name']}: {(data['from'] or '-')[:12]} -> {to}")
    return on_event


@click.command("deploy")
@click.argument("run_id", required=False)
@click.option("--profile", "profile_name", help="Only this profile of the run (by name).")
@click.option("--canary", default="1", show_default=True, callback=_canary,
              help="Devices that go first and must all pass their health check: a number (2) or a share (10%).")
@click.option("--max-parallel", "-k", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Devices installed at the same time after the canaries (the size of each later wave).")
@click.option("--on-failure", type=click.Choice(["stop", "continue"]), default="stop", show_default=True,
              help="After a canary, a failed device is rolled back and the rollout stops, or goes on and reports.")
@click.option("--keep", default=3, show_default=True, type=click.IntRange(2, 100),
              help="Versions each device keeps (the current one and those before it).")
@click.option("--dry-run", is_flag=True, help="Print the plan and what each device has now; install nothing.")
@click.option("--resume", is_flag=True,
              help="Go on with a rollout that left devices offline (RUN_ID: a rollout or run id; default the newest).")
@click.option("--force", is_flag=True,
              help="With --resume: go on even with a superseded rollout (by its id), or one whose model is older "
                   "than what a device got since.")
@click.option("--command-timeout", default=120.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds an upload or agent command may take on a device before it counts as lost.")
@click.option("--connect-timeout", default=None, type=click.FloatRange(min=0.1),
              help="Seconds to connect (default: the device's registered timeout).")
@click.pass_context
def deploy(ctx: click.Context, run_id: str | None, profile_name: str | None, canary: str, max_parallel: int,
           on_failure: str, keep: int, dry_run: bool, resume: bool, force: bool, command_timeout: float,
           connect_timeout: float | None) -> None:
    """Roll a run's chosen model out to its profile's devices: canaries, health checks, rollback on failure.

    \b
    orchestrate deploy RUN_ID --dry-run
    orchestrate deploy RUN_ID --canary 10% --max-parallel 4
    orchestrate deploy --resume
    """
    from orchestrator.rollout.execute import deploy as run_deploy
    from orchestrator.rollout.execute import find_resumable
    from orchestrator.rollout.plan import RolloutOptions, chosen_models, device_views, make_plan

    if resume:
        if dry_run:
            raise click.UsageError("--dry-run cannot be used with --resume")
        for name in ("canary", "max_parallel", "on_failure", "keep"):
            if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
                raise click.UsageError(f"--{name.replace('_', '-')} cannot be used with --resume "
                                       "(the rollout goes on with its own options)")
    elif force:
        raise click.UsageError("--force goes with --resume only")
    elif not run_id:
        raise click.UsageError("give the RUN_ID whose chosen model to deploy (orchestrate runs list), or --resume")
    options = RolloutOptions(canary=canary, max_parallel=max_parallel, on_failure=on_failure, keep=keep,
                             command_timeout_s=command_timeout, connect_timeout_s=connect_timeout)
    if resume:
        if run_id:
            _resume_target(run_id)
        stored = find_resumable(run_id, profile_name, force=force)
        _check_results(stored["run_id"])
        chosen = chosen_models(stored["run_id"], stored["profile"])[0]
        if chosen.sha256 != stored["model_sha256"]:
            raise DeployError(f"rollout {stored['id']}: run {stored['run_id']} now chooses another model; "
                              "start a new rollout")
        run_deploy(chosen, options, _printer(), resume=stored, force=force)
        return
    _check_results(run_id)
    for chosen in chosen_models(run_id, profile_name):
        if dry_run:
            plan = make_plan(chosen, options)
            _say(f"plan (dry run, nothing is installed): {_model_line(plan)}")
            _say(_check_line(plan, options))
            views = device_views(plan, options)
            for index, wave in enumerate(plan.waves):
                _say(f"{_wave_title(index, plan)}:")
                for name in wave:
                    _say(f"  {name}: {views[name]}")
            for name, why in plan.not_deployable.items():
                _say(f"not deployed to {name}: {why}")
            continue
        run_deploy(chosen, options, _printer())


@click.command("rollback")
@click.option("--profile", "profile_name", help="Every device of this profile (by name).")
@click.option("--device", "device_names", multiple=True, help="This device (repeatable).")
@click.option("--max-parallel", "-k", default=4, show_default=True, type=click.IntRange(1, 64))
def rollback(profile_name: str | None, device_names: tuple[str, ...], max_parallel: int) -> None:
    """Return devices to the version they ran before their current one.

    \b
    orchestrate rollback --profile rpi4
    orchestrate rollback --device pi-kitchen
    """
    from orchestrator.rollout.execute import rollback_devices

    if profile_name and device_names:
        raise click.UsageError("--profile cannot be used with --device")
    if not profile_name and not device_names:
        raise click.UsageError("give --profile NAME or --device NAME")
    registry = DeviceRegistry()
    if profile_name:
        names = [d.name for d in registry.list(profile_name) if deployable_reason(d.device()) is None]
        if not names:
            # as `deploy` says it (exit 4, README "Exit codes"): not a usage error, the fleet lacks the devices
            raise DeviceUnreachable(f"profile {profile_name!r} has no registered device to roll back")
    else:
        names = [registry.get(n).name for n in device_names]
    _say(f"rolling back {len(names)} device(s): {', '.join(names)}")
    rollback_devices(names, max_parallel, _printer())
