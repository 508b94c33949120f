"""On-device health check of an installed version: the host's reference outputs, and latency.

DEPENDENCY NOTE: runs on the edge device (see agents/kernel.py): the standard library, numpy,
onnxruntime, agents.kernel and agents.versions only; Python 3.9 syntax; no subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import numpy as np

from agents.kernel import AgentError, ExitCode, create_session, file_sha256, latency_stats, one_line, timed_runs
from agents.versions import (
    HEALTH,
    MANIFEST,
    MODEL,
    REFERENCE,
    Layout,
    check_version,
    checked_current,
    read_json,
    write_atomic,
)


def load_reference(path: str) -> tuple[dict, dict]:
    """The reference data's inputs and outputs by name (reference.npz: `inputs/<name>`, `outputs/<name>`)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise AgentError("cannot read reference data %s: %s" % (path, one_line(exc)), ExitCode.MODEL_INVALID)
    inputs = {k[len("inputs/"):]: v for k, v in arrays.items() if k.startswith("inputs/")}
    outputs = {k[len("outputs/"):]: v for k, v in arrays.items() if k.startswith("outputs/")}
    return inputs, outputs


def compare_outputs(got: dict, expected: dict, rtol: float, atol: float) -> dict:
    """|got - expected| <= atol * max(1, max|expected|) + rtol * |expected|, element-wise, for every output.

    Integer outputs (labels, indices) must be equal. NaN never matches.
    """
    worst = {"ok": True, "max_abs_err": 0.0, "mismatched": 0, "elements": 0, "output": None, "rtol": rtol, "atol": atol}
    for name, ref in sorted(expected.items()):
        out = got.get(name)
        worst["elements"] += int(np.size(ref))
        if out is None or np.shape(out) != np.shape(ref):
            worst.update(ok=False, output=name, mismatched=worst["mismatched"] + int(np.size(ref)),
                         error="output %s has shape %s, the reference %s"
                         % (name, None if out is None else list(np.shape(out)), list(np.shape(ref))))
            continue
        ref64, out64 = np.asarray(ref, np.float64), np.asarray(out, np.float64)
        err = np.abs(out64 - ref64)
        if np.issubdtype(np.asarray(ref).dtype, np.floating):
            scale = max(1.0, float(np.max(np.abs(ref64)))) if ref64.size else 1.0
            bad = ~(err <= atol * scale + rtol * np.abs(ref64))  # NaN compares False: bad
        else:
            bad = np.asarray(out) != np.asarray(ref)
        max_err = float(np.max(np.where(np.isnan(err), np.inf, err))) if err.size else 0.0
        if worst["output"] is None or max_err > worst["max_abs_err"]:
            worst["max_abs_err"], worst["output"] = max_err, name
        if bad.any():
            worst["ok"] = False
            worst["mismatched"] += int(bad.sum())
    return worst


def run_health(layout: Layout, version: str, args: argparse.Namespace) -> dict:
    """Run a version on its reference inputs: outputs against the host's, latency against the profile's limit."""
    folder = layout.version_dir(version)
    manifest = read_json(os.path.join(folder, MANIFEST))
    if manifest is None:
        raise AgentError("version %s... is not installed" % version[:12], ExitCode.MODEL_NOT_FOUND)
    spec = (manifest.get("meta") or {}).get("health") or {}
    reasons, warnings = [], []
    result = {"version": version, "checked_at": time.time(), "precision": spec.get("precision")}
    model_path = os.path.join(folder, MODEL)
    if file_sha256(model_path) != manifest.get("sha256"):
        reasons.append("the model file no longer matches its sha256 (changed on the device's disk)")
        result.update(healthy=False, reasons=reasons)
        return result
    try:
        session = create_session(model_path, int(spec.get("threads", 1)), int(spec.get("inter_op_threads", 1)),
                                 list(spec.get("providers") or ["CPUExecutionProvider"]), warnings)
        inputs, expected = load_reference(os.path.join(folder, REFERENCE))
        names = [m.name for m in session.get_outputs()]
        got = dict(zip(names, session.run(None, inputs)))
    except AgentError as exc:
        reasons.append(one_line(exc))
        result.update(healthy=False, reasons=reasons, warnings=warnings)
        return result
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        reasons.append("inference failed: %s" % one_line(exc))
        result.update(healthy=False, reasons=reasons, warnings=warnings)
        return result
    outputs = compare_outputs(got, expected, float(spec.get("rtol", 1e-3)), float(spec.get("atol", 1e-4)))
    if not outputs["ok"]:
        reasons.append(outputs.get("error") or "outputs differ from the reference: %d of %d values out of tolerance "
                       "(max |err| %.3g; tolerance %g x max(1, max|ref|) + %g x |ref|, %s)"
                       % (outputs["mismatched"], outputs["elements"], outputs["max_abs_err"], outputs["atol"],
                          outputs["rtol"], spec.get("precision") or "fp32"))
    # latency at the profile's batch size: symbolic batch dimensions are cut to it
    batch = int(spec.get("batch", 1))
    feeds = {}
    for meta in session.get_inputs():
        dims = meta.shape
        symbolic = bool(dims) and not (isinstance(dims[0], int) and dims[0] > 0)
        feeds[meta.name] = inputs[meta.name][:batch] if symbolic else inputs[meta.name]
    runs = args.runs if args.runs is not None else int(spec.get("runs", 50))
    budget = args.time_budget if args.time_budget is not None else float(spec.get("time_budget_s", 3.0))
    try:
        timed_runs(lambda: session.run(None, feeds), int(spec.get("warmup", 3)), budget, 1)
        stats = latency_stats(timed_runs(lambda: session.run(None, feeds), runs, budget, min(runs, 5)))
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        reasons.append("inference failed at batch %d: %s" % (batch, one_line(exc)))
        result.update(healthy=False, reasons=reasons, outputs=outputs, warnings=warnings)
        return result
    percentile, limit = spec.get("latency_percentile", "p90"), spec.get("max_latency_ms")
    value = stats.get(percentile, stats["p90"])
    latency = {"percentile": percentile, "value_ms": value, "max_ms": limit, "p50": stats["p50"], "runs": runs,
               "ok": limit is None or value <= float(limit)}
    if not latency["ok"]:
        reasons.append("latency %s %.3g ms is over the profile's %.3g ms" % (percentile, value, float(limit)))
    result.update(healthy=not reasons, reasons=reasons, outputs=outputs, latency=latency,
                  execution_provider=session.get_providers()[0], warnings=warnings)
    return result


def cmd_health(args: argparse.Namespace) -> dict:
    """Health check of `current` (or --version): reference outputs and latency; saved on the device too."""
    layout = Layout(args.root)
    fallback = None
    if args.version:
        version = check_version(args.version)
    else:
        version, fallback = checked_current(layout)
        # no intact version to fall back to: check the broken one, which reports why it is unhealthy
        version = version or layout.linked_version()
    if version is None:
        raise AgentError("no current version in %s" % layout.root, ExitCode.MODEL_NOT_FOUND)
    result = run_health(layout, version, args)
    if fallback is not None:
        result["fallback"] = fallback
    data = json.dumps(result).encode()
    with contextlib.suppress(OSError):  # the result matters more than keeping a copy of it
        write_atomic(os.path.join(layout.version_dir(version), HEALTH), data)
        write_atomic(layout.health, data)
    return result


def cmd_watch(args: argparse.Namespace) -> dict:
    """Service mode (deploy/systemd): health-check `current` every --interval s and whenever it changes.

    Each check prints one JSON line (the journal keeps them) and is saved as health.json.
    """
    layout = Layout(args.root)
    checks, last_version, last_at, fallback = 0, None, 0.0, None
    while args.count is None or checks < args.count:
        version, found = checked_current(layout)
        fallback = found or fallback
        version = version or layout.linked_version()  # nothing intact to fall back to: its check says why
        if version is not None and (version != last_version or time.monotonic() - last_at >= args.interval):
            result = cmd_health(argparse.Namespace(root=args.root, version=version, runs=None, time_budget=None))
            line = {"command": "watch", "check": result}
            if fallback is not None:
                line["fallback"], fallback = fallback, None
            print(json.dumps(line), flush=True)
            checks, last_version, last_at = checks + 1, version, time.monotonic()
        else:
            time.sleep(min(1.0, args.interval))
    return {"checks": checks, "current": last_version}
