"""The share of a search's time spent outside compression, evaluation and measurement.

Whole searches through `execute_run` (the code path of `orchestrate --profile`), with
`fresh` (no cache read: every candidate is really built, evaluated and measured), on the
profile's fallback device (this machine, the agent pinned to the last core, trials on the
others: one worker slot on 2 cores). Each stored candidate's `timing` says how long its
trial took (`trial_s`) and how much of it was work: `build_s` (compression, including
fine-tuning), `evaluate_s` (accuracy on the held-out split) and `measure_s` (the device,
including waiting for a free one). Three shares of overhead are printed:

- **per trial**: 1 - sum(work) / sum(trial_s): what a trial spends on anything else (the
  worker's one-time setup of the task, data and base model; handing the model to the
  driver's sink; cache look-ups).
- **per worker slot** (the target applies to this one): 1 - sum(work) / (window x slots),
  where the window runs from the start of the first trial to the arrival of the last
  candidate on the driver: it adds what Ray Tune spends between trials (scheduling, the
  searcher, results reaching the driver), and an idle slot counts as overhead.
- **end to end**: the same over the whole execute_run (Ray's start and stop, loading the
  base model, selection, results.json and the report): fixed costs, for information.

Two workloads, run in turn: `demo` is the x86-host profile as shipped (12 trials, Optuna,
pruning with fine-tuning among them), `cheap` the graph-stage techniques alone with a short
measurement (a worst case: little work per trial, so fixed costs weigh most).
Target: under 10% per worker slot on the demo workload.

    python bench/overhead.py            # full: both workloads, 2 repetitions (about 12 minutes, idle 2 cores)
    python bench/overhead.py --quick    # smoke run: 4 trials per search, 1 repetition

Writes bench/results/overhead.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.search_common import (  # noqa: E402
    X86,
    TimedRun,
    caption,
    check,
    finish,
    machine,
    median,
    now,
    private_home,
    profile_variant,
    timed_run,
    work_s,
)

TARGET = 0.10


def slots(run: TimedRun, num_cpus: int) -> int:
    """Trials in flight at once, as execute_run decides it: a CPU is kept for the local fallback device."""
    device = run.results.get("device") or {}
    if device.get("source") == "fallback" and device.get("pinned_cpu") is not None:
        return max(1, num_cpus - 1)
    return num_cpus


def shares(run: TimedRun, num_cpus: int) -> dict[str, Any]:
    """The three overhead shares of one search, and the seconds behind them."""
    timed = [r for r in run.records if r.get("timing")]
    work = sum(work_s(r) for r in timed)
    trials = sum(r["timing"]["trial_s"] for r in timed)
    setup = sum(r["timing"].get("setup_s", 0.0) for r in timed)
    n = slots(run, num_cpus)
    window = run.window_s()
    return {"status": run.status, "candidates": len(run.records),
            "failed": sum(1 for r in run.records if r.get("status") == "failed"), "errors": run.errors(), "slots": n,
            "work_s": round(work, 2), "trials_s": round(trials, 2), "setup_s": round(setup, 2),
            "build_s": round(sum(r["timing"].get("build_s", 0.0) for r in timed), 2),
            "evaluate_s": round(sum(r["timing"].get("evaluate_s", 0.0) for r in timed), 2),
            "measure_s": round(sum(r["timing"].get("measure_s", 0.0) for r in timed), 2),
            "window_s": round(window, 2), "wall_s": round(run.wall_s, 2),
            "between_trials_s": round(window * n - trials, 2),
            "per_trial": 1 - work / trials if trials else float("nan"),
            "per_slot": 1 - work / (window * n),
            "end_to_end": 1 - work / (run.wall_s * n)}


def workloads(folder: Path, quick: bool) -> dict[str, tuple[Any, int]]:
    """name -> (loaded profile, trials)."""
    from orchestrator.config.profile import load_profile

    trials = 4 if quick else 12
    cheap = profile_variant(folder, "bench-overhead-cheap",
                            search={"techniques": ["int8-static", "int8-dynamic", "fp16"], "max_pipeline_length": 1,
                                    "time_budget_s": 3600},
                            measurement={"warmup_runs": 5, "runs": 40, "time_budget_s": 1.0})
    return {"demo": (load_profile(X86), trials), "cheap": (cheap, trials)}


def table(result: dict[str, Any]) -> str:
    """The printed summary."""
    lines = [caption(result), "",
             "| workload | candidates | work s | trials s | window s x slots | per trial | per worker slot "
             "| end to end |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, runs in result["runs"].items():
        for r in runs:
            lines.append(f"| {name} | {r['candidates']} | {r['work_s']:.1f} | {r['trials_s']:.1f} "
                         f"| {r['window_s']:.1f} x {r['slots']} | {100 * r['per_trial']:.1f}% "
                         f"| {100 * r['per_slot']:.1f}% | {100 * r['end_to_end']:.1f}% |")
    lines.append("")
    failed = sorted({e for runs in result["runs"].values() for r in runs for e in r["errors"]})
    if failed:
        lines.append(f"(failed candidates: {'; '.join(failed)})")
    for name, s in result["summary"].items():
        lines.append(f"{name}: median overhead per trial {100 * s['per_trial']:.1f}%, per worker slot "
                     f"{100 * s['per_slot']:.1f}%, end to end {100 * s['end_to_end']:.1f}%"
                     + (f" (target < {TARGET:.0%} per worker slot: {check(s['per_slot'] < TARGET)})"
                        if name == "demo" else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the workloads in turn, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 trials per search, 1 repetition")
    parser.add_argument("--reps", type=int, help="searches per workload (default 2; 1 with --quick)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs for Ray (as `orchestrate`)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the figures in docs/scaling.md")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/overhead.json)")
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 2)
    private_home()
    result: dict[str, Any] = {"schema_version": 1, "date": now(), "machine": machine(), "quick": args.quick,
                              "reps": reps, "num_cpus": args.num_cpus, "target": {"per_slot": TARGET,
                                                                                  "workload": "demo"}}
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="eo-bench-overhead-") as tmp:
        chosen = workloads(Path(tmp), args.quick)
        for rep in range(reps):
            names = list(chosen) if rep % 2 == 0 else list(reversed(chosen))
            for name in names:
                loaded, trials = chosen[name]
                run = timed_run(loaded, trials=trials, num_cpus=args.num_cpus, fresh=True)
                row = shares(run, args.num_cpus)
                runs.setdefault(name, []).append(row)
                print(f"rep {rep + 1}/{reps} {name}: {row['candidates']} candidates, overhead per trial "
                      f"{100 * row['per_trial']:.1f}%, per slot {100 * row['per_slot']:.1f}% ({run.status})",
                      file=sys.stderr, flush=True)
    result["runs"] = runs
    result["summary"] = {name: {k: median([r[k] for r in rows]) for k in ("per_trial", "per_slot", "end_to_end")}
                         for name, rows in runs.items()}
    result["target"]["met"] = result["summary"]["demo"]["per_slot"] < TARGET
    return finish("overhead", result, table, args.out, docs=not args.no_docs)


if __name__ == "__main__":
    raise SystemExit(main())
