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
- The fastest contender within the profile leads (a baseline over the profile's limits is
  measured as a reference only, and the sentence says so). A contender whose interval of "how
  much slower than the leader" reaches down to `objective.tie_within` (or below) ties with it:
  its disadvantage is inside the noise. Among the tied, `objective.tie_break` decides: by default
  the smaller wins (by 1% or more), then the more accurate (by 0.1 quality points or more), then
  the faster. Size comes first because the profile's accuracy budget already says how much quality
  the user trades, and on a brought model fp32 is by definition "the most accurate": accuracy
  first would hand every tie to the unchanged model.
- For an objective other than latency the rounds are information only (speed-ups shown);
  the pick stays the selection's, decided on deterministic metrics.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from orchestrator.metrics import metric as metric_row
from orchestrator.search.record import CandidateRecord, as_record
from orchestrator.search.selection import DEFAULT_TIE_BREAK, Candidate, Selection, smallest_size, tie_break_key

CONFIDENCE = 0.95
RESAMPLES = 2000


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
           decides: bool = True, seed: int = 0, tie_break: Any = None,
           outside: dict[str, str] | None = None) -> dict[str, Any]:
    """The decision block of results.json from the rounds' latencies (ms per contender id, one per round).

    `contenders` are candidate records (id, metrics with accuracy and size_bytes, pipeline);
    the baseline is among them. `tie_break` is the profile's order of tie rules (default: size,
    then accuracy). `outside` names contenders measured only as a reference, with the reason (a
    baseline over the profile's limits): they can neither lead nor be picked. With `decides` False
    (an objective other than latency) the pick is not chosen here: the block reports the rounds and
    the leader only.
    """
    by_id = {c.id: c for c in map(as_record, contenders)}
    outside = dict(outside or {})
    order_rules = list(tie_break or DEFAULT_TIE_BREAK)
    ids = [i for i in by_id if len(rounds.get(i, [])) > 0]
    n = min(len(rounds[i]) for i in ids)
    arrays = {i: np.asarray(rounds[i][:n], dtype=float) for i in ids}
    idx = np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))
    medians = {i: float(np.median(arrays[i])) for i in ids}
    order = sorted(ids, key=lambda i: medians[i])
    eligible = [i for i in order if i not in outside] or order
    leader = eligible[0]
    tied = [leader]
    per: dict[str, dict[str, Any]] = {}
    for i in ids:
        point, low, high = ratio_interval(arrays[leader], arrays[i], idx) if i != leader else (1.0, 1.0, 1.0)
        cv = float(np.std(arrays[i]) / np.mean(arrays[i])) if np.mean(arrays[i]) > 0 else 0.0
        per[i] = {"median_ms": round(medians[i], 6), "cv": round(cv, 4),  # round to round: how quiet the device was
                  "rounds_ms": [round(x, 6) for x in arrays[i].tolist()],
                  "vs_leader": {"ratio": round(point, 4), "low": round(low, 4), "high": round(high, 4)},
                  **({"outside_profile": outside[i]} if i in outside else {})}
        if i != leader and i in eligible and low <= 1.0 + tie_within:
            tied.append(i)

    smallest = smallest_size([by_id[i] for i in tied])

    def key(i: str) -> tuple[float, ...]:
        return (*tie_break_key(by_id[i], order_rules, smallest), medians[i])

    pick = min(tied, key=key) if decides else None
    shown = pick or leader
    block: dict[str, Any] = {
        "decided_by": "final round" if decides else "search measurements (objective is not latency)",
        "rule": rule_text(order_rules) if decides else "the selection's rule; the rounds are shown for information",
        "tie_within": tie_within,
        "tie_break": order_rules,
        "confidence": CONFIDENCE,
        "rounds": n,
        "finalists": [{"id": i, "pipeline": by_id[i].label, **per[i]} for i in order],
        "leader": leader,
        "tied_with_leader": [i for i in tied if i != leader],
        "pick": pick,
    }
    if outside:
        block["outside_profile"] = outside
    if pick and pick != leader:  # what broke the tie: the first rule on which the pick beats the leader
        mine, theirs = key(pick), key(leader)
        rule = next((r for r, a, b in zip(order_rules, mine, theirs) if a != b), None)
        block["tie_broken_by"] = rule
        block["tie"] = _tie_facts(by_id[pick], by_id[leader], per[pick]["vs_leader"])
    if shown != baseline_id and baseline_id in arrays:
        block["vs_baseline"] = _compare(shown, baseline_id, arrays, idx)
    others = [i for i in order if i not in (shown, baseline_id, leader if pick != leader else None)]
    if others:
        block["vs_runner_up"] = _compare(shown, others[0], arrays, idx)
    block["sentence"] = sentence(block, baseline_id)
    return block


def rule_text(order: list[str]) -> str:
    """The final round's rule in words, with the profile's tie-break order."""
    words = {"size": "the smaller (by 1% or more)", "accuracy": "the more accurate (by 0.1 points or more)"}
    return ("fastest median over interleaved rounds among the candidates within the profile; a contender whose "
            "95% interval of (its latency / the leader's) reaches 1 + tie_within or below ties; ties go to "
            + ", then ".join(words[r] for r in order) + ", then the faster")


def _tie_facts(pick: CandidateRecord, leader: CandidateRecord, vs_leader: dict[str, float]) -> dict[str, Any]:
    """What the sentence says of a broken tie: the pick's latency against the leader's, its size and accuracy."""
    facts: dict[str, Any] = {"with": leader.id, "latency_ratio": vs_leader}
    ps, ls = pick.value("size_bytes"), leader.value("size_bytes")
    if ps and ls:
        facts["size_ratio"] = round(ls / ps, 4)  # how many times smaller the pick is (below 1: larger)
    pa, la = pick.value("accuracy"), leader.value("accuracy")
    if pa is not None and la is not None:
        facts["accuracy_points"] = round(100 * (pa - la), 4)  # the pick's quality minus the leader's
    return facts


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
    """One line for the terminal and the report: who won the final round, by how much, how sure, which rule."""
    who = block["pick"] or block["leader"]
    pct = int(round(block["confidence"] * 100))
    tie = block.get("tie")
    tied_with_baseline = bool(tie) and block["pick"] != block["leader"] == baseline_id
    if who == baseline_id:
        text = f"{who} (the baseline) was not measurably beaten in {block['rounds']} interleaved rounds"
    elif tied_with_baseline:  # the baseline led, within the noise: the tie rule picked the candidate
        lr = tie["latency_ratio"]
        text = (f"{who} ties on latency with the baseline {baseline_id} within the noise ({lr['ratio']:.2f}x its "
                f"time, {lr['low']:.2f}–{lr['high']:.2f}, {pct}%) and {_tie_reason(block)}")
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
    if block["pick"] and block["pick"] != block["leader"] and tie and not tied_with_baseline:
        lr = tie["latency_ratio"]
        text += (f"; it ties on latency with the fastest, {block['leader']}, within the noise "
                 f"({lr['ratio']:.2f}x its time, {lr['low']:.2f}–{lr['high']:.2f}), and {_tie_reason(block)}")
    if block.get("outside_profile", {}).get(baseline_id):
        text += f"; the baseline is outside the profile ({block['outside_profile'][baseline_id]}), a reference only"
    text += f" ({block['rounds']} interleaved rounds)"
    return text


def _tie_reason(block: dict[str, Any]) -> str:
    """'is 3.94x smaller (0.84 points less accurate; rule: size first)', or when an earlier rule tied
    'is 0.28 points more accurate (as small; rule: size, then accuracy)'."""
    tie, rule = block["tie"], block.get("tie_broken_by")
    size, points = tie.get("size_ratio"), tie.get("accuracy_points")
    size_text = (f"{size:.2f}x smaller" if size and size >= 1.005 else
                 "as small" if size and size > 0.995 else f"{1 / size:.2f}x larger" if size else "size unknown")
    acc_text = ("quality unknown" if points is None else f"{points:.2f} points more accurate" if points >= 0.005
                else f"{-points:.2f} points less accurate" if points <= -0.005 else "as accurate")
    order = list(block.get("tie_break") or DEFAULT_TIE_BREAK)
    used = order[:order.index(rule) + 1] if rule in order else [rule or "objective"]
    why = f"{used[0]} first" if len(used) == 1 else ", then ".join(used)
    if rule == "accuracy":
        return f"is {acc_text} ({size_text}; rule: {why})"
    return f"is {size_text} ({acc_text}; rule: {why})"


def objective_percentile(profile: Any) -> str:
    """The latency percentile the decision compares: the objective's, else the constraints' (e.g. "p90")."""
    return metric_row(profile.objective.metric).percentile or profile.constraints.latency_percentile


def run_final_round(selection: Selection | Exception, profile: Any, lease: Any, models_dir: Path,
                    announce: Callable[[list[str], int], None] | None = None,
                    sample: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Measure the finalists and the baseline afresh on `lease` (a DeviceLease actor) and decide; None if nothing to decide.

    `selection` is the run's one selection (`select`, run once): the finalists are its best
    feasible candidates, and the run's pick is then taken from the same selection. Where there is
    none (select's error: no baseline, nothing feasible) there is nothing to decide.
    A failure of the final round is not the run's failure: the block then says so and the pick
    stays the selection's, on the search's measurements.
    """
    import ray

    if not isinstance(selection, Selection):
        return None
    metric = profile.objective.metric
    finalists = choose_finalists(selection.feasible, selection.baseline, metric,
                                 profile.objective.goal == "maximize", profile.measurement.finalists)
    if len(finalists) < 2:
        return None
    if announce is not None:
        announce([c.id for c in finalists], profile.measurement.final_rounds)
    from orchestrator.models.modelfacts import with_sample

    # timed on the run's real sample, as in the search (`sample`: one held-out input, or None)
    models = [with_sample((models_dir / f"{c.model_sha256}.onnx").read_bytes(), sample) for c in finalists]
    started = time.perf_counter()
    result = ray.get(lease.compare.remote(models))
    if "error" in result:
        return {"decided_by": "search measurements (the final round failed)", "error": result["error"],
                "device": result.get("device"), "pick": None}
    pct = objective_percentile(profile)
    rounds = {c.id: m["rounds_ms"][pct] for c, m in zip(finalists, result["models"])}
    base = selection.baseline
    outside = {} if base.verdict is None or base.verdict.feasible else {
        base.id: "; ".join(v["message"] for v in base.verdict.violations) or "infeasible"}
    block = decide(finalists, rounds, base.id, profile.objective.tie_within,
                   decides=metric_row(metric).percentile is not None, tie_break=profile.objective.tie_break, outside=outside)
    if result.get("order") == "counted":  # instructions counted on the emulated CPU model: deterministic, no rounds
        block["sentence"] += (f" [EMULATED device: latency {result.get('latency_source')}, "
                              f"{'calibrated' if result.get('calibrated') else 'uncalibrated'} cost model; the rounds "
                              "are each model's counted runs, one count per model]")
    elif result.get("emulated"):  # the rounds were timed natively and scaled: say so wherever the sentence goes
        block["sentence"] += f" [EMULATED device: latency {result.get('latency_source')}]"
    block.update(device=result.get("device"), percentile=pct, seconds=round(time.perf_counter() - started, 2),
                 protocol={k: result.get(k) for k in ("block_runs", "warmup_runs", "threads", "pinned_cpu",
                                                      "execution_provider", "order")},
                 **({"emulated": True, "latency_source": result.get("latency_source")} if result.get("emulated") else {}),
                 **({"calibrated": result.get("calibrated")} if "calibrated" in result else {}))
    return block
