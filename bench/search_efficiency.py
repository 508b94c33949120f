"""How much of the grid the multi-objective search needs to find the candidate exhaustive search would pick.

1. The grid: one search through `execute_run` whose trial budget covers the whole space,
   so the project's `make_searcher` chooses grid search; every candidate is built, evaluated
   and measured once (or answered from the caches of an earlier run of this benchmark), and
   `selection.select` over all of them gives the grid's pick for the profile.
2. The search: for each of `--seeds` sampler seeds, one search with a budget smaller than
   the space, so `make_searcher` chooses Optuna's multi-objective TPE (the baseline first,
   then what the sampler proposes; duplicates are not counted). Every candidate is answered
   from the caches the grid filled (the stored candidates say `cached`), so its latency is
   the very number the grid saw, and "found the grid's pick" is well defined: the pick's
   pipeline is among the candidates evaluated. The count is the position of the first
   evaluation of it (1 = the first candidate); a seed that does not find it within the
   budget counts as not found (more than the budget).

Only the sampler's seed changes between searches: the profile's `search.seed` also seeds
the base model, the data split and the calibration, which must stay as they are for the
caches to answer, so the benchmark wraps `make_searcher` where `orchestrator.run` calls it, to pass
another seed to `TPESampler` (and checks that the wrapper was used).

The profile's pick uses `objective.tie_within` (`--tie`, 3%): latencies within 3% of the
fastest feasible one are a tie, which goes to the more accurate candidate. Without it the pick
is the fastest, however close the next one is: among variants of one technique whose
latencies differ by less than the measurement's noise, which one that is changes from one
measurement to the next, and no sampler can learn it. Both picks are printed (the searches
are the same; only the selection over the grid differs).

On the latency objective the grid's pick is then confirmed as a run's final round would decide
it, but among all of the grid's feasible candidates: every one of them (the baseline too) is
measured again, together, in one agent process, in `--confirm-rounds` (60) interleaved rounds,
and the profile's rule (`final_round.decide`) picks. The target counts evaluations to that
confirmed pick; the grid's own pick is printed too. (Until 2026-12-01 only the candidates
within 30% of the grid's fastest were confirmed, in 30 rounds: that pool was chosen by the
grid's single measurements, which move by up to 118% on this machine, and in the run of
2026-12-01 10:48 it left out the two candidates that were fastest in 60 rounds.)

Siblings, from the same rounds: a sibling of the confirmed pick runs within `tie_within` of the
pick's median and its accuracy cannot be told from the pick's (exact McNemar test on the images
one gets right and the other wrong, p >= 0.05). Printed with the evaluations to the first
sibling: when the pick differs from its siblings only by a few images, this is what the search
can be asked to find.

Also printed: evaluations until a candidate that is as good as the pick within the
measurement's noise (feasible, objective within `--tolerance` of the pick's), and what
uniform random sampling would need on average to find the pick ((N + 1) / 2).

Target: the median over 5 seeds at most 25% of the grid, on a space of at least 48.

    python bench/search_efficiency.py           # full: int8-static, int8-dynamic, fp16, prune-structured
                                                # (84 candidates), 5 seeds; the grid takes about 15 minutes
                                                # on an idle 2-core machine the first time, then is cached
    python bench/search_efficiency.py --quick   # smoke run: the 54 graph-stage candidates, 2 seeds

Writes bench/results/search_efficiency.json and prints a table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.search_common import (  # noqa: E402
    caption,
    check,
    finish,
    interleaved_rounds,
    machine,
    median,
    now,
    private_home,
    profile_variant,
    space_size,
    timed_run,
)

TARGET_SHARE = 0.25
MIN_SPACE = 48
FULL_TECHNIQUES = ["int8-static", "int8-dynamic", "fp16", "prune-structured"]
QUICK_TECHNIQUES = ["int8-static", "int8-dynamic", "fp16"]


class SamplerSeed:
    """Wraps make_searcher (as orchestrator.run calls it) so the next searches' TPE sampler gets `seed`."""

    def __init__(self) -> None:
        import orchestrator.run as run

        self.module, self.original = run, run.make_searcher
        self.seed: int | None = None
        self.used: list[int] = []

    def __enter__(self) -> SamplerSeed:
        def make_searcher(candidates, trials, seed, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if self.seed is not None:
                seed = self.seed
                self.used.append(seed)
            return self.original(candidates, trials, seed, *args, **kwargs)

        self.module.make_searcher = make_searcher
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.make_searcher = self.original


def key(record: dict[str, Any]) -> str:
    from orchestrator.search.searcher import pipeline_key

    return pipeline_key(record.get("pipeline") or [])


def label(record: dict[str, Any]) -> str:
    """A candidate's pipeline with its parameters, short."""
    steps = record.get("pipeline") or []
    if not steps:
        return "baseline"
    return " + ".join(f"{s['technique']}({', '.join(f'{k}={v}' for k, v in s['params'].items())})" for s in steps)


def main(argv: list[str] | None = None) -> int:
    """For each objective: the grid, then one search per seed; print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: the 54 graph-stage candidates, 2 seeds")
    parser.add_argument("--seeds", type=int, help="sampler seeds (default 5; 2 with --quick)")
    parser.add_argument("--objectives", default="size_bytes,latency_p50",
                        help="the profile objectives to run, comma-separated (default: size_bytes,latency_p50)")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="each search's trial budget as a share of the space (below 1: Optuna, not grid)")
    parser.add_argument("--tolerance", type=float, default=0.03,
                        help="'as good as the pick': feasible and objective within this share of the pick's")
    parser.add_argument("--tie", type=float, default=0.03,
                        help="the profile's objective.tie_within: values within this share of the best tie "
                             "and the more accurate candidate is the pick (0: the best, however close)")
    parser.add_argument("--remeasure", type=int, default=3,
                        help="latency objective: measure the pick and the next two feasible candidates this many "
                             "times more each, to show the run-to-run noise (0: skip)")
    parser.add_argument("--confirm-rounds", type=int, default=60,
                        help="latency objective: interleaved rounds of every feasible candidate that confirm the "
                             "grid's pick and show its siblings (0: the grid's single measurements decide the pick)")
    parser.add_argument("--sampler-alone", action="store_true",
                        help="also run every seed's search without the refinement around the starting points "
                             "(searcher.REFINE_EVERY = 0), side by side")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the figures in docs/scaling.md")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/search_efficiency.json)")
    args = parser.parse_args(argv)
    if args.confirm_rounds and args.confirm_rounds < 3:  # the final round's own minimum
        parser.error("--confirm-rounds must be 0 (skip) or at least 3")
    seeds = list(range(1, 1 + (args.seeds or (2 if args.quick else 5))))
    private_home()

    result: dict[str, Any] = {"schema_version": 2, "date": now(), "machine": machine(), "quick": args.quick,
                              "objectives": {}}
    with tempfile.TemporaryDirectory(prefix="eo-bench-efficiency-") as tmp:
        for metric in args.objectives.split(","):
            result["objectives"][metric] = one_objective(args, Path(tmp), metric.strip(), seeds)
    return finish("search_efficiency", result, table, args.out, docs=not args.no_docs)


def objective_profile(folder: Path, metric: str, techniques: list[str], tie: float) -> Any:
    """The benchmark's profile for `metric` (bench/search_replay.py loads the same one: the caches answer it)."""
    return profile_variant(
        folder, f"bench-search-efficiency-{metric.replace('_', '-')}",
        search={"techniques": techniques, "max_pipeline_length": 1, "time_budget_s": 7200, "seed": 0},
        measurement={"warmup_runs": 10, "runs": 200, "time_budget_s": 2.0},
        objective={"metric": metric, "tie_within": tie})


def one_objective(args: argparse.Namespace, tmp: Path, metric: str, seeds: list[int]) -> dict[str, Any]:
    """The grid and the seeded searches for a profile whose objective is `metric`."""
    from orchestrator.search.selection import metric_value, select

    loaded = objective_profile(tmp, metric, QUICK_TECHNIQUES if args.quick else FULL_TECHNIQUES, args.tie)
    profile = loaded.profile
    size = space_size(loaded)
    budget = min(size - 1, max(2, math.ceil(args.budget * size)))
    print(f"[{metric}] grid: {size} candidates ({', '.join(profile.search.techniques)}) ...", file=sys.stderr,
          flush=True)
    grid = timed_run(loaded, trials=size, num_cpus=2)
    if len(grid.records) != size or grid.status != "finished":
        raise SystemExit(f"the grid search did not cover the space: {len(grid.records)}/{size}, {grid.status}: "
                         f"{grid.error}")
    selection = select(grid.records, profile)
    pick = selection.best.to_json()  # this script reads candidates as results.json has them
    strict_profile = profile.model_copy(update={"objective": profile.objective.model_copy(
        update={"tie_within": 0.0})})
    strict = select(grid.records, strict_profile).best.to_json()
    feasible_records = [c.to_json() for c in selection.feasible]
    feasible = {key(c) for c in feasible_records}
    maximize = profile.objective.goal == "maximize"
    pick_value = metric_value(pick, metric)
    limit = pick_value * (1 - args.tolerance) if maximize else pick_value * (1 + args.tolerance)
    good = {key(c) for c in feasible_records
            if (metric_value(c, metric) >= limit if maximize else metric_value(c, metric) <= limit)}
    print(f"[{metric}] grid pick: {pick['id']} {label(pick)} ({metric} {pick_value:.4g}); without ties: "
          f"{strict['id']}; {len(feasible)} feasible, {len(good)} within {args.tolerance:.0%} of the pick",
          file=sys.stderr, flush=True)
    noise = confirmed = None
    if metric.startswith("latency") and args.remeasure:
        runners = sorted(feasible_records, key=lambda c: metric_value(c, metric))[:3]
        noise = remeasure(profile, runners, metric, args.remeasure)
    sibling = None
    if metric.startswith("latency") and args.confirm_rounds:
        confirmed, sibling = confirm(loaded, feasible_records, selection.baseline.to_json(), metric, args)
        print(f"[{metric}] confirmed pick over {confirmed['rounds']} interleaved rounds: {confirmed['pick']} "
              f"(leader {confirmed['leader']}, tied with it: {', '.join(confirmed['tied_with_leader']) or 'none'}); "
              f"siblings: {', '.join(sibling['same'])}", file=sys.stderr, flush=True)
    confirmed_key = key(next(c for c in feasible_records if c["id"] == confirmed["pick"])) if confirmed else None
    sibling_keys = {key(c) for c in feasible_records if sibling and c["id"] in sibling["same"]}

    import orchestrator.search.searcher as searcher

    searches, alone = [], []
    refine_every = searcher.REFINE_EVERY
    variants = [refine_every] + ([0] if args.sampler_alone and refine_every else [])
    with SamplerSeed() as sampler:
        for seed, variant in [(seed, v) for v in variants for seed in seeds]:
            sampler.seed = seed
            searcher.REFINE_EVERY = variant
            try:
                run = timed_run(loaded, trials=budget, num_cpus=2)
            finally:
                searcher.REFINE_EVERY = refine_every
            keys = [key(r) for r in run.records]
            found = keys.index(key(pick)) + 1 if key(pick) in keys else None
            found_strict = keys.index(key(strict)) + 1 if key(strict) in keys else None
            as_good = next((i + 1 for i, k in enumerate(keys) if k in good), None)
            found_confirmed = keys.index(confirmed_key) + 1 if confirmed_key in keys else None
            found_sibling = next((i + 1 for i, k in enumerate(keys) if k in sibling_keys), None)
            uncached = [r["id"] for r in run.records if r.get("status") == "ok"
                        and not (r.get("cached") or {}).get("measurement")]
            (searches if variant == refine_every else alone).append({"seed": seed, "refine_every": variant,
                                                                    "status": run.status, "evaluations": len(run.records),
                             "found_pick_at": found, "found_strict_pick_at": found_strict,
                             "found_as_good_at": as_good, "found_confirmed_pick_at": found_confirmed,
                             "found_sibling_at": found_sibling,
                             "duplicates": run.results.get("duplicate_trials", 0), "not_from_cache": uncached,
                             "order": [label(r) for r in run.records], "wall_s": round(run.wall_s, 1)})
            print(f"[{metric}] seed {seed} (REFINE_EVERY {variant}): pick found at evaluation "
                  f"{found or f'> {len(run.records)} (not found)'}, as good at {as_good}", file=sys.stderr,
                  flush=True)
        if sampler.used != seeds * len(variants):
            raise SystemExit(f"the sampler seed was not applied ({sampler.used} != {seeds * len(variants)}): "
                             "does orchestrator.run still call make_searcher?")

    def share(values: list[int | None]) -> float:
        return median([v if v is not None else math.inf for v in values]) / size

    grid_share = share([s["found_pick_at"] for s in searches])
    # the target is measured against the pick that holds up when measured again (interleaved rounds),
    # when there is one; the grid's single measurements decide only objectives measured exactly (size)
    found_share = share([s["found_confirmed_pick_at"] for s in searches]) if confirmed else grid_share
    return {
        "profile": {"techniques": profile.search.techniques, "max_pipeline_length": profile.search.max_pipeline_length,
                    "objective": profile.objective.model_dump(), "constraints": profile.constraints.model_dump(),
                    "measurement": profile.measurement.model_dump()},
        "space": size, "budget": budget, "tolerance": args.tolerance,
        "grid": {"pick": {"id": pick["id"], "pipeline": pick["pipeline"], metric: pick_value,
                          "accuracy": pick["metrics"]["accuracy"]},
                 "strict_pick": {"id": strict["id"], "pipeline": strict["pipeline"],
                                 metric: metric_value(strict, metric), "accuracy": strict["metrics"]["accuracy"]},
                 "feasible": len(feasible), "as_good_as_pick": len(good), "wall_s": round(grid.wall_s, 1),
                 "from_cache": sum(1 for r in grid.records if (r.get("cached") or {}).get("measurement"))},
        "noise": noise,
        "siblings": sibling,
        "median_share_to_sibling": share([s["found_sibling_at"] for s in searches]) if sibling else None,
        "confirmed": confirmed,
        "searches": searches,
        "refine_every": refine_every,
        "sampler_alone": {"searches": alone,
                          "median_share_to_pick": share([s["found_pick_at"] for s in alone]),
                          "median_share_to_confirmed_pick":
                              share([s["found_confirmed_pick_at"] for s in alone]) if confirmed else None}
        if alone else None,
        "median_share_to_pick": grid_share,
        "median_share_to_confirmed_pick": share([s["found_confirmed_pick_at"] for s in searches]) if confirmed else None,
        "target_measured_against": "confirmed pick" if confirmed else "grid pick",
        "median_share_to_strict_pick": share([s["found_strict_pick_at"] for s in searches]),
        "median_share_to_as_good": share([s["found_as_good_at"] for s in searches]),
        "random_expected_share": (size + 1) / 2 / size,
        "target": {"share": TARGET_SHARE, "min_space": MIN_SPACE,
                   "met": found_share <= TARGET_SHARE and size >= MIN_SPACE},
    }


def confirm(loaded: Any, feasible: list[dict[str, Any]], baseline: dict[str, Any], metric: str,
            args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(confirmed, siblings): the grid's pick measured again, as a run's final round would decide it, among
    every feasible candidate; and which candidates a user could not tell from it.

    One measurement per candidate cannot order candidates whose latencies differ by less than
    the machine's noise (see `remeasure`), nor choose which to measure again. So every feasible
    candidate, the baseline among them, is measured again in one agent process, in
    `--confirm-rounds` interleaved rounds, and `final_round.decide` applies the profile's rule to
    those rounds: the fastest median leads, a contender whose 95% interval reaches `tie_within`
    ties, ties go to the more accurate, then the smaller.

    A sibling's median is within the profile's `tie_within` of the pick's, and an exact
    two-sided McNemar test on the eval set's images (those one model classifies right and the
    other wrong) gives p >= 0.05 against the pick.
    """
    import numpy as np

    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.models.outputs import onnx_outputs
    from orchestrator.models.tasks import resolve_task
    from orchestrator.search.final_round import decide
    from orchestrator.search.selection import metric_value
    from orchestrator.state.paths import cache_dir

    profile = loaded.profile
    if all(c["id"] != baseline["id"] for c in feasible):  # an infeasible baseline is still the reference
        feasible = [*feasible, baseline]
    models = [(cache_dir("models") / f"{c['model_sha256']}.onnx").read_bytes() for c in feasible]
    print(f"[{metric}] confirming: {len(feasible)} models (the feasible candidates and the baseline), "
          f"{args.confirm_rounds} interleaved rounds ...", file=sys.stderr, flush=True)
    result = interleaved_rounds(models, profile, args.confirm_rounds)
    percentile = metric.split("_")[1]
    rounds = {c["id"]: m["rounds_ms"][percentile] for c, m in zip(feasible, result["models"])}
    tie = profile.objective.tie_within
    block = decide(feasible, rounds, baseline["id"], tie)
    pick = block["pick"]
    confirmed = {"rounds": block["rounds"], "pick": pick, "leader": block["leader"],
                 "tied_with_leader": block["tied_with_leader"], "sentence": block["sentence"],
                 "finalists": [{"id": f["id"], "pipeline": f["pipeline"], "median_ms": f["median_ms"],
                                "grid_ms": metric_value(next(c for c in feasible if c["id"] == f["id"]), metric),
                                "vs_leader": f["vs_leader"]} for f in block["finalists"]]}

    task = resolve_task(loaded, get_plugin_manager())
    data = task.load_data(profile.search.seed)["eval"]
    medians = {c["id"]: median(rounds[c["id"]]) for c in feasible}
    right = {c["id"]: np.argmax(onnx_outputs(model, task, data)[0], axis=1) == data.labels
             for c, model in zip(feasible, models)}
    rows = []
    for c in sorted(feasible, key=lambda c: medians[c["id"]]):
        only_pick = int((right[pick] & ~right[c["id"]]).sum())
        only_other = int((~right[pick] & right[c["id"]]).sum())
        rows.append({"id": c["id"], "label": label(c), "median_ms": medians[c["id"]],
                     "vs_pick": medians[c["id"]] / medians[pick], "accuracy": float(right[c["id"]].mean()),
                     "only_pick_right": only_pick, "only_other_right": only_other,
                     "mcnemar_p": mcnemar_p(only_pick, only_other)})
    same = [r["id"] for r in rows if r["vs_pick"] <= 1 + tie and r["mcnemar_p"] >= 0.05]
    sibling = {"rounds": block["rounds"], "tie_within": tie, "images": len(data.labels), "pick": pick,
               "same": same, "candidates": rows}
    return confirmed, sibling


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar test on b + c discordant pairs: scipy's binomial test of b against p = 1/2."""
    from scipy.stats import binomtest  # scikit-learn's dependency

    return float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0


def remeasure(profile: Any, candidates: list[dict[str, Any]], metric: str, times: int) -> dict[str, Any]:
    """Measure each candidate's model `times` more with the agent (the profile's protocol, interleaved).

    The grid's figure and the new ones side by side show how much one measurement of the same
    model moves from run to run on this machine, against the gaps between the candidates.
    """
    import json
    import subprocess

    from orchestrator.devices.base import bench_args
    from orchestrator.state.paths import cache_dir

    root = Path(__file__).resolve().parents[1]
    percentile = metric.split("_")[1]
    pin = 1 if (os.cpu_count() or 1) > 1 else None
    again: dict[str, list[float]] = {c["id"]: [] for c in candidates}
    for _ in range(times):
        for cand in candidates:
            model = cache_dir("models") / f"{cand['model_sha256']}.onnx"
            proc = subprocess.run([sys.executable, "-m", "agents", "bench", "--model", str(model),
                                   *bench_args(profile, pin)], capture_output=True, text=True, cwd=root, check=True)
            again[cand["id"]].append(json.loads(proc.stdout.strip().splitlines()[-1])["latency_ms"][percentile])
    rows = [{"id": c["id"], "grid": c["metrics"]["latency_ms"][percentile], "again": again[c["id"]]}
            for c in candidates]
    spread = [max(r["again"] + [r["grid"]]) / min(r["again"] + [r["grid"]]) - 1 for r in rows]
    return {"candidates": rows, "max_spread": max(spread), "median_spread": median(spread)}


def pct(value: float) -> str:
    return "not found" if math.isinf(value) else f"{100 * value:.0f}%"


def table(result: dict[str, Any]) -> str:
    """The printed summary: the caption, then one block per objective."""
    lines = [caption(result)]
    for metric, r in result["objectives"].items():
        lines += [""] + objective_table(metric, r)
    return "\n".join(lines)


def objective_table(metric: str, result: dict[str, Any]) -> list[str]:
    size = result["space"]
    tie = result["profile"]["objective"].get("tie_within", 0.0)
    tie_text = f"values within {tie:.0%} tie, the more accurate wins" if tie else "no ties"
    lines = [f"**objective {metric}**: {size} candidates ({', '.join(result['profile']['techniques'])}); grid "
             f"pick {result['grid']['pick']['id']} ({tie_text}), without ties {result['grid']['strict_pick']['id']}; "
             f"{result['grid']['feasible']} feasible; each search's budget {result['budget']} "
             f"({100 * result['budget'] / size:.0f}% of the grid)", "",
             "| sampler seed | evaluations to the confirmed pick | share of grid | to the grid's pick "
             f"| to the grid's pick without ties | to one as good (within {result['tolerance']:.0%}) | duplicates |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def at(value: int | None, s: dict[str, Any]) -> str:
        return str(value) if value else f"> {s['evaluations']}"

    for s in result["searches"]:
        confirmed = s.get("found_confirmed_pick_at")
        lines.append(f"| {s['seed']} | {at(confirmed, s) if result.get('confirmed') else '-'} "
                     f"| {pct(confirmed / size) if confirmed else ('not found' if result.get('confirmed') else '-')} "
                     f"| {at(s['found_pick_at'], s)} | {at(s.get('found_strict_pick_at'), s)} "
                     f"| {s['found_as_good_at'] or '-'} | {s['duplicates']} |")
    t = result["target"]
    c = result.get("confirmed")
    if c:
        lines += ["", f"confirmed pick: {c['pick']}, the grid's {len(c['finalists'])} feasible candidates (the "
                      f"baseline among them) measured again in {c['rounds']} interleaved rounds: {c['sentence']}"]
    lines += ["", f"median share of the grid to find the {result.get('target_measured_against', 'grid pick')}: "
                  f"{pct(result['median_share_to_confirmed_pick'] if c else result['median_share_to_pick'])} "
                  f"(target <= {t['share']:.0%} on >= {t['min_space']} candidates: {check(t['met'])}); "
                  f"to the grid's pick: {pct(result['median_share_to_pick'])}; "
                  f"without ties: {pct(result['median_share_to_strict_pick'])}; "
                  f"to one as good: {pct(result['median_share_to_as_good'])}; "
                  f"uniform random sampling needs {pct(result['random_expected_share'])} on average"]
    alone = result.get("sampler_alone")
    if alone:
        target = "found_confirmed_pick_at" if c else "found_pick_at"
        share = alone["median_share_to_confirmed_pick"] if c else alone["median_share_to_pick"]
        lines += ["", f"the same seeds with the sampler alone (no refinement around the starting points; with it, "
                      f"one proposal in {result['refine_every']} is a neighbour): evaluations to the "
                      f"{result.get('target_measured_against', 'grid pick')} "
                      f"{', '.join(str(s.get(target) or '-') for s in alone['searches'])}; median {pct(share)}"]
    sib = result.get("siblings")
    if sib:
        near = [r for r in sib["candidates"] if r["vs_pick"] <= 1 + 2 * sib["tie_within"]] or sib["candidates"][:3]
        shown = "; ".join(f"{r['id']} {r['median_ms']:.3f} ms ({r['vs_pick']:.2f}x the pick's), "
                          f"{100 * r['accuracy']:.2f}%, images only the pick gets right {r['only_pick_right']}, "
                          f"only it {r['only_other_right']}, McNemar p {r['mcnemar_p']:.2g}" for r in near)
        lines += ["", f"siblings of the confirmed pick {sib['pick']}: from the same {sib['rounds']} "
                      f"interleaved rounds, accuracy compared image by image on the "
                      f"{sib['images']} eval images; those within {sib['tie_within']:.0%} of the pick's median "
                      f"and McNemar p >= 0.05: {', '.join(sib['same'])}. The candidates within "
                      f"{2 * sib['tie_within']:.0%}: {shown}",
                  "", f"median share of the grid to one of them: {pct(result['median_share_to_sibling'])} "
                      f"(evaluations per seed: "
                      f"{', '.join(str(s.get('found_sibling_at') or '-') for s in result['searches'])})"]
    noise = result.get("noise")
    if noise:
        shown = "; ".join(f"{r['id']} {r['grid']:.3f} ms in the grid, then "
                          f"{', '.join(f'{v:.3f}' for v in r['again'])}" for r in noise["candidates"])
        lines += ["", f"run-to-run noise, the three fastest feasible candidates measured again: {shown} "
                      f"(largest spread of one model {100 * noise['max_spread']:.0f}%, median "
                      f"{100 * noise['median_spread']:.0f}%)"]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
