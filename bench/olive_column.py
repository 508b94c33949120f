"""The Olive column of bench/own_models.py (issue 29 item 5): the peer's best CPU workflow on the same ONNX file
and samples as a run, measured in the same interleaved rounds as fp32 and the pick.

Where olive-ai is installed (the bench-only extra `bench-olive`; it is never installed for the tests or CI),
each model's run gives Olive

- the run's own fp32 ONNX file (for a Hugging Face folder, the very export the run measured as its baseline),
- the run's calibration rows (the first half of the samples) to calibrate static int8, and its held-out rows,
- an evaluator with the run's quality metric against the run's reference outputs on those held-out rows (the
  product's `agreement_score`: cosine, top-1 agreement, ...), with a threshold goal at the profile's limit
  (baseline quality minus `max_accuracy_drop` points), and Olive's own latency (p50, one thread, the first
  held-out row), latency first, with the goal of Olive's BERT CPU recipe: faster than the input model;

and runs Olive's own search (`olive run`, local system, CPUExecutionProvider, offline; by default every point of
the pass's search space, Olive's sequential sampler, else TPE for a number of iterations) for each workflow that
applies:

- `int8`: `OnnxQuantization` searched: dynamic or static, int8/uint8, per-channel, reduce-range,
  pre-processing, and for static the calibration method (MinMax, Entropy, Percentile) and QDQ/QOperator;
- `transformers-opt + int8` (a MatMul/Softmax model without convolutions): Olive's BERT CPU recipe,
  `OrtTransformersOptimization` (BERT fusions; heads and hidden size from the Hugging Face folder's config.json
  where there is one) then the same searched `OnnxQuantization`.

Each workflow's best is Olive's own: the fastest of its candidates (Olive's latency) that meet both goals. It is
then scored again by the product (the run's task, the same rows) and timed beside fp32 and the pick; Olive's best
is the faster of the workflows' bests in those rounds, or fp32 itself where no workflow gave a model.
`OrtSessionParamsTuning` is not run: it tunes thread counts, which the protocol fixes at one, and its result is
session options beside the model, not in the file the device times. Three olive-ai 0.13 bugs are worked around
(see `bench_evaluator`, `workflow_config`, `patch_footprint`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED = "olive-ai not installed"
WORKFLOWS = ("int8", "transformers-opt + int8")
TARGET = 1.5  # issue 29: the pick >= 1.5x faster than Olive's best


def ratio(num: list[float], den: list[float]) -> tuple[float, list[float]]:
    """Ratio of the medians, and the 10-90% spread of the per-round ratios."""
    ratios = sorted(n / d for n, d in zip(num, den))
    q = len(ratios) // 10
    return statistics.median(num) / statistics.median(den), [ratios[q], ratios[-1 - q]]


def olive_version() -> str | None:
    """olive-ai's version where `import olive` works, else None."""
    try:
        from importlib.metadata import version

        import olive  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no column, said in one line
        return None
    return version("olive-ai")


# ------------------------------------------------------------------- run inside Olive's process (the user script)
def npz_rows(data_dir: Any = None, path: str = "", **kwargs: Any) -> list[tuple[dict[str, Any], int]]:
    """Olive dataset: the model inputs of an .npz (`inputs` names them), one (feeds, 0) pair per row."""
    import numpy as np

    data = np.load(path)
    names = json.loads(str(data["meta"]))["inputs"]
    return [({n: data[n][i] for n in names}, 0) for i in range(len(data[names[0]]))]


def olive_quality(model_path: str, path: str) -> float:
    """The run's quality metric of an ONNX file on the held-out rows of `path` against the run's reference."""
    import numpy as np
    import onnxruntime as ort

    from orchestrator.models.agreement import agreement_score

    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
    session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    outputs = session.run(meta["outputs"], {n: data[n] for n in meta["inputs"]})
    reference = [data[f"reference_{i}"] for i in range(len(meta["outputs"]))]
    return float(agreement_score(meta["metric"], outputs, reference, meta["outputs"]))


def bench_evaluator(heldout: str = "", **kwargs: Any) -> Any:
    """Olive evaluator (registered by the user script): Olive's own ONNX evaluator for latency, and the metric
    named `quality` computed by `olive_quality`. (A `custom` metric would do, but olive-ai 0.13 fails to
    serialise a run config holding one: `serialize_backend` on its None backend.)"""
    from olive.evaluator.metric_result import SubMetricResult, joint_metric_key
    from olive.evaluator.olive_evaluator import OnnxEvaluator

    class BenchEvaluator(OnnxEvaluator):
        def evaluate(self, model: Any, metrics: list[Any], device: Any = "cpu", execution_providers: Any = None):
            result = super().evaluate(model, [m for m in metrics if m.name != "quality"], device,
                                      execution_providers)
            for metric in (m for m in metrics if m.name == "quality"):
                value = olive_quality(str(model.model_path), heldout)
                for sub in metric.sub_types:
                    result.root[joint_metric_key(metric.name, sub.name)] = SubMetricResult(
                        value=value, priority=sub.priority, higher_is_better=True)
            return result

    return BenchEvaluator(**kwargs)


def patch_footprint() -> None:
    """olive-ai 0.13: a joint search of two passes fails at every point after the first ("FootprintNode" object has
    no field "model_config": a cached pass output is recorded under the field's alias); record it under its name."""
    from olive.engine.footprint import FootprintNode

    update = FootprintNode.update
    if getattr(update, "eo_patched", False):
        return

    def renamed(self: Any, **kwargs: Any) -> Any:
        if "model_config" in kwargs:
            kwargs["model_config_data"] = kwargs.pop("model_config")
        return update(self, **kwargs)

    renamed.eo_patched = True  # type: ignore[attr-defined]
    FootprintNode.update = renamed


USER_SCRIPT = """import functools
import sys
sys.path.insert(0, {root!r})
from olive.data.registry import Registry
from olive.evaluator.registry import Registry as Evaluators
from bench.olive_column import bench_evaluator, npz_rows, patch_footprint
Registry.register_dataset("eo_npz_rows")(npz_rows)
Evaluators.register("eo_bench")(functools.partial(bench_evaluator, heldout={heldout!r}))
patch_footprint()
"""


# -------------------------------------------------------------------------------------------- the workflows
def is_transformer(model_bytes: bytes) -> bool:
    """A MatMul/Softmax graph without convolutions: Olive's transformer optimisation applies."""
    import onnx

    ops = {n.op_type for n in onnx.load_from_string(model_bytes).graph.node}
    return {"MatMul", "Softmax"} <= ops and not ops & {"Conv", "ConvTranspose"}


def workflow_config(name: str, fp32: Path, folder: Path, limit: float, samples: int,
                    shape: dict[str, int] | None = None) -> dict[str, Any]:
    """The `olive run` config of workflow `name` on the fp32 file, with the bench's data, metric and goal."""
    meta = {"user_script": str(folder / "olive_user_script.py")}
    data = [{"name": split, "type": "DataContainer", **meta,
             "load_dataset_config": {"type": "eo_npz_rows", "path": str(folder / f"{split}.npz")},
             "dataloader_config": {"batch_size": 1}} for split in ("calibration", "heldout")]
    one_thread = {"onnx": {"session_options": {"intra_op_num_threads": 1, "inter_op_num_threads": 1}}}
    metrics = [{"name": "latency", "type": "latency", "data_config": "heldout",
                "sub_types": [{"name": "p50", "priority": 1,  # as Olive's BERT CPU recipe: faster than the input
                               "goal": {"type": "percent-min-improvement", "value": 0.1},
                               "metric_config": {"warmup_num": 10, "repeat_test_num": 50}}],
                "user_config": {"inference_settings": one_thread}},
               {"name": "quality", "type": "accuracy", "data_config": "heldout",  # computed by bench_evaluator
                "sub_types": [{"name": "accuracy_score", "priority": 2,
                               "goal": {"type": "threshold", "value": limit}}]}]
    passes: dict[str, Any] = {}
    if name == "transformers-opt + int8":
        passes["transformers_optimization"] = {"type": "OrtTransformersOptimization", "model_type": "bert",
                                               **(shape or {})}
    passes["quantization"] = {"type": "OnnxQuantization", "data_config": "calibration"}
    slug = name.replace(" + ", "_").replace("-", "_")
    return {"workflow_id": slug, "input_model": {"type": "ONNXModel", "model_path": str(fp32)},
            "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
                {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
            "data_configs": data, "evaluators": {"bench": {"type": "eo_bench", "metrics": metrics, **meta}},
            "passes": passes,
            # samples <= 0: every point of the search space (Olive's sequential sampler). Else TPE for `samples`
            # iterations: max_iter, not the sampler's max_samples, which olive-ai 0.13 drops when it serialises
            # the run config before building the engine (sampler_config dumps as its empty base class)
            "search_strategy": ({"execution_order": "joint", "sampler": "sequential"} if samples <= 0 else
                                {"execution_order": "joint", "sampler": "tpe", "max_iter": samples}),
            "evaluator": "bench", "host": "local_system", "target": "local_system",
            "cache_dir": str(folder / "cache"), "output_dir": str(folder / slug),
            "log_severity_level": 2}  # warnings and errors: one line per search point that failed


def write_data(task: Any, data: dict[str, Any], folder: Path) -> None:
    """calibration.npz and heldout.npz (with the run's reference outputs) for the user script."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    script = USER_SCRIPT.format(root=str(ROOT), heldout=str(folder / "heldout.npz"))
    (folder / "olive_user_script.py").write_text(script)
    names, outputs = [s.name for s in task.inputs], [o.name for o in task.outputs]
    for split, key in (("calibration", "calibration"), ("heldout", "eval")):
        rows = data[key].rows(0, len(data[key]))
        rows = rows if isinstance(rows, dict) else {names[0]: rows}
        extra = ({f"reference_{i}": np.asarray(r) for i, r in enumerate(data[key].labels)} if key == "eval" else {})
        meta = {"inputs": names, "outputs": outputs, "metric": task.quality_metric}
        np.savez(folder / f"{split}.npz", meta=np.array(json.dumps(meta)), **rows, **extra)


def run_workflow(config: dict[str, Any], folder: Path) -> tuple[list[dict[str, Any]], int]:
    """`python -m olive run --config` in its own process (Olive patches onnxruntime's calibrater in place); every
    candidate it evaluated: its model file, passes, Olive's latency and quality, whether it met the goals; and how
    many search points failed (a quantizer's or calibrater's error)."""
    path = folder / f"{config['workflow_id']}.json"
    path.write_text(json.dumps(config, indent=1))
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "olive", "run", "--config", str(path)], cwd=folder, env=env,
                          capture_output=True, text=True, check=False)
    (folder / f"{config['workflow_id']}.log").write_text(done.stdout + done.stderr)
    footprint = Path(config["output_dir"]) / "footprint.json"
    if not footprint.exists():
        raise RuntimeError(f"olive run {config['workflow_id']} wrote no footprint (exit {done.returncode}): "
                           + (done.stderr.strip().splitlines() or ["no output"])[-1])
    nodes = json.loads(footprint.read_text())
    out = []
    for node_id, node in nodes.items():
        values = ((node.get("metrics") or {}).get("value")) or {}
        if not node.get("parent_model_id") or "latency-p50" not in values:
            continue
        chain, at = [], node_id
        while at and nodes[at].get("from_pass"):
            chain.insert(0, {"pass": nodes[at]["from_pass"],
                             "config": {k: v for k, v in (nodes[at].get("pass_run_config") or {}).items()
                                        if k not in ("data_config", "user_script", "script_dir") and v is not None
                                        and not (isinstance(v, dict) and "olive_parameter_type" in v)}})
            at = nodes[at].get("parent_model_id")
        path = (node.get("model_config_data") or {}).get("config", {}).get("model_path")
        out.append({"model_id": node_id, "path": path,
                    "passes": chain, "olive_latency_ms": values["latency-p50"]["value"],
                    "olive_quality": values["quality-accuracy_score"]["value"],
                    "goal_met": bool(node["metrics"].get("if_goals_met"))})
    # a point whose pass raised: "Pass run_pass failed" / "Pass run failed." (caught in the pass), or the search's
    # "... FAILED." (raised past it), one line each
    lines = (done.stdout + done.stderr).splitlines()
    return out, sum(("] Pass run_pass failed" in line or "] Pass run failed." in line
                     or line.rstrip().endswith(") ... FAILED.")) for line in lines)


def onnx_file(path: str) -> Path:
    """The .onnx file of an Olive model path (a file, or a folder holding one)."""
    p = Path(path)
    return p if p.is_file() else next(p.glob("*.onnx"))


def olive_best(task: Any, fp32_bytes: bytes, limit: float, folder: Path, samples: int,
               shape: dict[str, int] | None = None, log: Any = print) -> dict[str, Any]:
    """Olive's workflows on the fp32 file; per workflow its best candidate within `limit`, scored again by the
    product. {"workflows": {name: {...}}, "models": [(name, bytes)]} (the bests, to be timed side by side)."""
    from orchestrator.models.outputs import onnx_outputs

    data = task.load_data(0)
    write_data(task, data, folder)
    fp32 = folder / "fp32.onnx"
    fp32.write_bytes(fp32_bytes)
    names = [w for w in WORKFLOWS if w == "int8" or is_transformer(fp32_bytes)]
    report: dict[str, Any] = {"workflows": {}, "models": []}
    for name in names:
        how = "every point of its search space" if samples <= 0 else f"TPE, {samples} iterations"
        log(f"   olive: {name} ({how}) ...")
        try:
            tried, failed = run_workflow(workflow_config(name, fp32, folder, limit, samples, shape), folder)
        except RuntimeError as exc:
            report["workflows"][name] = {"error": str(exc), "tried": 0}
            log(f"   olive: {name}: {exc}")
            continue
        entry: dict[str, Any] = {"tried": len(tried), "failed": failed, "met_goals": sum(t["goal_met"] for t in tried),
                                 "best": None, "points": [{"what": describe(t["passes"]), **{
                                     k: t[k] for k in ("olive_latency_ms", "olive_quality", "goal_met")}}
                                     for t in tried]}
        for cand in sorted((t for t in tried if t["goal_met"]), key=lambda t: t["olive_latency_ms"]):
            model = onnx_file(cand["path"]).read_bytes()
            quality = float(task.score(onnx_outputs(model, task, data["eval"]), data["eval"].labels))
            if quality >= limit - 1e-9:  # the product agrees: this is the workflow's best
                entry["best"] = {**cand, "quality": quality, "size_bytes": len(model)}
                report["models"].append((name, model))
                break
        report["workflows"][name] = entry
        best = entry["best"]
        log(f"   olive: {name}: {entry['met_goals']} of {len(tried)} met its goals (within the limit, faster than "
            "fp32 by Olive's timing); best "
            + (f"{describe(best['passes'])}, quality {best['quality']:.4f}" if best else "none"))
    return report


def describe(passes: list[dict[str, Any]]) -> str:
    """A pipeline of Olive passes in a few words (the settings that differ between its quantization variants)."""
    words = []
    for p in passes:
        c = p["config"]
        if p["pass"].lower() == "onnxquantization":
            mode = c.get("quant_mode", "static")
            bits = [mode, str(c.get("precision", "int8"))] + (["per-channel"] if c.get("per_channel") else []) + (
                ["reduce-range"] if c.get("reduce_range") else [])
            if mode == "static":
                bits += [str(c.get("quant_format", "QDQ")), str(c.get("calibrate_method", "MinMax"))]
            words.append("OnnxQuantization " + " ".join(bits))
        else:
            words.append("OrtTransformersOptimization" if p["pass"].lower() == "orttransformersoptimization"
                         else p["pass"])
    return " + ".join(words)


# ------------------------------------------------------------------------------- for bench/own_models.py
def prepare(results: dict[str, Any], source: str, samples: Path, folder: Path, budget: int) -> dict[str, Any]:
    """Olive's workflows for one finished run (its fp32 file, rows, metric and limit); `models` are the bests to
    time beside fp32 and the pick."""
    from orchestrator.config.profile import load_profile
    from orchestrator.models.ownmodel import OwnModelTask
    from orchestrator.state.paths import cache_dir

    drop = load_profile(Path(results["profile_path"])).profile.constraints.max_accuracy_drop
    limit = results["baseline"]["metrics"]["accuracy"] - drop / 100.0
    task = OwnModelTask(source, str(samples), quality=results["quality_metric"])
    fp32 = (cache_dir("models") / f"{results['baseline']['model_sha256']}.onnx").read_bytes()
    report = olive_best(task, fp32, limit, folder, budget, transformer_shape(source))
    return {**report, "limit": limit, "budget": budget, "version": olive_version()}


def transformer_shape(source: str) -> dict[str, int]:
    """num_heads and hidden_size from a Hugging Face folder's config.json, as an Olive user would give them for
    its exported ONNX file (its attention fusion does not find them in this export by itself), else none."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return {}
    data = json.loads(config.read_text())
    heads, hidden = data.get("num_attention_heads"), data.get("hidden_size")
    return {"num_heads": heads, "hidden_size": hidden} if heads and hidden else {}


def summary(report: dict[str, Any], figures: dict[str, Any], fp32_bytes: int) -> dict[str, Any]:
    """The Olive column of one row: the workflows run, the one taken (the fastest best in the rounds; fp32 where
    Olive gave no model faster within the limit), its ratios against fp32 and the pick's against it."""
    bests = [(name, report["workflows"][name]["best"], rounds)
             for (name, _), rounds in zip(report["models"], figures["extra_rounds_ms"])]
    out: dict[str, Any] = {"version": report["version"], "budget": report["budget"],
                           "workflows": {k: {**v, "best": v.get("best") and {
                               key: v["best"][key] for key in ("passes", "olive_latency_ms", "quality", "size_bytes")}}
                               for k, v in report["workflows"].items()}}
    if not bests:
        out.update(taken="fp32 (no Olive model faster than fp32 within the limit)", workflow=None, smaller=1.0,
                   faster=1.0, faster_spread=[1.0, 1.0], quality=None)
        olive_rounds = figures["fp32_rounds_ms"]
    else:
        name, best, olive_rounds = min(bests, key=lambda b: statistics.median(b[2]))
        faster, spread = ratio(figures["fp32_rounds_ms"], olive_rounds)
        out.update(taken=name, workflow=describe(best["passes"]), smaller=fp32_bytes / best["size_bytes"],
                   faster=faster, faster_spread=spread, quality=best["quality"],
                   p50_ms=statistics.median(olive_rounds),
                   others={n: statistics.median(r) for n, _, r in bests if n != name})
    out["pick_vs_olive"], out["pick_vs_olive_spread"] = ratio(olive_rounds, figures["pick_rounds_ms"])
    out["target_met"] = out["pick_vs_olive"] >= TARGET
    return out


def cell(entry: dict[str, Any]) -> str:
    """The table's Olive cells: `Olive's best (smaller, faster, quality) | pick vs Olive`."""
    olive = entry.get("olive")
    if not olive or "missing" in olive:
        return f"{(olive or {}).get('missing', 'not measured')} | - |"
    tried = ", ".join(f"{k}: {v['tried']} evaluated" + (f", {v['failed']} failed" if v.get("failed") else "")
                      + f", {v.get('met_goals', 0)} met the goals" for k, v in olive["workflows"].items())
    what = (f"{olive['taken']}: {olive['workflow']}, {olive['smaller']:.2f}x smaller, {olive['faster']:.2f}x "
            f"({olive['faster_spread'][0]:.2f}-{olive['faster_spread'][1]:.2f}), quality {olive['quality']:.4f}"
            if olive["workflow"] else olive["taken"]) + f" ({tried})"
    return (f"{what} | {olive['pick_vs_olive']:.2f}x ({olive['pick_vs_olive_spread'][0]:.2f}-"
            f"{olive['pick_vs_olive_spread'][1]:.2f}) |")
