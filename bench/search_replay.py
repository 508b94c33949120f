"""Sampler settings compared on many seeds: the project's searcher replayed against one grid's results.

`bench/search_efficiency.py` runs each search through Ray Tune, answered from the caches its
grid filled: under a minute per search, so five seeds. This script takes the same grid (one
cached grid run per objective, through `execute_run`, as that benchmark runs it), keeps each
candidate's record, and then drives `make_searcher`'s Optuna searcher itself, the way Tune
does in a run on the local fallback of a 2-core machine (one trial at a time: suggest, then
on_trial_complete with the trial's `trial_values`). Seconds per search, so every setting of
`searcher.REFINE_EVERY` on `--seeds` sampler seeds. Replayed on the grid of 2026-12-02, seeds
1-5 gave the evaluation counts of that benchmark's Tune-driven searches exactly.

The targets are read from bench/results/search_efficiency.json (or `--results`): the size
objective's grid pick, and the latency objective's confirmed pick (measured again with every
feasible candidate in interleaved rounds); they are matched by pipeline, not by id. Run
`bench/search_efficiency.py` first: with empty caches the grid is built here (about 35 minutes
on 2 cores).

    python bench/search_replay.py                  # REFINE_EVERY 0 (the sampler alone), 2, 3; seeds 1-15

Prints a table; writes bench/results/search_replay.json and the block in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.search_common import caption, finish, machine, median, now, private_home, timed_run  # noqa: E402
from bench.search_efficiency import FULL_TECHNIQUES, label, objective_profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def grid(metric: str, folder: Path, tie: float) -> dict[str, Any]:
    """One cached grid run of search_efficiency's profile for `metric`: its records, and what
    `execute_run` handed `make_searcher` (candidates, starting points, profile)."""
    import orchestrator.run as run
    from bench.search_common import space_size

    loaded = objective_profile(folder, metric, FULL_TECHNIQUES, tie)
    seen: dict[str, Any] = {}
    original = run.make_searcher

    def capture(candidates, trials, seed, profile, prior=None, first=None):  # noqa: ANN001, ANN202
        seen.update(candidates=copy.deepcopy(candidates), first=copy.deepcopy(first), profile=profile)
        return original(candidates, trials, seed, profile, prior, first)

    run.make_searcher = capture
    try:
        size = space_size(loaded)
        print(f"[{metric}] the grid, {size} candidates (from the caches) ...", file=sys.stderr, flush=True)
        result = timed_run(loaded, trials=size, num_cpus=2)
    finally:
        run.make_searcher = original
    uncached = [r["id"] for r in result.records if r.get("status") == "ok"
                and not (r.get("cached") or {}).get("measurement")]
    if uncached:
        print(f"[{metric}] {len(uncached)} candidates were measured now, not answered from the caches",
              file=sys.stderr)
    return {"records": result.records, **seen}


def replay(data: dict[str, Any], seed: int, budget: int) -> list[str]:
    """The pipeline keys in the order one search evaluates them (distinct ones, up to `budget`)."""
    from orchestrator.search.searcher import make_searcher, pipeline_key, point_config
    from orchestrator.search.trial import trial_values

    profile = data["profile"]
    by_config = {json.dumps(point_config(r["pipeline"]), sort_keys=True): r for r in data["records"]}
    searcher, _, samples, _ = make_searcher(copy.deepcopy(data["candidates"]), budget, seed, profile,
                                            first=copy.deepcopy(data["first"]))
    order: list[str] = []
    for n in range(samples):
        if len(order) >= budget:
            break
        config = searcher.suggest(f"t{n}")
        record = by_config[json.dumps(config, sort_keys=True)]
        searcher.on_trial_complete(f"t{n}", {**trial_values(record, profile), "record": "{}"})
        key = pipeline_key(record["pipeline"])
        if key not in order:
            order.append(key)
    return order


def main(argv: list[str] | None = None) -> int:
    """Targets from search_efficiency's results; the grids; every setting on every seed."""
    import orchestrator.search.searcher as searcher
    from orchestrator.search.searcher import pipeline_key

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=15, help="sampler seeds 1..N (default 15)")
    parser.add_argument("--refine-every", default="0,2,3",
                        help="searcher.REFINE_EVERY settings, comma-separated (0: the sampler alone)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "search_efficiency.json",
                        help="bench/search_efficiency.py's results: the targets")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/search_replay.json)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the figures in docs/scaling.md")
    args = parser.parse_args(argv)
    settings = [int(v) for v in args.refine_every.split(",")]
    private_home()
    efficiency = json.loads(args.results.read_text())
    result: dict[str, Any] = {"schema_version": 1, "date": now(), "machine": machine(),
                              "targets_from": {"file": str(args.results.relative_to(ROOT))
                                               if args.results.is_relative_to(ROOT) else str(args.results),
                                               "date": efficiency["date"]}, "objectives": {}}
    default = searcher.REFINE_EVERY
    with tempfile.TemporaryDirectory(prefix="eo-bench-replay-") as tmp:
        for metric, block in efficiency["objectives"].items():
            data = grid(metric, Path(tmp), block["profile"]["objective"].get("tie_within", 0.03))
            confirmed = block.get("confirmed")
            if confirmed:  # the confirmation names candidates by their label (search_efficiency.label)
                named = {row["id"]: row["label"] for row in block["siblings"]["candidates"]}
                match = [r for r in data["records"] if label(r) == named[confirmed["pick"]]]
                if len(match) != 1:
                    raise SystemExit(f"[{metric}] the confirmed pick {named[confirmed['pick']]} is not in the grid once")
                target = {"id": confirmed["pick"], "pipeline": match[0]["pipeline"], "which": "confirmed pick"}
            else:
                target = {**block["grid"]["pick"], "which": "grid pick"}
            key = pipeline_key(target["pipeline"])
            size = len(data["records"])
            rows = []
            for setting in settings:
                searcher.REFINE_EVERY = setting
                try:
                    found = []
                    for seed in range(1, args.seeds + 1):
                        order = replay(data, seed, block["budget"])
                        found.append(order.index(key) + 1 if key in order else None)
                finally:
                    searcher.REFINE_EVERY = default
                share = median([v if v else math.inf for v in found]) / size
                rows.append({"refine_every": setting, "found_at": found, "found": sum(1 for v in found if v),
                             "median_share": share})
                print(f"[{metric}] REFINE_EVERY {setting}: {found}", file=sys.stderr, flush=True)
            result["objectives"][metric] = {"space": size, "budget": block["budget"], "default": default,
                                            "target": {"id": target["id"], "which": target["which"],
                                                       "label": label(target)}, "settings": rows}
    return finish("search_replay", result, table, args.out, docs=not args.no_docs)


def table(result: dict[str, Any]) -> str:
    """One line per objective and setting."""
    lines = [caption(result), "", f"targets from {result['targets_from']['file']} of {result['targets_from']['date']}",
             "", "| objective, target | REFINE_EVERY | evaluations to the target, seeds 1-N | found | median share |",
             "| --- | ---: | --- | ---: | ---: |"]
    for metric, r in result["objectives"].items():
        for row in r["settings"]:
            name = f"{row['refine_every']}" + (" (default)" if row["refine_every"] == r["default"] else "") + \
                (" (sampler alone)" if row["refine_every"] == 0 else "")
            share = "not found" if math.isinf(row["median_share"]) else f"{100 * row['median_share']:.0f}%"
            lines.append(f"| {metric}, {r['target']['which']} {r['target']['id']} | {name} | "
                         f"{', '.join(str(v) if v else '-' for v in row['found_at'])} | "
                         f"{row['found']} of {len(row['found_at'])} | {share} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
