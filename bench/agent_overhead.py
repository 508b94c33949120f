"""What the agent costs: its p50 latency against a bare onnxruntime loop, and the memory it adds.

Measured side by side in one run, on the same model, threads and CPU: each round runs, in
turn (order alternating between rounds), a bare loop in a fresh process (a session and
`session.run` in a loop, nothing else), the agent as `python -m agents bench`, and the agent
as the zipapp that is shipped to devices. The medians of the rounds' p50s are compared
(target: the agent within 5% of the bare loop); the added memory is the agent's peak RSS
minus the bare process's peak RSS (VmHWM; both processes import numpy and onnxruntime).

    python bench/agent_overhead.py [--model M.onnx] [--runs 2000] [--rounds 5] [--threads 1]

Without --model it exports the digits task's architecture (random weights: latency does
not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BARE_LOOP = r"""
import json, os, sys, time
import numpy as np
import onnxruntime as ort
path, runs, warmup, threads, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
meta = session.get_inputs()[0]
shape = [d if isinstance(d, int) and d > 0 else 1 for d in meta.shape]
feeds = {meta.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
for _ in range(warmup):
    session.run(None, feeds)
samples = []
for _ in range(runs):
    t0 = time.perf_counter_ns()
    session.run(None, feeds)
    samples.append((time.perf_counter_ns() - t0) / 1e6)
# VmHWM, as the agent reads it (ru_maxrss would include the parent's peak from before execve)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"p50": float(np.percentile(samples, 50)), "peak_memory_mb": int(hwm.split()[1]) / 1024.0}))
"""


def export_demo_model(folder: Path) -> Path:
    """The digits task's model (its default architecture, untrained) as ONNX."""
    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.search.pipeline import export_onnx

    task = get_plugin_manager().task("digits")
    path = folder / "digits.onnx"
    path.write_bytes(export_onnx(task, task.build(task.default_arch).eval()))
    return path


def run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed: {proc.stderr.strip()[-500:] or proc.stdout[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="ONNX model (default: the digits demo architecture)")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1, help="CPU to pin to (-1: none)")
    args = parser.parse_args()

    from orchestrator.devices.bundle import agent_bundle

    with tempfile.TemporaryDirectory(prefix="eo-bench-") as tmp:
        model = args.model or export_demo_model(Path(tmp))
        zipapp = Path(tmp) / agent_bundle().name
        zipapp.write_bytes(agent_bundle().data)
        common = ["bench", "--model", str(model), "--runs", str(args.runs), "--warmup", str(args.warmup),
                  "--threads", str(args.threads), "--inter-op-threads", "1", "--time-budget", "100000"]
        if args.cpu >= 0:
            common += ["--pin-cpu", str(args.cpu)]
        variants = {
            "bare onnxruntime loop": [sys.executable, "-c", BARE_LOOP, str(model), str(args.runs), str(args.warmup),
                                      str(args.threads), str(args.cpu)],
            "agent (python -m agents)": [sys.executable, "-m", "agents", *common],
            "agent (zipapp, as shipped)": [sys.executable, str(zipapp), *common],
        }
        results: dict[str, list[dict]] = {name: [] for name in variants}
        for round_no in range(args.rounds):
            order = list(variants) if round_no % 2 == 0 else list(reversed(variants))
            for name in order:
                out = run_json(variants[name])
                p50 = out["p50"] if "p50" in out else out["latency_ms"]["p50"]
                results[name].append({"p50": p50, "peak_memory_mb": out["peak_memory_mb"]})

    print(f"model {model.name if args.model else 'digits demo (ResNet-20-style, 32x32)'}, {args.runs} timed runs "
          f"after {args.warmup} warm-up, {args.threads} intra-op thread(s), pinned to CPU {args.cpu}, "
          f"{args.rounds} rounds (order alternating), python {sys.version.split()[0]}")
    bare = results["bare onnxruntime loop"]
    bare_p50 = statistics.median(r["p50"] for r in bare)
    bare_mem = statistics.median(r["peak_memory_mb"] for r in bare)
    print(f"{'':28} {'median p50 ms':>14} {'vs bare':>9} {'peak RSS MB':>12} {'added MB':>9}   p50 per round")
    for name, rows in results.items():
        p50 = statistics.median(r["p50"] for r in rows)
        mem = statistics.median(r["peak_memory_mb"] for r in rows)
        rounds = " ".join(f"{r['p50']:.4f}" for r in rows)
        print(f"{name:28} {p50:14.4f} {100 * (p50 / bare_p50 - 1):+8.1f}% {mem:12.1f} {mem - bare_mem:+9.1f}   {rounds}")
    # Paired: each round's agent p50 over the same round's bare p50 (they ran back to back), so a
    # machine that slows down or speeds up between rounds cancels out.
    zipapp = results["agent (zipapp, as shipped)"]
    ratios = sorted(z["p50"] / b["p50"] for z, b in zip(zipapp, bare))
    paired = statistics.median(ratios)
    verdict = "within" if abs(paired - 1) <= 0.05 else "NOT within"
    print(f"agent (zipapp) / bare p50, paired by round: median {100 * (paired - 1):+.1f}% "
          f"(rounds from {100 * (ratios[0] - 1):+.1f}% to {100 * (ratios[-1] - 1):+.1f}%): {verdict} the 5% target")


if __name__ == "__main__":
    main()
