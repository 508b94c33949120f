"""Is the local fallback's measurement core quiet while compression works on the others?

On the local fallback the agent times pinned to the last core and trials keep to the others
(docs/pick.md, section 4). This measures whether that is enough on this machine: the agent's
p50 on the demo architecture, pinned to the last core, while the other cores are idle, or each
run a co-runner pinned there: an integer loop (`spin`, execution units only), one-thread torch
training (`train`, what the trials do) and a numpy sum over 64 MB (`memory`, memory bandwidth).
Each repetition measures every condition once, the order rotating from one repetition to the
next; each condition's ratio to `idle` is taken within a repetition (paired), and the median
over repetitions is printed with its range. The spread of `idle` itself over the repetitions
shows the noise that comes from outside (other guests of the host, its frequency).

    python bench/quiet_core.py [--reps 8] [--runs 200]

Needs at least 2 cores. Writes bench/results/quiet_core.json and its block in docs/pick.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.agent_overhead import export_demo_model, run_json  # noqa: E402
from bench.search_common import ROOT, caption, median, now, machine, update_doc, write_result  # noqa: E402

CO_RUNNERS = {
    "idle": None,
    "spin": "x = 0\nwhile True:\n    x = (x * 1103515245 + 12345) & 0xFFFFFFFF",
    "train": ("import torch\ntorch.set_num_threads(1)\n"
              "m = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),"
              " torch.nn.Conv2d(32, 32, 3, padding=1))\n"
              "opt = torch.optim.SGD(m.parameters(), 0.01)\nx = torch.randn(64, 16, 32, 32)\n"
              "while True:\n    opt.zero_grad()\n    m(x).sum().backward()\n    opt.step()"),
    "memory": "import numpy as np\na = np.ones(8 * 1024 * 1024)\nwhile True:\n    a.sum()",
}


def start(code: str | None, cpus: set[int]) -> list[subprocess.Popen]:
    """One co-runner per core in `cpus`, each pinned there; [] for idle."""
    if code is None:
        return []
    procs = [subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\n{code}"])
             for cpu in sorted(cpus)]
    time.sleep(1.5)  # imports done, the loop running
    for p in procs:
        if p.poll() is not None:
            raise SystemExit(f"a co-runner exited at once (exit code {p.returncode})")
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=8, help="repetitions; each measures every condition once")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per measurement (the profile's default)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the figures in docs/pick.md")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/quiet_core.json)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    if cores < 2 or not hasattr(os, "sched_setaffinity"):
        raise SystemExit("quiet_core: needs at least 2 cores and CPU pinning (Linux)")
    if args.reps < 2:
        raise SystemExit("quiet_core: --reps must be at least 2")
    pinned, others = cores - 1, set(range(cores - 1))
    names = list(CO_RUNNERS)
    p50: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="eo-bench-quiet-") as tmp:
        model = export_demo_model(Path(tmp))
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                procs = start(CO_RUNNERS[name], others)
                try:
                    out = run_json([sys.executable, "-m", "agents", "bench", "--model", str(model), "--runs",
                                    str(args.runs), "--warmup", "10", "--pin-cpu", str(pinned)])
                finally:
                    stop(procs)
                p50[name].append(out["latency_ms"]["p50"])
            print(f"repetition {rep + 1}/{args.reps}: " + ", ".join(f"{n} {p50[n][-1]:.3f} ms" for n in names),
                  file=sys.stderr, flush=True)
    rows = {}
    for n in names:
        paired = [a / b for a, b in zip(p50[n], p50["idle"])]
        rows[n] = {"p50_ms": p50[n], "median_ms": median(p50[n]), "vs_idle_paired": paired,
                   "vs_idle_median": median(paired)}
    idle = p50["idle"]
    result = {"date": now(), "machine": machine(), "model": "digits demo architecture (untrained weights)",
              "pinned_cpu": pinned, "co_runner_cpus": sorted(others), "runs": args.runs, "reps": args.reps,
              "conditions": rows, "idle_spread": max(idle) / min(idle) - 1,
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    path = write_result("quiet_core", result, args.out)
    text = table(result)
    print(text)
    print(f"\nwrote {path}")
    if not args.no_docs and update_doc("quiet_core", text, ROOT / "docs" / "pick.md"):
        print("and the figures in docs/pick.md")
    return 0


def table(result: dict[str, Any]) -> str:
    lines = [caption(result), "",
             f"Agent pinned to CPU {result['pinned_cpu']}, co-runners on CPU "
             f"{', '.join(map(str, result['co_runner_cpus']))}; {result['reps']} repetitions of {result['runs']} "
             "timed runs per condition, order rotating.", "",
             "| co-runner on the other cores | p50 ms (median) | vs idle, same repetition (median) | range |",
             "| --- | ---: | ---: | --- |"]
    for name, r in result["conditions"].items():
        paired = r["vs_idle_paired"]
        lines.append(f"| {name} | {r['median_ms']:.3f} | {r['vs_idle_median']:.2f}x | "
                     f"{min(paired):.2f}–{max(paired):.2f}x |")
    lines += ["", f"idle alone, from one repetition to the next: {min(result['conditions']['idle']['p50_ms']):.3f}–"
                  f"{max(result['conditions']['idle']['p50_ms']):.3f} ms ({100 * result['idle_spread']:.0f}% spread)"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
