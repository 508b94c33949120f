"""Candidates per minute with 1 and 2 workers, and with 1 and 2 leased devices, measured side by side.

Two experiments, each a set of whole searches through `execute_run` (the code path of
`orchestrate --profile`), each search with a Ray started for it with the CPUs the
configuration asks for, and the configurations interleaved in one process (A B, B A, ...)
so that load from elsewhere hits both alike:

- **workers**: compression-bound candidates. The profile searches prune-magnitude alone
  (13 candidates, the whole grid: half of them fine-tune for an epoch) with `fresh` (no
  cache read: every candidate is built, evaluated and measured) and a short measurement
  protocol, on two local devices pinned to CPU 0 and CPU 1, so a measurement never waits
  for a device. 1 worker = a Ray with 1 CPU (one trial at a time), 2 workers = 2 CPUs.
  Target: 2 workers at least 1.7x the candidates per minute of 1 worker on 2 cores.
- **devices**: measurement-bound candidates. The profile searches the graph-stage
  techniques (int8-static, int8-dynamic, fp16: 30 candidates; their builds and accuracies
  come from the stage and accuracy caches, filled by a warm-up search first) with a long
  measurement (3 s of timed runs each, after the agent's start); 1 device (pinned to CPU 0)
  against 2 devices (CPU 0 and CPU 1), with 3 trials in flight in both so the devices are
  the limit. Also printed: the ratio over the span between the first and the last timed run
  on a device (the agents' own clocks), which leaves out the trial workers' start.
  Every search measures on devices with names never used before, so the measurement cache
  has nothing for them and every candidate is really measured.

Candidates per minute count the window from the first trial's start to the last candidate's
arrival (Ray's start and the report are left out: they do not grow with the search); the
end-to-end figure is printed too. Ratios are per repetition (each pair ran back to back),
then the median.

    python bench/scaling.py            # full: 3 repetitions, about 20 minutes on an idle 2-core machine
    python bench/scaling.py --quick    # smoke run: 1 repetition, 6 candidates per device search (~8 minutes)

Writes bench/results/scaling.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.search_common import (  # noqa: E402
    TimedRun, caption, check, finish, machine, median, now, private_home, profile_variant, space_size, timed_run,
)

WORKERS_TARGET = 1.7


def local_devices(prefix: str, cpus: list[int]) -> list[Any]:
    """Local devices (this machine, the agent as a child process), one pinned to each of `cpus`."""
    from orchestrator.devices.base import Device

    return [Device(name=f"{prefix}-cpu{cpu}", transport="local", arch=platform.machine(), pinned_cpu=cpu)
            for cpu in cpus]


def summarize(run: TimedRun) -> dict[str, Any]:
    """What the results keep of one search."""
    devices: dict[str, int] = {}
    for r in run.ok:
        devices[str(r.get("device"))] = devices.get(str(r.get("device")), 0) + 1
    # The agents' own clocks around their timed runs: the measuring span leaves out the workers' start.
    timed = [(m["started_at"], m["finished_at"]) for r in run.ok
             if (m := r.get("measurement") or {}).get("started_at") and m.get("finished_at")]
    span = max(f for _, f in timed) - min(s for s, _ in timed) if len(timed) > 1 else float("nan")
    return {"status": run.status, "error": run.error, "candidates": len(run.records), "ok": len(run.ok),
            "failed": len(run.records) - len(run.ok), "errors": run.errors(),
            "window_s": round(run.window_s(), 2), "wall_s": round(run.wall_s, 2),
            "per_minute": round(run.per_minute(), 2), "per_minute_end_to_end": round(60 * len(run.ok) / run.wall_s, 2),
            "measuring_span_s": round(span, 2), "per_minute_measuring": round(60 * len(timed) / span, 2),
            "timed_runs_s": round(sum(f - s for s, f in timed), 2),
            "measured_by": devices,
            "cached_measurements": sum(1 for r in run.ok if (r.get("cached") or {}).get("measurement")),
            "cached_builds": sum(1 for r in run.ok if (r.get("cached") or {}).get("steps")),
            "mean_trial_s": round(sum(r["timing"]["trial_s"] for r in run.ok) / max(1, len(run.ok)), 3),
            "mean_measure_s": round(sum(r["timing"].get("measure_s", 0) for r in run.ok) / max(1, len(run.ok)), 3)}


def compare(name: str, runs: dict[str, list[dict[str, Any]]], low: str, high: str,
            target: float | None) -> dict[str, Any]:
    """Paired ratios (high / low per repetition) of candidates per minute, and their median."""
    pairs = [h["per_minute"] / lo["per_minute"] for lo, h in zip(runs[low], runs[high])]
    measuring = [h["per_minute_measuring"] / lo["per_minute_measuring"] for lo, h in zip(runs[low], runs[high])]
    out = {"experiment": name, "low": low, "high": high, "ratios": [round(p, 3) for p in pairs],
           "median_ratio": round(median(pairs), 3), "median_ratio_measuring": round(median(measuring), 3),
           "ratio_of_medians": round(median([r["per_minute"] for r in runs[high]])
                                     / median([r["per_minute"] for r in runs[low]]), 3)}
    if target is not None:
        out.update(target=target, met=out["median_ratio"] >= target)
    return out


def run_workers(folder: Path, reps: int) -> dict[str, Any]:
    """1 against 2 workers on compression-bound candidates (fresh, short measurement)."""
    loaded = profile_variant(folder, "bench-scaling-workers",
                             search={"techniques": ["prune-magnitude"], "max_pipeline_length": 1,
                                     "time_budget_s": 3600},
                             measurement={"warmup_runs": 5, "runs": 20, "time_budget_s": 1.0})
    size = space_size(loaded)
    devices = local_devices("bench-workers", [0, 1] if _cores() > 1 else [0])
    runs: dict[str, list[dict[str, Any]]] = {"1 worker": [], "2 workers": []}
    for rep in range(reps):
        order = [1, 2] if rep % 2 == 0 else [2, 1]
        for workers in order:
            label = "1 worker" if workers == 1 else "2 workers"
            run = timed_run(loaded, trials=size, num_cpus=workers, fresh=True, devices=devices)
            runs[label].append(summarize(run))
            _progress(f"workers rep {rep + 1}/{reps}: {label}: {len(run.ok)} candidates in {run.window_s():.1f} s "
                      f"= {run.per_minute():.1f}/min ({run.status})")
    return {"space": size, "profile": _profile_summary(loaded), "devices": [d.describe() for d in devices],
            "runs": runs, "comparison": compare("workers", runs, "1 worker", "2 workers", WORKERS_TARGET)}


def run_devices(folder: Path, reps: int, quick: bool) -> dict[str, Any]:
    """1 against 2 leased devices on measurement-bound candidates (cached builds, long measurement)."""
    techniques = ["int8-dynamic", "fp16"] if quick else ["int8-static", "int8-dynamic", "fp16"]
    seconds = 3.0
    search = {"techniques": techniques, "max_pipeline_length": 1, "time_budget_s": 3600}
    warm = profile_variant(folder, "bench-scaling-warm", search=search,
                           measurement={"warmup_runs": 2, "runs": 5, "time_budget_s": 1.0})
    loaded = profile_variant(folder, "bench-scaling-devices", search=search,
                             measurement={"warmup_runs": 10, "runs": 1_000_000, "time_budget_s": seconds})
    size = space_size(loaded)
    flight = 3  # trials in flight in both configurations: two measuring, one getting ready
    # The warm-up fills the stage and accuracy caches (they do not depend on the measurement protocol).
    warmed = timed_run(warm, trials=size, num_cpus=2, devices=local_devices("bench-warm", [0]))
    _progress(f"devices warm-up: {len(warmed.ok)} candidates built ({warmed.status})")
    cpus = [0, 1] if _cores() > 1 else [0, 0]
    runs: dict[str, list[dict[str, Any]]] = {"1 device": [], "2 devices": []}
    for rep in range(reps):
        order = [1, 2] if rep % 2 == 0 else [2, 1]
        for count in order:
            label = "1 device" if count == 1 else "2 devices"
            # New names: the measurement cache knows nothing measured on them, so all is measured.
            devices = local_devices(f"bench-dev-{uuid.uuid4().hex[:8]}", cpus[:count])
            run = timed_run(loaded, trials=size, num_cpus=flight, devices=devices)
            runs[label].append(summarize(run))
            _progress(f"devices rep {rep + 1}/{reps}: {label}: {len(run.ok)} candidates in {run.window_s():.1f} s "
                      f"= {run.per_minute():.1f}/min ({run.status})")
    return {"space": size, "profile": _profile_summary(loaded), "trials_in_flight": flight,
            "warm_up": summarize(warmed), "runs": runs,
            "comparison": compare("devices", runs, "1 device", "2 devices", None)}


def _cores() -> int:
    return os.cpu_count() or 1


def _profile_summary(loaded: Any) -> dict[str, Any]:
    p = loaded.profile
    return {"techniques": p.search.techniques, "max_pipeline_length": p.search.max_pipeline_length,
            "measurement": p.measurement.model_dump()}


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def table(result: dict[str, Any]) -> str:
    """The printed summary."""
    lines = [caption(result),
             "", "| experiment | configuration | candidates/min (median) | end to end /min | per repetition |",
             "| --- | --- | ---: | ---: | --- |"]
    for name in ("workers", "devices"):
        if name not in result:
            continue
        for label, rows in result[name]["runs"].items():
            lines.append(f"| {name} | {label} | {median([r['per_minute'] for r in rows]):.1f} "
                         f"| {median([r['per_minute_end_to_end'] for r in rows]):.1f} "
                         f"| {', '.join(format(r['per_minute'], '.1f') for r in rows)} |")
    lines.append("")
    for name in ("workers", "devices"):
        if name not in result:
            continue
        failed = sorted({e for rows in result[name]["runs"].values() for r in rows for e in r["errors"]})
        if failed:
            lines.append(f"WARNING: {name}: candidates failed, the ratio is not valid: {'; '.join(failed)}")
        c = result[name]["comparison"]
        verdict = f" (target >= {c['target']}: {check(c['met'])})" if "target" in c else ""
        measuring = (f"; between the first and the last timed run on a device: {c['median_ratio_measuring']:.2f}x"
                     if name == "devices" else "")
        lines.append(f"{name}: {c['high']} / {c['low']} = {c['median_ratio']:.2f}x, median of paired ratios "
                     f"{c['ratios']}{verdict}{measuring}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run both experiments (or one), print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, a small device experiment")
    parser.add_argument("--reps", type=int, help="repetitions of each pair (default 3; 1 with --quick)")
    parser.add_argument("--only", choices=["workers", "devices"], help="run one experiment")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the figures in docs/scaling.md")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/scaling.json)")
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    private_home()
    result: dict[str, Any] = {"schema_version": 1, "date": now(), "machine": machine(), "quick": args.quick,
                              "reps": reps}
    with tempfile.TemporaryDirectory(prefix="eo-bench-scaling-") as tmp:
        if args.only in (None, "workers"):
            result["workers"] = run_workers(Path(tmp), reps)
        if args.only in (None, "devices"):
            result["devices"] = run_devices(Path(tmp), reps, args.quick)
    return finish("scaling", result, table, args.out, docs=not args.no_docs)


if __name__ == "__main__":
    raise SystemExit(main())
