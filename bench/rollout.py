"""Rollout time for 1, 4 and 8 devices with K=1 and K=4 devices at a time, measured side by side in one run.

The devices are real sshd servers on 127.0.0.1 (bench/sshd.py), each device with its own folder
as its disk, registered like any device; the model is a ~1 MB fp32 model (a dense layer), and
every timed rollout really installs a new version (runs A and B alternate) with the default
options: one canary, then K at a time, health check after each install. Each repetition runs
every (devices, K) configuration once, in a shuffled order; the medians are compared.

    python bench/rollout.py [--reps 3] [--sizes 1,4,8] [--parallel 1,4] [--no-docs]

Prints the table and the ratios, writes bench/results/rollout.json and the figures section of
docs/rollout.md (with the date and the machine). Nothing outside a temporary state folder is
touched. Needs /usr/sbin/sshd.

On loopback every "device" shares this machine's CPUs with the host, so K=4 is bounded by the
cores here; on a real fleet each device brings its own CPU and the host's share is small.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "rollout.md"
BEGIN, END = "<!-- bench/rollout.py: begin -->", "<!-- bench/rollout.py: end -->"


def dense_model(seed: int, kilobytes: int = 1024) -> bytes:
    """x [N,256] -> Gemm -> Relu -> y: a model of about `kilobytes` of fp32 weights."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    hidden = kilobytes * 1024 // 4 // 256
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", hidden])],
        initializer=[numpy_helper.from_array((rng.standard_normal((256, hidden)) * 0.05).astype(np.float32), "w"),
                     numpy_helper.from_array(np.zeros(hidden, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def machine() -> str:
    """CPU model, cores, OS, for the figures' caption."""
    from agents.info import cpu_model

    return f"{cpu_model() or platform.processor()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    """Set up the loopback fleet, measure, print, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", default="1,4,8")
    parser.add_argument("--parallel", default="1,4")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/rollout.md's figures")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    ks = [int(k) for k in args.parallel.split(",")]

    work = Path(tempfile.mkdtemp(prefix="eo-bench-rollout-"))
    os.environ["EDGE_ORCHESTRATOR_HOME"] = str(work / "state")
    import yaml

    from bench.fleet import make_run, start_fleet
    from orchestrator.rollout.execute import deploy
    from orchestrator.rollout.plan import RolloutOptions, chosen_models

    base = yaml.safe_load((ROOT / "device_profiles" / "x86-host.yaml").read_text())
    fleets, runs = [], {}
    try:
        for n in sizes:  # one profile per fleet size: a rollout goes to every device of its profile
            base["name"] = f"bench-{n}"
            profile = work / f"bench-{n}.yaml"
            profile.write_text(yaml.safe_dump(base))
            print(f"starting {n} loopback device(s)...", flush=True)
            fleets.append(start_fleet(work / f"fleet-{n}", profile, n, prefix=f"b{n}"))
            runs[n] = [make_run(profile, dense_model(seed), work / "runs") for seed in (0, 1)]
        configs = [(n, k) for n in sizes for k in ks]
        turn = {n: 0 for n in sizes}
        times: dict[tuple[int, int], list[float]] = {c: [] for c in configs}

        def rollout(n: int, k: int) -> float:
            chosen = chosen_models(runs[n][turn[n] % 2])[0]
            turn[n] += 1
            started = time.perf_counter()
            deploy(chosen, RolloutOptions(max_parallel=k))
            return time.perf_counter() - started

        for n in sizes:  # warm-up: the first install of each version on each device
            rollout(n, max(ks))
            rollout(n, max(ks))
        rng = random.Random(0)
        for rep in range(args.reps):
            order = configs[:]
            rng.shuffle(order)
            for n, k in order:
                seconds = rollout(n, k)
                times[(n, k)].append(seconds)
                print(f"rep {rep + 1}: {n} device(s), K={k}: {seconds:.2f} s", flush=True)
    finally:
        for fleet in fleets:
            fleet.stop()
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for n, k in configs:
        median = statistics.median(times[(n, k)])
        rows.append({"devices": n, "k": k, "median_s": median, "per_device_s": median / n, "samples_s": times[(n, k)]})
    by = {(r["devices"], r["k"]): r["median_s"] for r in rows}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "reps": args.reps,
              "load_average_at_end": os.getloadavg(), "model_bytes": len(dense_model(0)), "rows": rows,
              "speedup_k": {n: by[(n, ks[0])] / by[(n, ks[-1])] for n in sizes},
              "scaling": {k: by[(sizes[-1], k)] / by[(sizes[0], k)] for k in ks}}
    table = render(result, sizes, ks)
    print("\n" + table)
    out = ROOT / "bench" / "results" / "rollout.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_docs:
        text = DOC.read_text()
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
        print(f"wrote {out} and the figures in {DOC}")
    return 0


def render(result: dict, sizes: list[int], ks: list[int]) -> str:
    """The markdown table and ratios (also what the terminal shows)."""
    by = {(r["devices"], r["k"]): r for r in result["rows"]}
    caption = (f"Measured {result['date']} on {result['machine']} (median of {result['reps']} repetitions; "
               f"load average at the end {result['load_average_at_end'][0]:.1f}); "
               f"model {result['model_bytes'] / 1e6:.1f} MB, one canary, health check after each install.")
    lines = [caption, "",
             "| devices | " + " | ".join(f"K={k}: total (per device)" for k in ks) + f" | K={ks[0]} / K={ks[-1]} |",
             "| ---: | " + " | ".join("---:" for _ in ks) + " | ---: |"]
    for n in sizes:
        cells = [f"{by[(n, k)]['median_s']:.2f} s ({by[(n, k)]['per_device_s']:.2f} s)" for k in ks]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {result['speedup_k'][n]:.2f}x |")
    lines.append("")
    lines.append(f"{sizes[-1]} devices against {sizes[0]}: " + ", ".join(
        f"K={k} takes {result['scaling'][k]:.2f}x as long" for k in ks) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
