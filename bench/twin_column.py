"""The twin column of bench/emulation_fidelity.py (issue 30 item 3): this machine's instruction-counted twin
against native measurement of the same candidates, on this machine.

- native: every candidate in the same interleaved rounds (the agent's `compare`, the final round's
  protocol, one thread, pinned), `native_reps` times with the candidates in a shuffled order; a
  candidate's figure is the median over all rounds of the round's p50; the noise floor is the tau
  between two such repetitions;
- twin: the instructions of one inference counted under qemu-x86_64 with this host's onnxruntime
  (orchestrator/emulation/twin.py), one thread;
- calibration, two ways, both predicting candidates the fit did not see:
  `suite`: the cost model fitted on the calibration suite (orchestrator/emulation/calibration_suite.py,
  measured here the same way), as `orchestrate devices calibrate` would store it;
  `leave_one_out`: fitted on the other candidates, each in turn;
- agreement: Kendall tau of twin counts vs native (a cost model's line does not change the ranking),
  and the share of candidates whose calibrated twin latency is within +-10% of native.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def twin_column(candidates: list[dict[str, Any]], kendall: Callable[..., dict[str, float]], pin: int,
                native_reps: int, rounds: int, jobs: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Measure natively (interleaved), count on the twin, calibrate, compare; the JSON block."""
    from orchestrator.config.profile import load_profile
    from orchestrator.devices.local import LocalTransport, local_device
    from orchestrator.emulation import calibrate, twin

    cpu = twin.host_cpu()
    profile = calibrate.measurement_profile(load_profile(ROOT / "device_profiles" / "x86-host.yaml").profile, rounds,
                                            budget_s=max(20.0, 2.0 * len(candidates)))
    device = local_device()
    device.pinned_cpu = pin
    native = LocalTransport(device)
    names = [c["name"] for c in candidates]
    reps: list[list[float]] = []
    rng = random.Random(0)
    for rep in range(native_reps):
        order = list(range(len(candidates)))
        rng.shuffle(order)
        measured = calibrate.measure_board(native, [candidates[i]["bytes"] for i in order], profile)
        ms = [0.0] * len(candidates)
        for i, m in zip(order, measured):
            ms[i] = m["ms"]
        reps.append(ms)
        log(f"twin column: native rep {rep + 1}/{native_reps}: " +
            ", ".join(f"{n} {v:.3f}" for n, v in zip(names, ms)))
    native_ms = [statistics.median(r[i] for r in reps) for i in range(len(candidates))]
    counts = [r["instructions"]["median"] for r in
              twin.count_models([c["bytes"] for c in candidates], profile, jobs=jobs, log=log)]
    log("twin column: the calibration suite, native and twin")
    suite = calibrate.calibrate(native, device, profile, {"cpu_model": cpu["model"]}, jobs=jobs, rounds=rounds,
                                log=log, store=False)
    by_suite = [calibrate.predict(suite["fit"], n) for n in counts]
    loo = []
    for i in range(len(candidates)):
        rest = [j for j in range(len(candidates)) if j != i]
        loo.append(calibrate.predict(calibrate.fit([counts[j] for j in rest], [native_ms[j] for j in rest]),
                                     counts[i]))
    rows = []
    for i, name in enumerate(names):
        rows.append({"name": name, "native_ms": native_ms[i], "native_reps_ms": [r[i] for r in reps],
                     "instructions": counts[i], "twin_ms_suite_calibrated": by_suite[i],
                     "error_suite_calibrated": (by_suite[i] - native_ms[i]) / native_ms[i],
                     "twin_ms_loo_calibrated": loo[i], "error_loo_calibrated": (loo[i] - native_ms[i]) / native_ms[i]})
    floor = [kendall(reps[a], reps[b])["tau"] for a in range(native_reps) for b in range(a + 1, native_reps)]
    return {
        "cpu": cpu, "twin": twin.twin_description(), "isa_note": twin.isa_note(),
        "native_protocol": {"reps": native_reps, "rounds_per_rep": rounds, "threads": 1, "pinned_cpu": pin,
                            "statistic": "median over reps of the median over rounds of each round's p50",
                            "command": "agent compare (the final round's interleaved rounds)"},
        "candidates": rows,
        "kendall_twin_vs_native": kendall(counts, native_ms),
        "noise_floor_tau_native_rep_vs_rep": floor,
        "within_10pct_suite_calibrated": calibrate.error_summary([r["error_suite_calibrated"] for r in rows]),
        "within_10pct_loo_calibrated": calibrate.error_summary([r["error_loo_calibrated"] for r in rows]),
        "suite_calibration": {k: suite[k] for k in ("cpi", "clock_mhz", "intercept_ms", "with_intercept", "fit",
                                                    "held_out_half", "items", "source")},
    }


def print_twin(block: dict[str, Any]) -> None:
    """The twin's table and its agreement lines."""
    print(f"twin on {block['cpu']['model']} ({block['twin']}); {block['isa_note']}")
    print(f"{'candidate':<32} {'native p50':>11} {'instructions':>13} {'twin (suite)':>13} {'err':>6} "
          f"{'twin (loo)':>11} {'err':>6}")
    for r in sorted(block["candidates"], key=lambda r: r["native_ms"]):
        print(f"{r['name']:<32} {r['native_ms']:9.3f}ms {r['instructions']:13,.0f} {r['twin_ms_suite_calibrated']:11.3f}ms "
              f"{r['error_suite_calibrated']:+6.0%} {r['twin_ms_loo_calibrated']:9.3f}ms {r['error_loo_calibrated']:+6.0%}")
    k, s, o = block["kendall_twin_vs_native"], block["within_10pct_suite_calibrated"], block["within_10pct_loo_calibrated"]
    print(f"twin vs native: Kendall tau {k['tau']:.3f} (p = {k['p_value']:.2g}); native rep-vs-rep floor "
          f"{block['noise_floor_tau_native_rep_vs_rep']}; within +-10%: {s['within_10pct']:.0%} calibrated on the suite "
          f"(median |error| {s['median_abs_error']:.0%}), {o['within_10pct']:.0%} leave-one-out over the candidates "
          f"(median |error| {o['median_abs_error']:.0%})")
