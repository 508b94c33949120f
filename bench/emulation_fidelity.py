"""How far can an emulated aarch64 device's latency be trusted? Native and emulated, side by side in one run.

For a handful of real candidates of the digits task (fp32 baseline, int8 static and dynamic,
fp16, structured and magnitude pruning, low-rank, distillation), measures:

- native latency on this host (`LocalTransport`, x86 onnxruntime build),
- emulated latency in QEMU user mode (`QemuUserTransport`, aarch64 onnxruntime build, -cpu cortex-a72
  by default; `--cpus cortex-a72,cortex-a76` adds columns),
- output parity: the candidate's outputs on held-out data inside the emulator against the host's,

interleaved (every repetition measures each candidate natively then emulated, in a shuffled
order), one intra-op thread both sides, pinned to the same core: the host's load hits both alike.
Prints the slowdown factor (emulated p50 / native p50) per candidate and the Kendall tau between
the two rankings, next to the noise floor (tau between two repetitions of the same side).
Writes bench/results/emulation_fidelity.json.

    python bench/emulation_fidelity.py [--reps 3] [--cpus cortex-a72] [--sysroot DIR]

State (trained base model, sysroot) goes to $EDGE_ORCHESTRATOR_HOME, else to .state/bench in the repo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "emulation_fidelity.json"

CANDIDATES: list[tuple[str, list[dict[str, Any]]]] = [
    ("fp32", []),
    ("int8-static pc s8", [{"technique": "int8-static",
                            "params": {"per_channel": True, "activations": "int8", "calibration": "minmax"}}]),
    ("int8-static pc u8", [{"technique": "int8-static",
                            "params": {"per_channel": True, "activations": "uint8", "calibration": "minmax"}}]),
    ("int8-static pt s8", [{"technique": "int8-static",
                            "params": {"per_channel": False, "activations": "int8", "calibration": "minmax"}}]),
    ("int8-dynamic", [{"technique": "int8-dynamic", "params": {"per_channel": False, "weight_type": "int8"}}]),
    ("fp16", [{"technique": "fp16", "params": {}}]),
    ("prune-structured 0.5", [{"technique": "prune-structured",
                               "params": {"ratio": 0.5, "importance": "l1", "scope": "layer", "epochs": 1}}]),
    ("prune-structured 0.75", [{"technique": "prune-structured",
                                "params": {"ratio": 0.75, "importance": "l1", "scope": "layer", "epochs": 1}}]),
    ("prune-structured 0.5 + int8 s8", [
        {"technique": "prune-structured", "params": {"ratio": 0.5, "importance": "l1", "scope": "layer", "epochs": 1}},
        {"technique": "int8-static", "params": {"per_channel": True, "activations": "int8", "calibration": "minmax"}}]),
    ("prune-magnitude 0.7", [{"technique": "prune-magnitude", "params": {"sparsity": 0.7, "scope": "layer",
                                                                         "epochs": 1}}]),
    ("low-rank 0.5", [{"technique": "low-rank", "params": {"rank_ratio": 0.5, "epochs": 0}}]),
    ("distill w0.5 d1", [{"technique": "distill", "params": {"width": 0.5, "depth": 1, "temperature": 4.0,
                                                             "alpha": 0.5, "epochs": 6}}]),
]


def _state_home() -> None:
    if not os.environ.get("EDGE_ORCHESTRATOR_HOME"):
        os.environ["EDGE_ORCHESTRATOR_HOME"] = str(ROOT / ".state" / "bench")


def _measurement_profile(base: Any) -> Any:
    """The rpi4 profile with one intra-op thread and a protocol that fits a noisy 2-core host."""
    profile = base.model_copy(deep=True)
    profile.runtime.intra_op_threads = 1
    profile.measurement.warmup_runs = 10
    profile.measurement.runs = 100
    profile.measurement.time_budget_s = 5.0
    return profile


def build_candidates(names: set[str] | None, log: Any) -> tuple[list[dict[str, Any]], Any]:
    """Build every candidate (one whose technique is not installed is skipped, and said so); and the data."""
    import torch

    from orchestrator.config.profile import load_profile
    from orchestrator.errors import OrchestratorError
    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.search.basemodel import get_base_model
    from orchestrator.search.pipeline import build_candidate, evaluate_onnx

    torch.set_num_threads(1)
    registry = get_plugin_manager()
    task = registry.task("digits")
    data = task.load_data(0)
    log("base model (trained once, then cached)")
    base = get_base_model(task, data, 0).load(task)
    profile = load_profile(ROOT / "device_profiles" / "rpi4.yaml").profile
    out = []
    for name, pipeline in CANDIDATES:
        if names and name not in names:
            continue
        missing = [s["technique"] for s in pipeline if s["technique"] not in registry.techniques]
        if missing:
            log(f"skip {name}: {', '.join(missing)} not installed")
            continue
        steps = [_fit_params(registry.technique(s["technique"]), s, log) for s in pipeline]
        start = time.perf_counter()
        try:
            model_bytes, _ = build_candidate(registry, task, base, steps,
                                             {"data": data, "profile": profile, "seed": 0})
        except OrchestratorError as exc:  # a plugin changed under us: the other candidates still count
            log(f"skip {name}: {exc}")
            continue
        accuracy = evaluate_onnx(task, model_bytes, data["eval"])
        seconds = time.perf_counter() - start
        log(f"built {name}: {len(model_bytes) / 1e3:.0f} kB, accuracy {accuracy:.3f} ({seconds:.0f} s)")
        out.append({"name": name, "pipeline": steps, "bytes": model_bytes, "size_bytes": len(model_bytes),
                    "accuracy_host": accuracy})
    return out, data


def _fit_params(technique: Any, step: dict[str, Any], log: Any) -> dict[str, Any]:
    """The step with any parameter its technique no longer offers replaced by the first value it does."""
    params = dict(step["params"])
    for key, space in technique.search_space.items():
        values = list(getattr(space, "values", []))
        if values and params.get(key) not in values:
            log(f"{technique.name}: {key}={params.get(key)!r} is not offered any more; using {values[0]!r}")
            params[key] = values[0]
    return {**step, "params": params}


def kendall(a: list[float], b: list[float]) -> dict[str, float]:
    """Kendall tau-b between two latency lists (same candidates, same order) and its p-value."""
    from scipy.stats import kendalltau

    result = kendalltau(a, b)
    return {"tau": round(float(result.statistic), 3), "p_value": float(result.pvalue)}


def _parity(transport: Any, model_bytes: bytes, x: Any) -> dict[str, float]:
    import numpy as np
    import onnxruntime as ort

    host = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    arm = transport.run_model(model_bytes, {"input": x})["logits"]
    diff = float(np.abs(arm - host).max())
    return {"max_abs_diff": diff, "relative": diff / float(np.abs(host).max()),
            "argmax_agreement": float((arm.argmax(1) == host.argmax(1)).mean())}


def main(argv: list[str] | None = None) -> int:
    """Build, measure side by side, print the table and the rank agreement, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--cpus", default="cortex-a72", help="emulated CPU models, comma-separated")
    parser.add_argument("--sysroot", help="arm64 sysroot (default: built or reused under the state folder)")
    parser.add_argument("--only", help="comma-separated candidate names (default: all)")
    parser.add_argument("--parity-samples", type=int, default=64, help="held-out inputs for the parity check")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--twin", action="store_true",
                        help="only the twin column: this machine's instruction-counted twin vs native (issue 30 item 3); "
                             "writes bench/results/emulation_fidelity_twin.json")
    parser.add_argument("--native-reps", type=int, default=3, help="twin column: native repetitions (default 3)")
    parser.add_argument("--rounds", type=int, default=40, help="twin column: interleaved rounds per rep (default 40)")
    parser.add_argument("--jobs", type=int, default=2, help="twin column: counts at a time (default 2)")
    args = parser.parse_args(argv)
    _state_home()
    sys.path.insert(0, str(ROOT))
    if args.twin:
        return twin_main(args)

    from orchestrator.config.profile import load_profile
    from orchestrator.devices.base import bench_args
    from orchestrator.devices.local import LocalTransport, local_device
    from orchestrator.emulation.sysroot import SysrootRecipe, build_sysroot
    from orchestrator.emulation.user import QemuUserTransport, emulated_bench_args, emulated_device

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    started = time.time()
    recipe, cache = SysrootRecipe(), os.environ.get("EDGE_ORCHESTRATOR_QEMU_CACHE")
    dest = args.sysroot or (Path(cache) / f"sysroot-{recipe.key()}" if cache else None)
    sysroot = build_sysroot(dest, recipe, log=log)
    candidates, data = build_candidates(set(args.only.split(",")) if args.only else None, log)
    rpi4 = load_profile(ROOT / "device_profiles" / "rpi4.yaml").profile
    profile = _measurement_profile(rpi4)
    pin = (os.cpu_count() or 1) - 1
    native = LocalTransport(local_device())
    native.device.pinned_cpu = pin
    cpus = [c.strip() for c in args.cpus.split(",") if c.strip()]
    emulated = {}
    for cpu in cpus:
        device = emulated_device(f"emu-{cpu}", cpu)
        device.pinned_cpu = pin
        emulated[cpu] = QemuUserTransport(device, sysroot, cpu, rpi4.emulation.cores, rpi4.emulation.memory_mb)
    first = next(iter(emulated.values()))
    log(f"emulated protocol: {' '.join(emulated_bench_args(profile, pin, first.host_cpus))}")

    samples = measure(candidates, native, emulated, profile, args.reps, log)
    rows = [summarise_candidate(c, samples[c["name"]], cpus) for c in candidates]
    result = {
        "schema_version": 1,
        "what": "native (x86 host, x86 onnxruntime) vs QEMU user-mode emulated aarch64 latency of the same candidates",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "protocol": {"reps": args.reps, "threads": 1, "pinned_cpu": pin,
                     "statistics": "median and min over reps of each measurement's p50",
                     "native_flags": " ".join(bench_args(profile, pin)),
                     "emulated_flags": " ".join(emulated_bench_args(profile, pin, first.host_cpus))},
        "sysroot": str(sysroot),
        "candidates": rows,
        "agreement": {cpu: agreement(rows, cpu, args.reps) for cpu in cpus},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")  # latency first: parity is slow under emulation
    x = data["eval"].inputs[: args.parity_samples]
    for cand, row in zip(candidates, rows, strict=True):
        row["parity"] = _parity(first, cand["bytes"], x)
        log(f"parity {cand['name']}: {row['parity']}")
    result["parity_samples"] = len(x)
    result["host"]["load_average_at_end"] = os.getloadavg()
    result["seconds"] = round(time.time() - started)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, result["agreement"], cpus)
    print(f"wrote {out} ({result['seconds']} s)")
    return 0


def twin_main(args: argparse.Namespace) -> int:
    """The twin column alone: build the candidates, measure natively, count on the twin, calibrate, write the JSON."""
    from bench.twin_column import print_twin, twin_column

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    started = time.time()
    candidates, _ = build_candidates(set(args.only.split(",")) if args.only else None, log)
    block = twin_column(candidates, kendall, (os.cpu_count() or 1) - 1, args.native_reps, args.rounds, args.jobs, log)
    for cand, row in zip(candidates, block["candidates"], strict=True):
        row.update(pipeline=cand["pipeline"], size_bytes=cand["size_bytes"], accuracy_host=cand["accuracy_host"])
    result = {"schema_version": 1, "what": "this machine's instruction-counted twin (qemu-x86_64 + insncount plugin, "
                                           "this host's onnxruntime) vs native measurement of the same candidates",
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average_at_end": os.getloadavg()},
              "twin": block, "seconds": round(time.time() - started)}
    out = Path(args.out) if args.out != str(RESULTS) else RESULTS.with_name("emulation_fidelity_twin.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_twin(block)
    print(f"wrote {out} ({result['seconds']} s)")
    return 0


def measure(candidates: list[dict[str, Any]], native: Any, emulated: dict[str, Any], profile: Any, reps: int,
            log: Any) -> dict[str, dict[str, list[float]]]:
    """p50 of every candidate, natively then on each emulated CPU, `reps` times in a shuffled order."""
    samples = {c["name"]: {"native": [], **{cpu: [] for cpu in emulated}} for c in candidates}
    order = list(candidates)
    rng = random.Random(0)
    for rep in range(reps):
        rng.shuffle(order)
        for cand in order:
            n = native.bench(cand["bytes"], profile)
            samples[cand["name"]]["native"].append(n["latency_ms"]["p50"])
            line = f"rep {rep + 1}/{reps} {cand['name']:<32} native p50 {n['latency_ms']['p50']:8.3f} ms"
            for cpu, transport in emulated.items():
                e = transport.bench(cand["bytes"], profile)
                samples[cand["name"]][cpu].append(e["latency_ms"]["p50"])
                line += f"  {cpu} p50 {e['latency_ms']['p50']:9.2f} ms ({e['runs']} runs)"
            log(line)
    return samples


def summarise_candidate(cand: dict[str, Any], s: dict[str, list[float]], cpus: list[str]) -> dict[str, Any]:
    """One candidate's row: its latency per side (median and min over reps) and slowdown factors."""
    row = {k: cand[k] for k in ("name", "pipeline", "size_bytes", "accuracy_host")}
    row["native_p50_ms"] = {"median": statistics.median(s["native"]), "min": min(s["native"]), "reps": s["native"]}
    row["emulated"] = {}
    for cpu in cpus:
        med, low = statistics.median(s[cpu]), min(s[cpu])
        row["emulated"][cpu] = {"p50_ms": {"median": med, "min": low, "reps": s[cpu]},
                                "slowdown": med / row["native_p50_ms"]["median"],
                                "slowdown_of_min": low / row["native_p50_ms"]["min"]}
    return row


def agreement(rows: list[dict[str, Any]], cpu: str, reps: int) -> dict[str, Any]:
    """Kendall tau native vs emulated (median and min statistics), and each side's rep-vs-rep noise floor."""
    def floor(get: Any) -> list[float]:
        return [kendall([get(r)[i] for r in rows], [get(r)[j] for r in rows])["tau"]
                for i in range(reps) for j in range(i + 1, reps)]

    slow = [r["emulated"][cpu]["slowdown"] for r in rows]
    return {
        "kendall_native_vs_emulated": kendall([r["native_p50_ms"]["median"] for r in rows],
                                              [r["emulated"][cpu]["p50_ms"]["median"] for r in rows]),
        "kendall_native_vs_emulated_min": kendall([r["native_p50_ms"]["min"] for r in rows],
                                                  [r["emulated"][cpu]["p50_ms"]["min"] for r in rows]),
        "noise_floor_tau_native_rep_vs_rep": floor(lambda r: r["native_p50_ms"]["reps"]),
        "noise_floor_tau_emulated_rep_vs_rep": floor(lambda r: r["emulated"][cpu]["p50_ms"]["reps"]),
        "slowdown_min": min(slow), "slowdown_max": max(slow), "slowdown_median": statistics.median(slow),
        "fastest_native": min(rows, key=lambda r: r["native_p50_ms"]["median"])["name"],
        "fastest_emulated": min(rows, key=lambda r: r["emulated"][cpu]["p50_ms"]["median"])["name"],
    }


def print_table(rows: list[dict[str, Any]], agree: dict[str, Any], cpus: list[str]) -> None:
    """The side-by-side table (fastest native first) and the rank agreement per emulated CPU."""
    head = f"{'candidate':<32} {'acc':>6} {'native p50':>11}"
    for cpu in cpus:
        head += f" {cpu + ' p50':>18} {'slowdown':>9}"
    print(head + f" {'parity max|d|':>14} {'argmax=':>8}")
    for r in sorted(rows, key=lambda r: r["native_p50_ms"]["median"]):
        line = f"{r['name']:<32} {r['accuracy_host']:6.3f} {r['native_p50_ms']['median']:9.3f}ms"
        for cpu in cpus:
            e = r["emulated"][cpu]
            line += f" {e['p50_ms']['median']:16.1f}ms {e['slowdown']:8.0f}x"
        line += f" {r['parity']['max_abs_diff']:14.2e} {r['parity']['argmax_agreement']:8.3f}"
        print(line)
    for cpu, a in agree.items():
        k, kmin = a["kendall_native_vs_emulated"], a["kendall_native_vs_emulated_min"]
        print(f"{cpu}: Kendall tau native vs emulated = {k['tau']:.3f} (p = {k['p_value']:.2g}; on min over reps "
              f"{kmin['tau']:.3f}); noise floor rep-vs-rep: native {a['noise_floor_tau_native_rep_vs_rep']}, "
              f"emulated {a['noise_floor_tau_emulated_rep_vs_rep']}; slowdown {a['slowdown_min']:.0f}x to "
              f"{a['slowdown_max']:.0f}x; fastest: native {a['fastest_native']!r}, emulated {a['fastest_emulated']!r}")


if __name__ == "__main__":
    raise SystemExit(main())
