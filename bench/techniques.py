"""The built-in techniques on the `digits` task: each alone and the key combinations, measured side by side.

For the fp32 baseline, every technique alone and the combinations (prune + int8,
distil + int8, distil + prune + int8, ...): parameters, size on disk, zlib-compressed
size, accuracy on the held-out split, accuracy drop, latency p50/p90 as the agent
measures them on this machine (the x86-host profile's protocol: one thread, pinned to
the last core), and ratios to the fp32 baseline. Every model is measured in the same
run, in rounds (round-robin, the order reversed every other round), and the median of
the rounds' p50s is reported, so that load from other processes hits all rows alike.

    python bench/techniques.py [--rounds 3] [--runs 300] [--out bench/results/techniques.json]

The base model comes from orchestrator.search.basemodel.get_base_model (trained once, about
1.5 minutes on 2 cores, then cached) under $EDGE_ORCHESTRATOR_HOME, or, when that is
not set, a private folder (.state/bench/techniques-home) so no user state is touched.
Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The configurations measured. Graph techniques come last in a pipeline; the trained torch
# model of a pipeline's training prefix is built once and shared by the rows that start with it.
def _int8(per_channel: bool, calibration: str, activations: str, reduce_range: bool = False) -> dict[str, Any]:
    return {"technique": "int8-static", "params": {"per_channel": per_channel, "calibration": calibration,
                                                   "activations": activations, "reduce_range": reduce_range}}


INT8_PC = _int8(True, "minmax", "uint8")            # the configuration the issue reports
INT8 = _int8(True, "minmax", "uint8", reduce_range=True)  # U8S8 without saturation: used in the combinations
INT8_PT = _int8(False, "entropy", "uint8")
INT8_S8 = _int8(False, "minmax", "int8")
DYN = {"technique": "int8-dynamic", "params": {"per_channel": False, "weight_type": "int8"}}
FP16 = {"technique": "fp16", "params": {}}


def _ps(ratio: float, epochs: int, importance: str = "l1", scope: str = "layer") -> dict[str, Any]:
    return {"technique": "prune-structured",
            "params": {"ratio": ratio, "importance": importance, "scope": scope, "epochs": epochs}}


def _kd(width: float, depth: int, epochs: int = 10) -> dict[str, Any]:
    return {"technique": "distill",
            "params": {"width": width, "depth": depth, "temperature": 4.0, "alpha": 0.9, "epochs": epochs}}


NAS = {"technique": "nas", "params": {"width": 0.5, "depth": 1, "kernel": 3, "epochs": 8}}
NAS75 = {"technique": "nas", "params": {"width": 0.75, "depth": 2, "kernel": 3, "epochs": 8}}
PS50 = _ps(0.5, 1)
PS75 = _ps(0.75, 2)
PM90 = {"technique": "prune-magnitude", "params": {"sparsity": 0.9, "scope": "global", "epochs": 1}}
PM70 = {"technique": "prune-magnitude", "params": {"sparsity": 0.7, "scope": "global", "epochs": 1}}

ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    ("fp32 baseline", []),
    ("int8-static per-channel minmax u8", [INT8_PC]),
    ("int8-static per-channel minmax u8 7-bit", [INT8]),
    ("int8-static per-tensor entropy u8", [INT8_PT]),
    ("int8-static per-tensor minmax s8", [INT8_S8]),
    ("int8-dynamic", [DYN]),
    ("fp16", [FP16]),
    ("prune-structured 50% l1, 0 ep", [_ps(0.5, 0)]),
    ("prune-structured 50% l1, 1 ep", [PS50]),
    ("prune-structured 50% taylor global, 2 ep", [_ps(0.5, 2, "taylor", "global")]),
    ("prune-structured 75% l1, 2 ep", [PS75]),
    ("prune-magnitude 90% global, 1 ep", [PM90]),
    ("distill 0.5x width, 2 blocks, 10 ep", [_kd(0.5, 2)]),
    ("distill 0.75x width, 1 block, 10 ep", [_kd(0.75, 1)]),
    ("distill 0.5x width, 1 block, 10 ep", [_kd(0.5, 1)]),
    ("prune-structured 50% + int8", [PS50, INT8]),
    ("prune-structured 75% + int8", [PS75, INT8]),
    ("prune-magnitude 90% + int8", [PM90, INT8]),
    ("prune-structured 50% + prune-magnitude 70% + int8", [PS50, PM70, INT8]),
    ("distill 0.75x/1 + int8", [_kd(0.75, 1), INT8]),
    ("distill 0.5x/1 + int8", [_kd(0.5, 1), INT8]),
    ("distill 0.5x/2 + prune-structured 50% + int8", [_kd(0.5, 2), PS50, INT8]),
    ("nas 0.5x width, 1 block, k3, 8 ep", [NAS]),
    ("nas 0.75x width, 2 blocks, k3, 8 ep", [NAS75]),
    ("nas 0.5x/1/k3 + int8", [NAS, INT8]),
]


def _private_home() -> None:
    if not os.environ.get("EDGE_ORCHESTRATOR_HOME"):
        home = ROOT / ".state" / "bench" / "techniques-home"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["EDGE_ORCHESTRATOR_HOME"] = str(home)


class Builder:
    """Builds each row's model, sharing the trained torch model of common training prefixes."""

    def __init__(self, registry: Any, task: Any, data: dict[str, Any], base: Any, profile: Any, seed: int) -> None:
        self.registry, self.task, self.data, self.base = registry, task, data, base
        self.profile, self.seed = profile, seed
        self._trained: dict[str, tuple[Any, dict[str, float]]] = {"[]": (base, {})}

    def trained(self, steps: list[dict[str, Any]]) -> tuple[Any, dict[str, float]]:
        """The torch model after the training steps, and the seconds each step took (cumulative pipeline)."""
        from orchestrator.api import TechniqueContext

        key = json.dumps(steps, sort_keys=True)
        if key not in self._trained:
            parent, timings = self.trained(steps[:-1])
            step = steps[-1]
            technique = self.registry.technique(step["technique"])
            with tempfile.TemporaryDirectory(prefix="eo-bench-") as scratch:
                ctx = TechniqueContext(task=self.task, data=self.data, teacher=self.base, profile=self.profile,
                                       scratch_dir=Path(scratch), seed=self.seed)
                start = time.perf_counter()
                model = technique.apply(copy.deepcopy(parent), technique.check_params(step["params"]), ctx)
                timings = {**timings, technique.name: round(time.perf_counter() - start, 2)}
                if ctx.fine_tune_seconds:
                    timings[f"{technique.name}.fine_tune"] = round(ctx.fine_tune_seconds, 2)
            self._trained[key] = (model, timings)
        return self._trained[key]

    def build(self, pipeline: list[dict[str, Any]]) -> tuple[bytes, dict[str, Any], int]:
        """(ONNX bytes, build info, parameter count) of one row, through the pipeline module's own build."""
        from orchestrator.search.pipeline import build_candidate
        from orchestrator.search.space import order_pipeline

        ordered = [t.name for t in order_pipeline([self.registry.technique(s["technique"]) for s in pipeline])]
        assert ordered == [s["technique"] for s in pipeline], f"bench rows must be in run order: {ordered}"
        training = [s for s in pipeline if self.registry.technique(s["technique"]).stage != "graph"]
        graph = [s for s in pipeline if self.registry.technique(s["technique"]).stage == "graph"]
        model, timings = self.trained(training)
        onnx_bytes, info = build_candidate(self.registry, self.task, model, graph,
                                           {"data": self.data, "profile": self.profile, "seed": self.seed})
        info["build_seconds"] = {**timings, **info["build_seconds"]}
        return onnx_bytes, info, sum(p.numel() for p in model.parameters())


def measure(models: dict[str, bytes], profile: Any, rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Every model through the agent, `rounds` times, round-robin (order reversed every other round)."""
    from orchestrator.devices.local import LocalTransport, local_device

    device = local_device()
    cpus = os.cpu_count() or 1
    device.pinned_cpu = cpus - 1 if cpus > 1 else None
    transport = LocalTransport(device)
    names = list(models)
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(transport.bench(models[name], profile))
        print(f"  measured round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return out


def machine() -> dict[str, Any]:
    """What this machine is: CPU model, cores, onnxruntime and torch versions."""
    import onnxruntime
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(),
            "avx2": " avx2" in flags, "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": " avx_vnni" in flags,
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "python": platform.python_version()}


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    head = ("| configuration | params | size KiB | zlib KiB | accuracy % | drop pts | p50 ms | p90 ms "
            "| smaller x | zlib smaller x | faster x | training s |\n|" + "---|" * 12)
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['name']} | failed: {r['error']} |" + " |" * 10)
            continue
        lines.append(
            f"| {r['name']} | {r['params']:,} | {r['size_bytes'] / 1024:.0f} | {r['compressed_size_bytes'] / 1024:.0f} "
            f"| {100 * r['accuracy']:.2f} | {r['accuracy_drop']:+.2f} | {r['latency_p50_ms']:.3f} "
            f"| {r['latency_p90_ms']:.3f} | {r['size_ratio']:.2f} | {r['compressed_ratio']:.2f} "
            f"| {r['speedup']:.2f} | {r['training_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build every row, measure them side by side, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="measurement rounds per model (median of p50s)")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated row numbers to run (1 = baseline, always included)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "techniques.json")
    args = parser.parse_args(argv)
    _private_home()

    import torch

    from orchestrator.config.profile import load_profile
    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.search.basemodel import get_base_model
    from orchestrator.search.pipeline import evaluate_onnx

    torch.set_num_threads(1)  # as a search trial does: training times comparable with the report's
    profile = load_profile(ROOT / "device_profiles" / "x86-host.yaml").profile
    profile = profile.model_copy(update={"measurement": profile.measurement.model_copy(
        update={"runs": args.runs, "time_budget_s": 10.0})})
    registry = get_plugin_manager()
    task = registry.task("digits")
    data = task.load_data(args.seed)
    print("base model: loading (training it if not cached) ...", file=sys.stderr, flush=True)
    trained = get_base_model(task, data, args.seed)
    base = trained.load(task)
    builder = Builder(registry, task, data, base, profile, args.seed)

    chosen = ROWS
    if args.only:
        keep = {1, *(int(i) for i in args.only.split(","))}
        chosen = [row for i, row in enumerate(ROWS, 1) if i in keep]
    built: dict[str, dict[str, Any]] = {}
    models: dict[str, bytes] = {}
    for name, pipeline in chosen:
        start = time.perf_counter()
        try:
            onnx_bytes, info, params = builder.build(pipeline)
        except Exception as exc:  # noqa: BLE001 (a row that fails is reported, the others still run)
            built[name] = {"name": name, "pipeline": pipeline, "error": f"{type(exc).__name__}: {exc}"}
            print(f"{name}: FAILED {exc}", file=sys.stderr, flush=True)
            continue
        accuracy = evaluate_onnx(task, onnx_bytes, data["eval"])
        models[name] = onnx_bytes
        training = sum(v for k, v in info["build_seconds"].items() if "." not in k and k != "export"
                       and registry.technique(k).stage in ("training", "architecture"))
        built[name] = {"name": name, "pipeline": pipeline, "params": params, "size_bytes": len(onnx_bytes),
                       "compressed_size_bytes": info["compressed_size_bytes"], "accuracy": accuracy,
                       "build_seconds": info["build_seconds"], "training_seconds": training}
        print(f"{name}: built in {time.perf_counter() - start:.1f} s, accuracy {100 * accuracy:.2f}%",
              file=sys.stderr, flush=True)

    print(f"measuring {len(models)} models x {args.rounds} rounds with the agent ...", file=sys.stderr, flush=True)
    measured = measure(models, profile, args.rounds)
    base_row = built["fp32 baseline"]
    base_p50 = statistics.median(m["latency_ms"]["p50"] for m in measured["fp32 baseline"])
    rows = []
    for name, _ in chosen:
        row = built[name]
        if name in measured:
            p50s = [m["latency_ms"]["p50"] for m in measured[name]]
            row.update(
                latency_p50_ms=statistics.median(p50s),
                latency_p90_ms=statistics.median(m["latency_ms"]["p90"] for m in measured[name]),
                latency_p50_rounds_ms=p50s,
                peak_memory_mb=statistics.median(m["peak_memory_mb"] for m in measured[name]),
                noisy=any(m.get("noisy") for m in measured[name]),
                accuracy_drop=round(100 * (base_row["accuracy"] - row["accuracy"]), 2),
                size_ratio=base_row["size_bytes"] / row["size_bytes"],
                compressed_ratio=base_row["size_bytes"] / row["compressed_size_bytes"],
                speedup=base_p50 / statistics.median(p50s),
            )
        rows.append(row)

    first = next(iter(measured.values()))[0]
    result = {
        "schema_version": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "task": task.name,
        "base_accuracy_torch": trained.accuracy,
        "protocol": {"rounds": args.rounds, "runs": args.runs, "warmup_runs": profile.measurement.warmup_runs,
                     "threads": profile.runtime.intra_op_threads, "pinned_cpu": first.get("pinned_cpu"),
                     "execution_provider": first.get("execution_provider"), "batch": 1,
                     "latency": "median over rounds of the agent's p50"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    m = result["machine"]
    print(f"\n{result['date']}, {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, "
          f"1 thread pinned to CPU {first.get('pinned_cpu')}, {args.rounds} rounds x {args.runs} runs\n")
    print(table(rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
