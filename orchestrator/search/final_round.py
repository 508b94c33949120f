"""The final round: the pick is decided on fresh, interleaved measurements, with a stated confidence.

During the search each candidate is measured once, at its own time: on a shared machine two
measurements of the same model minutes apart differ by tens of percent, and a cached figure
may come from another day. So after the search the best few feasible candidates on the
objective (`measurement.finalists`, default 3) and the baseline are measured again, together,
on one device, in interleaved rounds (A B C base, then B C base A, ...: the order rotates so
no model always runs first), each round a short block of timed runs per model.

The decision (`decide`):

- Each contender's figure is the median over rounds of its per-round latency percentile (the
  profile's objective percentile). Ratios between two contenders come with a 95% interval
  from a paired bootstrap over rounds (rounds are resampled, so both models of a pair keep
  the conditions they shared).
- The fastest contender leads. A contender whose interval of "how much slower than the
  leader" reaches down to `objective.tie_within` (or below) ties with it: its disadvantage is
  inside the noise. Among the tied, the more accurate wins (by 0.1 quality points or more), then the
  smaller (by 1% or more), then the faster.
- For an objective other than latency the rounds are information only (speed-ups shown);
  the pick stays the selection's, decided on deterministic metrics.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from orchestrator.errors import NoFeasibleCandidate
from orchestrator.search.record import CandidateRecord, as_record
from orchestrator.search.selection import Candidate, select

CONFIDENCE = 0.95
RESAMPLES = 2000
RULE = ("fastest median over interleaved rounds; a contender whose 95% interval of (its latency / the leader's) "
        "reaches 1 + tie_within or below ties; ties go to the more accurate (by 0.1 points or more), then the "
        "smaller (by 1% or more), then the faster")


def choose_finalists(feasible: list[CandidateRecord], baseline: CandidateRecord, metric: str, maximize: bool,
                     count: int) -> list[CandidateRecord]:
    """The `count` best feasible candidates on the objective (search measurements), then the baseline."""
    def key(c: CandidateRecord) -> tuple[Any, ...]:
        value = c.value(metric)
        return (value is None, 0.0 if value is None else (-value if maximize else value), c.id)

    others = [c for c in sorted(feasible, key=key) if not c.is_baseline]
    return [*others[:count], baseline]


def ratio_interval(faster: np.ndarray, slower: np.ndarray, idx: np.ndarray) -> tuple[float, float, float]:
    """(median(slower) / median(faster), low, high): a paired bootstrap over rounds, 95%."""
    point = float(np.median(slower) / np.median(faster))
    boot = np.median(slower[idx], axis=1) / np.median(faster[idx], axis=1)
    low, high = np.percentile(boot, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return point, float(low), float(high)


def decide(contenders: list[Candidate], rounds: dict[str, list[float]], baseline_id: str, tie_within: float,
           decides: bool = True, seed: int = 0) -> dict[str, Any]:
    """The decision block of results.json from the rounds' latencies (ms per contender id, one per round).

    `contenders` are candidate records (id, metrics with accuracy and size_bytes, pipeline);
    the baseline is among them. With `decides` False (an objective other than latency) the
    pick is not chosen here: the block reports the rounds and the leader only.
    """
    by_id = {c.id: c for c in map(as_record, contenders)}
    ids = [i for i in by_id if len(rounds.get(i, [])) > 0]
    n = min(len(rounds[i]) for i in ids)
    arrays = {i: np.asarray(rounds[i][:n], dtype=float) for i in ids}
    idx = np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))
    medians = {i: float(np.median(arrays[i])) for i in ids}
    order = sorted(ids, key=lambda i: medians[i])
    leader = order[0]
    tied = [leader]
    per: dict[str, dict[str, Any]] = {}
    for i in ids:
        point, low, high = ratio_interval(arrays[leader], arrays[i], idx) if i != leader else (1.0, 1.0, 1.0)
        cv = float(np.std(arrays[i]) / np.mean(arrays[i])) if np.mean(arrays[i]) > 0 else 0.0
        per[i] = {"median_ms": round(medians[i], 6), "cv": round(cv, 4),  # round to round: how quiet the device was
                  "rounds_ms": [round(x, 6) for x in arrays[i].tolist()],
                  "vs_leader": {"ratio": round(point, 4), "low": round(low, 4), "high": round(high, 4)}}
        if i != leader and low <= 1.0 + tie_within:
            tied.append(i)

    sizes = [by_id[i].value("size_bytes") for i in tied]
    smallest = min((s for s in sizes if s), default=None)

    def tie_break(i: str) -> tuple[float, float, float]:
        # differences below 0.1 quality points or 1% of size are no better than the latency's noise:
        # they fall through to the next key (a cosine of 0.9941 does not beat 0.9939 and a 10% speed-up)
        acc = by_id[i].value("accuracy")
        size = by_id[i].value("size_bytes")
        return (-(round(acc, 3) if acc is not None else -math.inf),
                round(100 * size / smallest) if size is not None and smallest else math.inf, medians[i])

    pick = min(tied, key=tie_break) if decides else None
    shown = pick or leader
    block: dict[str, Any] = {
        "decided_by": "final round" if decides else "search measurements (objective is not latency)",
        "rule": RULE if decides else "the selection's rule; the rounds are shown for information",
        "tie_within": tie_within,
        "confidence": CONFIDENCE,
        "rounds": n,
        "finalists": [{"id": i, "pipeline": by_id[i].label, **per[i]} for i in order],
        "leader": leader,
        "tied_with_leader": [i for i in tied if i != leader],
        "pick": pick,
    }
    if pick and pick != leader:  # what broke the tie: the rule's first key on which the pick beats the leader
        mine, theirs = tie_break(pick), tie_break(leader)
        block["tie_broken_by"] = "accuracy" if mine[0] != theirs[0] else "size"
    if shown != baseline_id and baseline_id in arrays:
        block["vs_baseline"] = _compare(shown, baseline_id, arrays, idx)
    others = [i for i in order if i not in (shown, baseline_id)]
    if others:
        block["vs_runner_up"] = _compare(shown, others[0], arrays, idx)
    block["sentence"] = sentence(block, baseline_id)
    return block


def _compare(a: str, b: str, arrays: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, Any]:
    point, low, high = ratio_interval(arrays[a], arrays[b], idx)
    return {"other": b, "speedup": round(point, 4), "low": round(low, 4), "high": round(high, 4)}


def _x(cmp: dict[str, Any], pct: int | None = None) -> tuple[str, str]:
    """('1.58x faster than', '1.49–1.66') or, for a slower one, its slowdown and that interval, inverted."""
    s, lo, hi = cmp["speedup"], cmp["low"], cmp["high"]
    if s >= 1:
        return f"{s:.2f}x faster than", f"{lo:.2f}–{hi:.2f}"
    return f"{1 / s:.2f}x slower than", f"{1 / hi:.2f}–{1 / lo:.2f}"


def sentence(block: dict[str, Any], baseline_id: str) -> str:
    """One line for the terminal and the report: who won the final round, by how much, how sure."""
    who = block["pick"] or block["leader"]
    pct = int(round(block["confidence"] * 100))
    if who == baseline_id:
        text = f"{who} (the baseline) was not measurably beaten in {block['rounds']} interleaved rounds"
    else:
        vb = block.get("vs_baseline")
        if vb:
            how, interval = _x(vb)
            text = f"{who} is {how} the baseline {baseline_id} ({interval}, {pct}%)"
        else:
            text = f"{who} is measured without the baseline"
    ru = block.get("vs_runner_up")
    if ru:
        how, interval = _x(ru)
        text += f" and {how} {ru['other']} ({interval})"
    if block["pick"] and block["pick"] != block["leader"]:
        why = {"accuracy": "is more accurate", "size": "is as accurate and smaller"}.get(
            block.get("tie_broken_by"), "is more accurate or smaller")
        text += f"; it ties with the fastest, {block['leader']}, within the noise and {why}"
    text += f" ({block['rounds']} interleaved rounds)"
    return text


def objective_percentile(profile: Any) -> str:
    """The latency percentile the decision compares: the objective's, else the constraints' (e.g. "p90")."""
    metric = profile.objective.metric
    return metric.split("_", 1)[1] if metric.startswith("latency_") else profile.constraints.latency_percentile


def run_final_round(records: list[CandidateRecord], profile: Any, lease: Any, models_dir: Path,
                    announce: Callable[[list[str], int], None] | None = None,
                    sample: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Measure the finalists and the baseline afresh on `lease` (a DeviceLease actor) and decide; None if nothing to decide.

    A failure of the final round is not the run's failure: the block then says so and the pick
    stays the selection's, on the search's measurements.
    """
    import ray


    try:
        selection = select(records, profile)
    except (ValueError, NoFeasibleCandidate):
        return None
    metric = profile.objective.metric
    finalists = choose_finalists(selection.feasible, selection.baseline, metric,
                                 profile.objective.goal == "maximize", profile.measurement.finalists)
    if len(finalists) < 2:
        return None
    if announce is not None:
        announce([c.id for c in finalists], profile.measurement.final_rounds)
    from orchestrator.modelfacts import with_sample

    # timed on the run's real sample, as in the search (`sample`: one held-out input, or None)
    models = [with_sample((models_dir / f"{c.model_sha256}.onnx").read_bytes(), sample) for c in finalists]
    started = time.perf_counter()
    result = ray.get(lease.compare.remote(models))
    if "error" in result:
        return {"decided_by": "search measurements (the final round failed)", "error": result["error"],
                "device": result.get("device"), "pick": None}
    pct = objective_percentile(profile)
    rounds = {c.id: m["rounds_ms"][pct] for c, m in zip(finalists, result["models"])}
    block = decide(finalists, rounds, selection.baseline.id, profile.objective.tie_within,
                   decides=metric.startswith("latency_"))
    if result.get("emulated"):  # the rounds were timed natively and scaled: say so wherever the sentence goes
        block["sentence"] += f" [EMULATED device: latency {result.get('latency_source')}]"
    block.update(device=result.get("device"), percentile=pct, seconds=round(time.perf_counter() - started, 2),
                 protocol={k: result.get(k) for k in ("block_runs", "warmup_runs", "threads", "pinned_cpu",
                                                      "execution_provider", "order")},
                 **({"emulated": True, "latency_source": result.get("latency_source")} if result.get("emulated") else {}))
    return block
