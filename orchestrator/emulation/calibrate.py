"""Calibration of an emulated board's cost model from one real board (issue 30 item 2).

`orchestrate devices calibrate NAME` measures the fixed suite (orchestrator/emulation/calibration_suite.py)
on a registered real device with the final round's interleaved protocol (the agent's `compare`, one
onnxruntime thread, as the count uses), counts each item's instructions on the device's emulated twin,
and fits

    board ms = instructions x ms_per_instruction (+ intercept_ms, only where it earns its place)

by least squares on relative error (each item weighs alike, whatever its size). The intercept is
kept only when it is positive and lowers the leave-one-out error by a fifth or more. The fit is
stored per profile in the state folder (`calibration/<profile>.json`: cpi at the clock the profile's
cost model names, the intercept, the date, the board's name, each item's error), and the profile's
emulated device reads it (orchestrator/emulation/calibration_store.py, through `icount.cost_model`): its latencies then say
`calibrated: true` and `source` names the board and the date. Until then they stay uncalibrated.

The twin: an aarch64 board's is the profile's emulated device (qemu-aarch64, the profile's CPU
model, orchestrator/emulation/icount.py); an x86-64 device on this host's loopback (the tests'
sshd device) is twinned by this host's own onnxruntime under qemu-x86_64 (orchestrator/emulation/twin.py).
"""

from __future__ import annotations

import datetime
import statistics
from typing import Any, Callable

import numpy as np

from orchestrator.emulation import icount, twin
from orchestrator.emulation.calibration_store import SCHEMA_VERSION, save_calibration
from orchestrator.emulation.calibration_suite import suite_models
from orchestrator.errors import MeasurementError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
INTERCEPT_GAIN = 0.8      # keep an intercept only if leave-one-out error falls to 80% or less of the origin fit's
FINAL_ROUNDS = 20         # the board's interleaved rounds (the agent's compare)
FINAL_TIME_BUDGET_S = 40


# ------------------------------------------------------------------------------------------------ fitting

def _solve(x: np.ndarray, y: np.ndarray, intercept: bool) -> tuple[float, float]:
    """(ms per instruction, intercept ms) minimising the sum of squared relative errors."""
    a = np.column_stack([x, np.ones_like(x)]) if intercept else x[:, None]
    coef, *_ = np.linalg.lstsq(a / y[:, None], np.ones_like(y), rcond=None)
    return float(coef[0]), float(coef[1]) if intercept else 0.0


def _loo(x: np.ndarray, y: np.ndarray, intercept: bool) -> list[float]:
    errors = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        slope, icpt = _solve(x[keep], y[keep], intercept)
        errors.append(float((slope * x[i] + icpt - y[i]) / y[i]))
    return errors


def error_summary(errors: list[float]) -> dict[str, float]:
    """Median and largest |relative error|, and the share within 10% and 25%."""
    a = [abs(float(e)) for e in errors]
    return {"median_abs_error": round(statistics.median(a), 4), "max_abs_error": round(max(a), 4),
            "within_10pct": round(sum(e <= 0.10 for e in a) / len(a), 3),
            "within_25pct": round(sum(e <= 0.25 for e in a) / len(a), 3)}


def fit(instructions: list[float], board_ms: list[float]) -> dict[str, Any]:
    """The cost model's fit: `ms_per_instruction`, `intercept_ms` (0 unless justified), `with_intercept`,
    the in-sample and leave-one-out errors. Needs 2 items (4 to consider an intercept)."""
    x, y = np.asarray(instructions, dtype=float), np.asarray(board_ms, dtype=float)
    if len(x) < 2 or (x <= 0).any() or (y <= 0).any():
        raise MeasurementError("a cost model needs at least 2 items with instructions and latency above 0")
    slope, icpt = _solve(x, y, False)
    loo = _loo(x, y, False) if len(x) >= 3 else []
    with_intercept = False
    if len(x) >= 4:
        s2, i2 = _solve(x, y, True)
        loo2 = _loo(x, y, True)
        gain = statistics.median(map(abs, loo2)) <= INTERCEPT_GAIN * statistics.median(map(abs, loo))
        if i2 > 0 and s2 > 0 and gain:
            slope, icpt, loo, with_intercept = s2, i2, loo2, True
    errors = [float((slope * xi + icpt - yi) / yi) for xi, yi in zip(x, y)]
    return {"ms_per_instruction": slope, "intercept_ms": icpt, "with_intercept": with_intercept,
            "items": len(x), "in_sample": error_summary(errors),
            "leave_one_out": error_summary(loo) if loo else None}


def predict(model: dict[str, Any], instructions: float) -> float:
    """Milliseconds the fit predicts for a count."""
    return model["ms_per_instruction"] * instructions + model["intercept_ms"]


def held_out(instructions: list[float], board_ms: list[float], train: list[int]) -> dict[str, Any]:
    """Fit on the items `train` (indices), predict the others: their errors and rank agreement (Kendall tau)."""
    from scipy.stats import kendalltau  # heavy: scipy only for this check

    test = [i for i in range(len(instructions)) if i not in train]
    model = fit([instructions[i] for i in train], [board_ms[i] for i in train])
    predicted = [predict(model, instructions[i]) for i in test]
    measured = [board_ms[i] for i in test]
    errors = [(p - m) / m for p, m in zip(predicted, measured)]
    tau = float(kendalltau(predicted, measured).statistic) if len(test) >= 2 else float("nan")
    return {"train": train, "test": test, "fit": model, "errors": errors, **error_summary(errors),
            "kendall_tau": round(tau, 3)}


# ------------------------------------------------------------------------------------------------ measuring

def measurement_profile(profile: Any, rounds: int = FINAL_ROUNDS, budget_s: float = FINAL_TIME_BUDGET_S) -> Any:
    """The profile with one onnxruntime thread (as counted) and the final round's rounds for the suite."""
    p = profile.model_copy(deep=True)
    p.runtime.intra_op_threads, p.runtime.inter_op_threads = 1, 1
    p.runtime.execution_providers = ["CPUExecutionProvider"]
    p.measurement.final_rounds, p.measurement.final_time_budget_s = rounds, budget_s
    p.measurement.runs = max(p.measurement.runs, 100)
    return p


def measure_board(transport: Any, models: list[bytes], profile: Any) -> list[dict[str, Any]]:
    """Every model on the board in the same interleaved rounds: the median over rounds of each round's p50."""
    result = transport.compare(models, profile)
    if "error" in result:
        raise MeasurementError(f"the board's compare failed: {result['error']}")
    return [{"ms": statistics.median(m["rounds_ms"]["p50"]), "rounds": len(m["rounds_ms"]["p50"]),
             "rounds_p50_ms": m["rounds_ms"]["p50"]} for m in result["models"]]


def twin_counter(device: Any, profile: Any, jobs: int = 1, log: Callable[[str], None] | None = None,
                 emulated: Any = None) -> tuple[Callable[[list[bytes]], list[float]], dict[str, Any]]:
    """How to count instructions on `device`'s emulated twin, and what the twin is (qemu_cpu, clock_mhz, twin).

    `emulated`: for an aarch64 board, the transport of the profile's emulated device (made by the caller,
    orchestrator/fleet/calibration.py)."""
    arch = (device.arch or "").lower()
    host = device.ssh.host if getattr(device, "ssh", None) is not None else None
    if arch in ("x86_64", "amd64") and (device.transport == "local" or host in LOOPBACK):
        reason = twin.unavailable_reason()
        if reason:
            raise MeasurementError(f"this host's twin cannot run: {reason}")
        cpu = twin.host_cpu()

        def count_x86(models: list[bytes]) -> list[float]:
            return [r["instructions"]["median"] for r in twin.count_models(models, profile, jobs=jobs, log=log)]

        return count_x86, {"twin": twin.twin_description(), "qemu_cpu": None, "clock_mhz": cpu["mhz"] or 1000.0,
                           "clock_source": "this host's /proc/cpuinfo", "isa_note": twin.isa_note()}
    if arch in ("aarch64", "arm64"):
        emu = profile.emulation
        if emu is None or emu.cost_model is None:
            raise MeasurementError(f"profile {profile.name} has no emulation section with a cost_model: "
                                   "no emulated twin to calibrate")
        reason = icount.unavailable_reason()
        if reason:
            raise MeasurementError(f"the emulated twin cannot count: {reason}")
        if emulated is None:
            raise MeasurementError(f"device {device.name}: no emulated device of profile {profile.name} was given")

        def count_arm(models: list[bytes]) -> list[float]:
            return [icount.count_bench(emulated, m, profile)["instructions"]["median"] for m in models]

        return count_arm, {"twin": f"qemu-aarch64 -cpu {emu.qemu_cpu} (the profile's emulated device)",
                           "qemu_cpu": emu.qemu_cpu, "clock_mhz": emu.cost_model.clock_mhz,
                           "clock_source": "the profile's emulation.cost_model"}
    raise MeasurementError(f"device {device.name} ({arch or 'unknown arch'}, {host or device.transport}) has no "
                           "emulated twin here: an aarch64 board (the profile's emulated device) or an x86-64 "
                           "device on this host's loopback (this host's twin)")


def calibrate(transport: Any, device: Any, profile: Any, board_info: dict[str, Any] | None = None,
              names: list[str] | None = None, jobs: int = 1, rounds: int = FINAL_ROUNDS,
              log: Callable[[str], None] | None = None, store: bool = True, emulated: Any = None) -> dict[str, Any]:
    """Measure the suite on the board and count it on the twin, fit, and (when `store`) keep it for the profile.

    Returns the record: the fit (cpi at the twin's clock, intercept), the date, the board, the twin,
    each item's instructions, board ms and error, and a half-and-half held-out check.
    """
    suite = suite_models(names)
    if len(suite) < 4:
        raise MeasurementError("the calibration needs at least 4 suite items")
    count, twin_facts = twin_counter(device, profile, jobs=jobs, log=log, emulated=emulated)
    models = [s["bytes"] for s in suite]
    if log:
        log(f"board {device.name}: {len(models)} suite items in interleaved rounds (one thread)")
    board = measure_board(transport, models, measurement_profile(profile, rounds))
    if log:
        log(f"twin ({twin_facts['twin']}): counting {len(models)} items")
    counts = count(models)
    model = fit(counts, [b["ms"] for b in board])
    clock = float(twin_facts["clock_mhz"])
    cpi = model["ms_per_instruction"] * clock * 1e3
    half = list(range(0, len(suite), 2))
    today = datetime.date.today().isoformat()
    board_cpu = (board_info or {}).get("cpu_model")
    errors = model["in_sample"]
    record = {
        "schema_version": SCHEMA_VERSION, "profile": profile.name, "board": device.name, "board_cpu": board_cpu,
        "date": today, "calibrated": True, "cpi": round(cpi, 6), "clock_mhz": clock,
        "intercept_ms": round(model["intercept_ms"], 6), "ms_per_instruction": model["ms_per_instruction"],
        "with_intercept": model["with_intercept"], **twin_facts,
        "source": f"fitted {today} to board {device.name}" + (f" ({board_cpu})" if board_cpu else "")
                  + f" over {len(suite)} suite items, one thread: cpi {cpi:.3f} at {clock:g} MHz"
                  + (f" + {model['intercept_ms'] * 1e3:.1f} us" if model["with_intercept"] else "")
                  + f", median |error| {errors['median_abs_error']:.0%}",
        "fit": model, "held_out_half": held_out(counts, [b["ms"] for b in board], half),
        "items": [{"name": s["name"], "kind": s["kind"], "instructions": c, "board_ms": b["ms"],
                   "board_rounds": b["rounds"], "predicted_ms": predict(model, c),
                   "error": (predict(model, c) - b["ms"]) / b["ms"]}
                  for s, c, b in zip(suite, counts, board)],
    }
    if store:
        record["path"] = str(save_calibration(record))
    return record
