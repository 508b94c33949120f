"""`orchestrate`: the command line. Errors become one line and a meaningful exit code here, nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import traceback
import webbrowser
from dataclasses import asdict
from pathlib import Path

import click
from rich.table import Table

from orchestrator.cli.cache import cache  # the `cache` command group
from orchestrator.cli.compare import compare_runs, print_comparison
from orchestrator.cli.console import out_console, print_candidates, run_with_progress
from orchestrator.cli.deploy import deploy, rollback  # noqa: E402  (`deploy` and `rollback`: the rollout)
from orchestrator.cli.devices import devices  # noqa: E402  (the `devices` command group)
from orchestrator.cli.format import cell, printable
from orchestrator.errors import ExitCode, OrchestratorError
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.signals import sigterm_as_interrupt, terminated
from orchestrator.state.paths import store_path
from orchestrator.state.sqlite import is_locked, locked_error
from orchestrator.state.store import RunStore, process_alive

_SHOW_TRACEBACK = False

#: What `ray.init(address=...)` joins: `auto`, `host:port` or `ray://host:port` (host a name, IPv4 or [IPv6]).
RAY_ADDRESS = re.compile(r"(?:ray://)?(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                         r":(?P<port>[0-9]{1,5})")


def _ray_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Checked before anything is loaded: Ray itself says what is wrong only after the base model was trained."""
    if value is None or value == "auto":
        return value
    match = RAY_ADDRESS.fullmatch(value)
    if not match or not 1 <= int(match.group("port")) <= 65535:
        raise click.BadParameter(f"{printable(repr(value))}: give host:port (e.g. 127.0.0.1:6379), "
                                 "ray://host:port (Ray Client) or auto")
    return value


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), help="Device profile YAML to search for.")
@click.option("--task", help="Task (model + data) from a plugin [default: the profile's `task`, else digits].")
@click.option("--model", "model", metavar="SOURCE",
              help="Your own model instead of a task: an .onnx file, a Hugging Face folder, or package.module:factory.")
@click.option("--inputs", "inputs", type=click.Path(path_type=Path, dir_okay=False), metavar="SAMPLES.npz",
              help="Representative inputs for --model: one array per model input (optionally `labels`).")
@click.option("--train", "train", type=click.Path(path_type=Path, exists=True), metavar="TRAIN",
              help="A training set for --model, separate from --inputs: a folder of .npy files or an uncompressed .npz, "
                   "read lazily; fine-tuning distils the model on it toward the fp32 model's outputs (no labels needed).")
@click.option("--trials", type=click.IntRange(min=1), help="Trial budget (default: the profile's search.trials).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Folder for OUT/<run-id>/ (best.onnx, results.json, report.html).")
@click.option("--ray-address", callback=_ray_address,
              help="Join an existing Ray cluster (host:port, ray://host:port or auto) instead of starting a local one.")
@click.option("--fresh", is_flag=True, help="Use no cached stage, accuracy or measurement: build and measure anew.")
@click.option("--resume", "resume_id", metavar="RUN_ID",
              help="Go on with a run that stopped (Ctrl-C, crash, kill -9) without repeating its finished trials.")
@click.option("--traceback", "show_traceback", is_flag=True, help="Show the full stack on errors.")
@click.option("-v", "--verbose", is_flag=True, help="More log lines.")
@click.version_option(package_name="edge-orchestrator")
@click.pass_context
def cli(ctx: click.Context, profile_path: Path | None, task: str | None, model: str | None, inputs: Path | None,
        train: Path | None, trials: int | None, out_dir: Path,
        ray_address: str | None, fresh: bool, resume_id: str | None, show_traceback: bool, verbose: bool) -> None:
    """Find, measure and pick the best compressed model for a device profile.

    \b
    orchestrate --profile device_profiles/x86-host.yaml
    orchestrate --profile examples/own-model.yaml --model model.onnx --inputs samples.npz
    orchestrate --profile P --model pkg.mod:factory --inputs samples.npz --train train.npz
    orchestrate --resume RUN_ID
    orchestrate plugins | runs list | runs show RUN_ID | cache info
    """
    global _SHOW_TRACEBACK
    _SHOW_TRACEBACK = show_traceback
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if ctx.invoked_subcommand is not None:
        if profile_path is not None:
            raise click.UsageError(f"--profile cannot be used with the {ctx.invoked_subcommand!r} command")
        return

    if resume_id is not None:
        if profile_path is not None or trials is not None:
            raise click.UsageError("--resume goes on with the run's own profile and budget: "
                                   "drop --profile/--trials")
        ctx.exit(run_with_progress(None, task, None, out_dir, ray_address, fresh=fresh, resume_id=resume_id))
    if profile_path is None:
        given = [name for name, value in (("--model", model), ("--task", task), ("--inputs", inputs),
                                          ("--train", train), ("--trials", trials)) if value is not None]
        if given:  # a search was asked for, without saying for which device profile
            hint = " (examples/own-model.yaml is one for this machine)" if model is not None else ""
            raise click.UsageError(f"{given[0]} needs --profile PROFILE.yaml: the device profile to search for{hint}")
        click.echo(ctx.get_help())
        ctx.exit(ExitCode.USAGE)
    if inputs is not None and model is None:
        raise click.UsageError("--inputs goes with --model (a task plugin brings its own data)")
    if train is not None and model is None:
        raise click.UsageError("--train goes with --model (a task plugin brings its own data)")
    if model is not None and task is not None:
        raise click.UsageError("give --model or --task, not both")
    problem = _out_problem(out_dir)
    if problem:  # found now, not after the base model was trained
        click.echo(f"error: --out {printable(out_dir)}: {problem}", err=True)
        ctx.exit(ExitCode.USAGE)
    ctx.exit(run_with_progress(profile_path, task, trials, out_dir, ray_address, fresh=fresh,
                               model=model, inputs=str(inputs) if inputs else None,
                               train=str(train) if train else None))


def _out_problem(out_dir: Path) -> str | None:
    """Why a run could not write its folder under `out_dir`, or None when it can.

    Creates nothing: a refused run leaves no folder behind; the run makes `out_dir` when it starts.
    The nearest existing ancestor must be a folder this user can write (and enter)."""
    path = Path(os.path.abspath(out_dir))
    while True:
        try:
            is_dir = path.is_dir()
            exists = is_dir or path.exists() or path.is_symlink()
        except OSError as exc:
            return f"cannot be made: {exc.strerror or exc}"
        if exists:
            break
        if path.parent == path:
            return "cannot be made: no such file or directory"
        path = path.parent
    if not is_dir:
        return "not a folder (a file is in the way)"
    if not os.access(path, os.W_OK | os.X_OK):
        if path == Path(os.path.abspath(out_dir)):
            return "not writable by this user"
        return "cannot be made: Permission denied"
    return None


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List installed plugins: name, version, techniques, tasks (broken ones with the reason)."""
    registry = get_plugin_manager()
    infos = [asdict(p) for p in registry.plugins.values()]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return


    table = Table("plugin", "package", "version", "techniques", "tasks", "hooks", "status")
    for p in infos:  # every cell escaped: a plugin chose these strings
        table.add_row(cell(p["name"]), cell(p["package"]), cell(p["version"]),
                      cell(", ".join(map(str, p["techniques"])) or "-"), cell(", ".join(map(str, p["tasks"])) or "-"),
                      cell(", ".join(map(str, p["hooks"])) or "-"),
                      f"[red]broken: {cell(p['error'])}[/red]" if p["error"] else "ok")
    out_console().print(table)


@cli.group()
def runs() -> None:
    """Runs in the run store."""


@runs.command("list")
@click.option("--limit", default=20, show_default=True)
def runs_list(limit: int) -> None:
    """The newest runs."""
    table = Table("run", "profile", "task", "status", "candidates", "best", "started")
    for r in RunStore(store_path()).list_runs(limit):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"]))
        table.add_row(cell(r["id"]), cell(r["profile"]), cell(r["task"]), cell(run_status(r, short=True)),
                      str(r["n_candidates"]), cell(r["best_id"] or "-"), started)
    out_console().print(table)


def run_status(run: dict, short: bool = False) -> str:
    """A run's status as stored, except a `running` run whose process is gone (kill -9, a crash, a reboot):
    that one is said to be stopped, with the process it had, never `running`."""
    if run["status"] != "running":
        return run["status"]
    owner = f"pid {run.get('pid')} on {run.get('host') or 'an unknown host'}"
    if not process_alive(run.get("pid"), run.get("host")):
        return f"stopped ({owner} gone)" if short else \
            f"stopped: its process ({owner}) is gone; orchestrate --resume {run['id']} goes on"
    return f"running ({owner})"


@runs.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="The stored run and its candidates as JSON.")
@click.option("--open", "open_report", is_flag=True, help="Open the run's report.html in the browser.")
def runs_show(run_id: str, as_json: bool, open_report: bool) -> None:
    """One run: status, where its files are, and its candidates."""
    run = RunStore(store_path()).get_run(run_id)
    if as_json:
        owner_alive = process_alive(run.get("pid"), run.get("host")) if run["status"] == "running" else None
        click.echo(json.dumps({**run, "owner_alive": owner_alive}, indent=2))
        return
    if open_report:


        report = Path(run["out_dir"] or "") / "report.html"
        if not report.is_file():
            raise OrchestratorError(f"run {run['id']}: no report at {report}")

        # webbrowser.open says whether a browser took the page (click.launch starts xdg-open and says 0 anyway)
        if not webbrowser.open(report.resolve().as_uri()):
            raise OrchestratorError(f"no browser could be started (set $BROWSER): open {report} yourself")
        click.echo(f"opened {report} in the browser")
        return
    click.echo(printable(f"run {run['id']}: profile {run['profile']}, task {run['task']}, status {run_status(run)}"))
    for what in run["damaged"]:  # the rest of the run is still shown
        click.echo(printable(f"warning: run {run['id']}: damaged in the run store: {what}"), err=True)
    if run["message"]:
        click.echo(f"  {run['message']}")
    click.echo(f"  output: {run['out_dir']}")
    print_candidates(run["candidates"], run["best_id"])


@runs.command("compare")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--json", "as_json", is_flag=True, help="The comparison as JSON.")
def runs_compare(run_a: str, run_b: str, as_json: bool) -> None:
    """What changed between two runs: the pick, and every candidate both runs tried."""
    store = RunStore(store_path())
    diff = compare_runs(store.get_run(run_a), store.get_run(run_b))
    if as_json:
        click.echo(json.dumps(diff, indent=2))
    else:
        print_comparison(diff)

cli.add_command(devices)
cli.add_command(cache)

cli.add_command(deploy)
cli.add_command(rollback)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turn errors into one line and an exit code."""
    try:
        # standalone_mode=False: click returns ctx.exit()'s code instead of calling sys.exit
        with sigterm_as_interrupt():  # `kill PID` stops a run as Ctrl-C does: candidates kept, resumable
            code = cli.main(args=argv, prog_name="orchestrate", standalone_mode=False)
        return code if isinstance(code, int) else ExitCode.OK
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return ExitCode.USAGE if isinstance(exc, click.UsageError) else ExitCode.ERROR
    except (KeyboardInterrupt, click.Abort):
        if terminated():
            click.echo("terminated (SIGTERM)", err=True)
            return ExitCode.TERMINATED
        click.echo("interrupted", err=True)
        return ExitCode.INTERRUPTED
    except OrchestratorError as exc:
        if _SHOW_TRACEBACK:
            traceback.print_exc()
        click.echo(f"error: {printable(exc, keep=chr(10))}", err=True)  # a device's words may be in it
        return exc.exit_code
    except Exception as exc:  # a bug: still one line unless asked for the stack
        if _SHOW_TRACEBACK:
            traceback.print_exc()
        if is_locked(exc):  # another process held a store past the busy timeout: not a bug of ours
            from orchestrator.devices.registry import registry_path

            locked = locked_error([store_path(), registry_path()])
            click.echo(f"error: {printable(locked)}", err=True)
            return locked.exit_code
        click.echo(printable(f"internal error: {type(exc).__name__}: {exc} (run with --traceback for details)"),
                   err=True)
        return ExitCode.ERROR
