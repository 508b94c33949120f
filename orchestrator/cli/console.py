"""Terminal output of a run: a progress bar on a terminal, plain log lines otherwise, then the front and the pick.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.api import hookimpl
from orchestrator.cli.format import cell, printable
from orchestrator.config.profile import load_profile
from orchestrator.errors import ExitCode
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.metrics import TERMINAL, Metric, shown_in
from orchestrator.metrics import metric as metric_row
from orchestrator.search.selection import pipeline_label
from orchestrator.signals import terminated
from orchestrator.state.store import DAMAGED


def out_console() -> Console:
    """Console for stdout: the terminal's width, or wide enough for tables when piped."""
    # piped: lines are never wrapped (a script reads one line per message), tables get 160 columns
    return Console() if sys.stdout.isatty() else Console(width=160, soft_wrap=True)


def print_candidates(candidates: list[dict[str, Any]], best_id: str | None, only_front: bool = False,
                     console: Console | None = None, objective: str | None = None) -> None:
    """A table of candidates (or of the Pareto front) with the pick marked.

    Its metric columns are the table of metrics' terminal rows (orchestrator/metrics.py), and the
    profile's `objective` metric where it is not one of them.
    """
    console = console or out_console()
    columns = shown_in(TERMINAL, objective)
    table = Table("", "id", "pipeline", *(m.column("terminal") for m in columns), "feasible")
    for c in candidates:
        if only_front and not c.get("on_front") and c["id"] != best_id:
            continue
        m = c.get("metrics") or {}
        table.add_row("★" if c["id"] == best_id else "", cell(c["id"]), cell(candidate_label(c)),
                      *(_metric_text(row, m) for row in columns), _status_text(c))
    console.print(table)


def _metric_text(row: Metric, metrics: dict[str, Any]) -> str:
    """A metric's cell: its value as the table says, '-' when not measured, '(est.)' after an estimated one."""
    tag = row.tag(metrics)
    return row.text(metrics) + (" (est.)" if tag == "estimated" else f" ({tag})" if tag else "")


def candidate_label(candidate: dict[str, Any]) -> str:
    """The pipeline's label, or `(damaged record)` for a candidate whose stored record cannot be read."""
    return "(damaged record)" if candidate.get("status") == DAMAGED else pipeline_label(candidate)


def _status_text(c: dict[str, Any]) -> str:
    if c["status"] == "rejected":
        return "no: accuracy (not measured)"
    if c["status"] != "ok":
        return cell(f"{c['status']}: " + (c.get("error") or "")[:60])
    return "yes" if c.get("feasible") else "no"


class TerminalReporter:
    """The terminal's view of a run: a plugin fed by the same event hooks as any other (pytest's TerminalReporter).

    A rich progress bar on a terminal, one log line per event otherwise (pipes, CI).
    """

    def __init__(self) -> None:
        self.err = Console(stderr=True)
        self.tty = sys.stderr.isatty()
        self.progress = None
        self.bar = None
        self.done = 0
        self.total = 0
        self.best_text = ""
        self.best_lat = 0.0
        self.own_model = False  # a model brought with --model: used as given, never trained
        self.quality = "acc"  # what a candidate's quality is called (cosine, top1, ... for a model brought with --model)
        self.started = time.monotonic()

    def log(self, text: str) -> None:
        """One time-stamped line above the progress bar (or on stderr)."""
        stamp = f"[{time.monotonic() - self.started:6.1f}s]"
        if self.progress is not None:
            self.progress.console.print(f"{stamp} {text}", highlight=False)
        else:
            self.err.print(f"{stamp} {text}", highlight=False, soft_wrap=True)

    @hookimpl
    def run_started(self, run_id: str, run: dict[str, Any]) -> None:
        self.total = run["trials"]
        resumed = f", resuming with {run['resumed']} candidates kept" if run.get("resumed") is not None else ""
        self.log(f"run {run_id}: {run['space']} candidates in the space, {self.total} trials"
                 f"{resumed}; output in {run['out']}")

    @hookimpl
    def devices_chosen(self, devices: dict[str, Any]) -> None:
        self.log(devices["note"])
        for skipped in devices.get("unreachable", []):
            self.log(f"skipped: {skipped['reason']}")

    @hookimpl
    def base_model_started(self, task: str) -> None:
        self.own_model = task == "own-model"
        self.log(f"loading the {task} base model" + ("" if task == "own-model" else " (trained on first use, then cached)"))

    @hookimpl
    def base_model_progress(self, epoch: int, epochs: int, elapsed_s: float, left_s: float | None) -> None:
        left = f", about {_duration(left_s)} left" if left_s is not None and epoch < epochs else ""
        self.log(f"training the base model: epoch {epoch}/{epochs}, {_duration(elapsed_s)} so far{left}")

    @hookimpl
    def base_model_ready(self, accuracy: float, trained_now: bool, quality_metric: str,
                         quality_compares: str = "") -> None:
        how = "as given, not trained" if self.own_model else "trained now" if trained_now else "from cache"
        self.quality = "acc" if quality_metric in ("accuracy", "labels") else quality_metric
        if quality_compares:
            self.log(f"quality: {quality_metric} to fp32, comparing {quality_compares}")
        self.log(f"base model ready ({how}), held-out {self.quality} {accuracy:.4f}; starting Ray")
        self._start_bar()

    @hookimpl
    def candidate_measured(self, candidate: dict[str, Any]) -> None:
        data = candidate
        self.done += 1
        m = data.get("metrics") or {}
        if data["status"] == "ok":
            lat = (m.get("latency_ms") or {}).get("p50")
            text = f"{self.quality} {m.get('accuracy', 0):.4f}, p50 {lat:.3f} ms, {m.get('size_bytes', 0) / 1024:.0f} KiB"
            if (data.get("cached") or {}).get("measurement"):
                text += " (measurement from cache)"
            emu = data.get("measurement") or {}
            if emu.get("instructions"):  # counted on the emulated CPU model: what the p50 is made of
                text += (f" [EMULATED device: p50 {emu['latency_source']}, {emu['instructions']['median']:,.0f} "
                         f"instructions on {emu.get('qemu_cpu')} x a{'' if emu.get('calibrated') else 'n uncalibrated'}"
                         " cost model; aarch64 check passed]")
            elif emu.get("latency_source"):  # an emulated device: what the p50 is, and what emulation said
                emulated_p50 = (emu.get("emulated_latency_ms") or {}).get("p50")
                text += (f" [EMULATED device: p50 {emu['latency_source']}"
                         f"{', unverified' if emu.get('latency_constraint') == 'unverified' else ''}; "
                         f"aarch64 check passed; emulated p50 {emulated_p50 or 0:.1f} ms, information only]")
            if lat is not None and (not self.best_text or lat < self.best_lat):
                self.best_lat, self.best_text = lat, f"fastest so far {data['id']} {lat:.3f} ms"
        elif data["status"] == "rejected":
            text = f"{self.quality} {m.get('accuracy', 0):.4f}: {data.get('error')}"
        else:
            text = f"FAILED: {data.get('error')}"
        self.log(printable(f"candidate {self.done}/{self.total} {data['id']} {pipeline_label(data)}: {text}"))
        if self.progress is not None:
            self.progress.update(self.bar, completed=self.done, description=self.best_text or "searching")

    @hookimpl
    def family_ruled_out(self, family: dict[str, Any]) -> None:
        self.log(printable(family["message"]))

    @hookimpl
    def final_round_started(self, finalists: list[str], rounds: int) -> None:
        self.log(f"final round: {', '.join(finalists)} measured again together, up to {rounds} interleaved rounds")

    @hookimpl
    def run_finished(self) -> None:
        self.close()

    def _start_bar(self) -> None:
        if not self.tty:
            return

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.err, transient=True)
        self.progress.start()
        self.bar = self.progress.add_task("searching", total=self.total)

    def close(self) -> None:
        """Stop the progress bar (idempotent)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def quality_name(results: dict[str, Any]) -> str:
    """What the `accuracy` figures of a run measure: the task's accuracy, or agreement with the fp32 model."""
    metric = results.get("quality_metric") or "accuracy"
    return "accuracy" if metric == "labels" else f"quality ({metric} to fp32)" if metric in (
        "top1", "cosine", "detection", "segmentation", "relative_error") else metric


def pick_line(results: dict[str, Any]) -> str:
    """'picked c003 (int8-static): accuracy 0.9850 (drop 0.50 pts), p50 0.600 ms, 293 KiB', and the profile's
    objective metric (its label, value and unit from the table of metrics) where the line does not say it."""
    best = results["best"]
    m = best["metrics"]
    objective = (results.get("objective") or {}).get("metric")
    row = None if objective in (None, "accuracy", "latency_p50", "size_bytes") else metric_row(objective)
    own = "" if row is None else (f", {row.label} {row.text(m)} {row.unit}".rstrip()
                                  + (f" ({row.tag(m)})" if row.tag(m) else ""))
    return (f"picked {best['id']} ({pipeline_label(best)}): {quality_name(results)} {m['accuracy']:.4f} "
            f"(drop {m['accuracy_drop']:.2f} pts), p50 {m['latency_ms']['p50']:.3f} ms, "
            f"{m['size_bytes'] / 1024:.0f} KiB{own}")


def run_with_progress(profile_path: Path | None, task: str | None, trials: int | None, out_dir: Path,
                      ray_address: str | None, fresh: bool = False, resume_id: str | None = None,
                      model: str | None = None, inputs: str | None = None, train: str | None = None) -> int:
    """Load the profile and plugins, run (or resume a run), print the front and the pick; returns the exit code."""
    from orchestrator.run import RunOptions, execute_run, resume_run

    registry = get_plugin_manager()
    reporter = TerminalReporter()
    registry.add_plugin(reporter, "terminal-reporter")
    try:
        if resume_id is not None:
            outcome = resume_run(resume_id, registry, fresh=fresh)
        else:
            loaded = load_profile(profile_path)
            outcome = execute_run(loaded, registry, RunOptions(task=task, model=model, inputs=inputs, train=train, trials=trials, out_dir=out_dir,
                                                               ray_address=ray_address, fresh=fresh))
    finally:
        reporter.close()
    console = out_console()
    results = outcome.results
    best = results.get("best")
    objective = (results.get("objective") or {}).get("metric")
    if outcome.candidates:
        console.print("Pareto front of the feasible candidates (★ = pick):" if best else "Candidates:")
        print_candidates(outcome.candidates, best["id"] if best else None, only_front=bool(best), console=console,
                         objective=objective)
    if best:
        console.print(pick_line(results))
    decision = results.get("decision") or {}
    if decision.get("sentence"):
        console.print(f"final round: {decision['sentence']}", highlight=False)
    elif decision.get("error"):
        console.print(f"final round failed ({decision['error']}); the pick rests on the search's measurements")
    device = results.get("device") or {}
    if device.get("emulated"):
        unverified = device.get("latency_constraint") == "unverified"
        counted = device.get("latency_source") == "emulated-icount"
        why = "the cost model is not calibrated" if counted else "emulation.latency_scale not calibrated"
        console.print(f"EMULATED device {device.get('name')}: latency {device.get('latency_source', 'emulated')}"
                      + (f" on {device.get('qemu_cpu')}, {'calibrated' if device.get('calibrated') else 'uncalibrated'}"
                         if counted else "")
                      + (f" (unverified: {why})" if unverified else "")
                      + "; no real board of the profile measured this run (docs/emulation.md)", highlight=False)
        if device.get("latency_fallback"):
            console.print(device["latency_fallback"], highlight=False)
    written = [name for name in ("results.json", "report.html", "best.onnx", "best.session.json", "samples.npz")
               if (outcome.out_dir / name).is_file()]  # what is there (a full disk may have left none)
    if written:
        console.print(f"wrote {outcome.out_dir}/ ({', '.join(written)})")
    # the last line, as main() writes errors: one line whatever the width (rich would wrap it at 80 columns
    # when stderr is no terminal), its text escaped, never read as markup
    if outcome.status == "interrupted":
        how = "terminated (SIGTERM)" if terminated() else "interrupted"
        click.echo(f"{how}: {len(outcome.candidates)} candidates kept in run {outcome.run_id}; "
                   f"go on with: orchestrate --resume {outcome.run_id}", err=True)
        return ExitCode.TERMINATED if terminated() else ExitCode.INTERRUPTED
    if outcome.error is not None:
        click.echo(f"error: {printable(outcome.error, keep=chr(10))}", err=True)
        return outcome.error.exit_code
    return ExitCode.OK


def _duration(seconds: float) -> str:
    """Seconds as `45 s`, `3 min 20 s` or `1 h 05 min`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
