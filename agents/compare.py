"""``compare``: several models measured together, in interleaved rounds (the host's final round).

One process loads every model, warms each up, then runs rounds: in round r the models run in
the order rotated by r (A B C, then B C A, ...), each a short block of timed runs. Per model
and round it reports the block's p50/p90/p99, so the host can compare medians over rounds with
a paired bootstrap: models measured minutes apart, or by two processes, are not comparable on a
shared machine; models measured in the same rounds are. Runs on the device: see agents/kernel.py.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np

from agents.benchmark import exit_when_stdin_closes, pin_cpu, requested_providers
from agents.kernel import (
    AgentError,
    ExitCode,
    bounded,
    create_session,
    file_sha256,
    make_inputs,
    one_line,
    parse_axes,
    require_ort,
)

MIN_ROUNDS = 3
MIN_BLOCK_RUNS = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `compare` command's flags."""
    c = sub.add_parser("compare", help="measure several models together, in interleaved rounds")
    c.add_argument("--model", action="append", required=True, help="an .onnx file (repeat: 2 or more)")
    c.add_argument("--rounds", type=bounded(int, 1), default=15, help="interleaved rounds (default 15)")
    c.add_argument("--block-runs", type=bounded(int, 1), default=30,
                   help="timed runs per model and round (default 30)")
    c.add_argument("--warmup", type=bounded(int, 0), default=20, help="warm-up runs per model (default 20)")
    c.add_argument("--time-budget", type=bounded(float, 0, strict=True), default=20.0,
                   help="stop after this many seconds of rounds, after at least %d rounds (default 20)" % MIN_ROUNDS)
    c.add_argument("--threads", type=bounded(int, 0), default=1, help="intra-op threads, 0 = all (default 1)")
    c.add_argument("--inter-op-threads", type=bounded(int, 0), default=1, help="inter-op threads (default 1)")
    c.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated execution providers")
    c.add_argument("--batch", type=bounded(int, 1), default=1, help="size of symbolic batch dimensions")
    c.add_argument("--pin-cpu", type=bounded(int, 0), default=None, help="pin the process to this CPU")
    c.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    c.add_argument("--axes", type=parse_axes, default={}, metavar="NAME=SIZE,...",
                   help="sizes of named dynamic axes (e.g. sequence=128); others are timed at 1")
    c.add_argument("--exit-on-stdin-eof", action="store_true",
                   help="stop at once when stdin closes (the host's SSH connection is gone)")


def _block(run, runs: int, budget_s: float) -> list[float]:
    """Up to `runs` timed runs (ms), stopping after `budget_s` once MIN_BLOCK_RUNS are in."""
    out = []
    start = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        out.append((time.perf_counter() - t0) * 1000.0)
        if len(out) >= MIN_BLOCK_RUNS and time.perf_counter() - start > budget_s:
            break
    return out


def cmd_compare(args: argparse.Namespace) -> dict:
    """Interleaved rounds over several models; per model and round the block's latency percentiles."""
    require_ort()
    if args.exit_on_stdin_eof:
        exit_when_stdin_closes()
    if len(args.model) < 2:
        raise AgentError("compare needs at least 2 models (--model A --model B)", ExitCode.USAGE)
    for path in args.model:
        if not os.path.isfile(path):
            raise AgentError("model file not found: %s" % path, ExitCode.MODEL_NOT_FOUND)
    warnings: list = []
    requested = requested_providers(args)
    saved_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        pinned = pin_cpu(args.pin_cpu, warnings)
        runners = []
        for path in args.model:
            session = create_session(path, args.threads, args.inter_op_threads, requested, warnings)
            feeds = make_inputs(session, args.batch, args.seed, warnings, args.axes)
            runners.append((session, (lambda s=session, f=feeds: s.run(None, f))))
        try:
            for _, run in runners:
                for _ in range(args.warmup):
                    run()
            count = len(runners)
            # a block may take its share of the budget, so the rounds fit it
            block_budget = args.time_budget / (max(args.rounds, MIN_ROUNDS) * count)
            rounds: list = [[] for _ in runners]
            started, done = time.perf_counter(), 0
            gc.disable()  # a collection inside one model's block would be charged to that model
            try:
                for r in range(args.rounds):
                    for k in range(count):
                        i = (k + r) % count
                        rounds[i].append(_block(runners[i][1], args.block_runs, block_budget))
                    done += 1
                    if done >= MIN_ROUNDS and time.perf_counter() - started > args.time_budget:
                        break
            finally:
                gc.enable()
        except Exception as exc:  # noqa: BLE001
            raise AgentError("inference failed: %s" % one_line(exc))
    finally:
        if saved_affinity is not None and args.pin_cpu is not None:
            try:
                os.sched_setaffinity(0, saved_affinity)
            except OSError:
                pass
    models = []
    for path, blocks, (session, _) in zip(args.model, rounds, runners):
        models.append({
            "path": path, "sha256": file_sha256(path), "size_bytes": os.path.getsize(path),
            "rounds_ms": {p: [float(np.percentile(b, q)) for b in blocks] for p, q in (("p50", 50), ("p90", 90),
                                                                                      ("p99", 99))},
            "runs_per_round": [len(b) for b in blocks],
            "execution_provider": session.get_providers()[0],
        })
    return {
        "models": models,
        "rounds": done,
        "order": "rotating",
        "block_runs": args.block_runs,
        "warmup_runs": args.warmup,
        "threads": {"intra_op": args.threads, "inter_op": args.inter_op_threads},
        "pinned_cpu": pinned,
        "niceness": os.nice(0),
        "seconds": round(time.perf_counter() - started, 3),
        "warnings": warnings,
    }
