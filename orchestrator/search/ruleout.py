"""Ruling out what keeps failing: a technique, or one parameter value of it, that the search stops proposing.

A *family* is every configuration that uses a technique ("int8-static": alone or in a
pipeline with others), or that uses it with one of its searched parameters at one value
("int8-static(calibration=entropy)"). Every finished trial counts in each family it belongs to.
A family is ruled out once RULE_OUT_AFTER of its members were rejected for quality (their
accuracy drop over the profile's limit), or RULE_OUT_AFTER of them failed to build with the
same cause (the error's first line, digits aside), while none of its members was feasible
(measured within every limit): a family with a feasible member is never ruled out. A technique
that raised `NotApplicable` (the model has nothing it can work on, whatever its parameters:
orchestrator/api.py) is ruled out at that first failure. A failed
measurement does not count (a device's fault, not the family's), nor does a candidate over a
device limit (a smaller variant of it may fit).

From then on the searcher runs none of its configurations: a proposal in it is told to
Optuna as its last bad member's outcome without running (searcher.py), the refinement skips
it (refine.py), and the run says so, on the terminal (the `family_ruled_out` event) and in
results.json (`ruled_out`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

#: How many quality rejections, or build failures with the same cause, rule a family out (none feasible).
RULE_OUT_AFTER = 3

#: A build failure's first line where a technique raised NotApplicable: "...: drop-layers: NotApplicable: ...".
NOT_APPLICABLE = re.compile(r"(?:^|: )([A-Za-z0-9_.-]+): NotApplicable: ")

Key = tuple[str, str | None, str | None]  # (technique, parameter or None, json of its value or None)


@dataclass
class Outcome:
    """What one finished trial says about its families."""

    kind: str  # "feasible", "rejected" (quality), "failed" (built or scored no candidate), "other"
    accuracy: float | None = None  # a rejected candidate's quality
    error: str | None = None  # a failure's first line
    inapplicable: str | None = None  # the technique that raised NotApplicable


def outcome(record: dict[str, Any] | None, feasible: bool) -> Outcome:
    """The outcome of a trial from its record (None: the trial crashed) and whether it was feasible."""
    if record is None:
        return Outcome("failed", error="the trial crashed (see the Ray logs)")
    if feasible:
        return Outcome("feasible")
    error = str(record.get("error") or "").splitlines()[0] if record.get("error") else ""
    if record.get("status") == "rejected":
        return Outcome("rejected", accuracy=(record.get("metrics") or {}).get("accuracy"))
    if record.get("status") == "failed" and not error.startswith("measurement failed"):
        found = NOT_APPLICABLE.search(error)
        return Outcome("failed", error=error or "failed", inapplicable=found.group(1) if found else None)
    return Outcome("other")


def cause(error: str) -> str:
    """Failures with the same cause: the same first line once numbers are set aside."""
    return re.sub(r"\d+(\.\d+)?", "#", error)[:200]


@dataclass
class Family:
    key: Key
    finished: int = 0
    feasible: int = 0
    rejected: list[float | None] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=dict)  # cause -> the errors
    told: Any = None  # what to tell the sampler of a proposal in it (its last bad member's values)


class RuleOut:
    """Counts each family's outcomes and says which families are ruled out.

    `labels` maps a pipeline label to its techniques (searcher.make_searcher), `space` holds
    every configuration as the sampler names them (searcher.point_config); a parameter is a
    family of its own only where the space has several values of it. `quality` names the
    accuracy figure in messages (cosine, top1, ... for a model brought with --model).
    `notify` is called with each family's entry (see `ruled_out`) when it is ruled out.
    """

    def __init__(self, labels: dict[str, list[str]], space: list[dict[str, Any]], quality: str = "accuracy",
                 after: int = RULE_OUT_AFTER, notify: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.labels = labels
        self.quality = "accuracy" if quality in ("accuracy", "labels") else quality
        self.after = after
        self.notify = notify
        values: dict[str, set[str]] = {}
        for config in space:
            for name, value in config.items():
                if name != "pipeline":
                    values.setdefault(name, set()).add(json.dumps(value, sort_keys=True))
        self.varying = {name for name, seen in values.items() if len(seen) > 1}
        self.families: dict[Key, Family] = {}
        self.out: dict[Key, dict[str, Any]] = {}  # ruled out, in order
        self.trials = 0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the searcher (its tuner.pkl, checkpoints): the event sink stays behind
        return {**self.__dict__, "notify": None}

    def keys(self, config: dict[str, Any]) -> list[Key]:
        """The families of a configuration: its techniques first, then their searched parameter values."""
        techniques = self.labels.get(config.get("pipeline"), [])
        keys: list[Key] = [(t, None, None) for t in techniques]
        for name, value in config.items():
            technique, _, param = name.partition(".")
            if name in self.varying and technique in techniques:
                keys.append((technique, param, json.dumps(value, sort_keys=True)))
        return keys

    def finished(self, config: dict[str, Any], result: Outcome, told: Any = None) -> list[dict[str, Any]]:
        """Count a finished trial; returns the entries of the families it rules out now."""
        self.trials += 1
        now = []
        for key in self.keys(config):
            family = self.families.setdefault(key, Family(key))
            family.finished += 1
            if result.kind == "feasible":
                family.feasible += 1
            elif result.kind == "rejected":
                family.rejected.append(result.accuracy)
                family.told = told
            elif result.kind == "failed":
                family.failures.setdefault(cause(result.error or ""), []).append(result.error or "")
                family.told = told
            if key in self.out or family.feasible or (key[1] is not None and (key[0], None, None) in self.out):
                continue  # a parameter value's family is not announced once its whole technique is out
            entry = self._verdict(family, result)
            if entry is not None:
                self.out[key] = entry
                now.append(entry)
                if self.notify is not None:
                    self.notify(dict(entry))  # the listener's own copy
        return now

    def _verdict(self, family: Family, result: Outcome) -> dict[str, Any] | None:
        technique, param, value = family.key
        name = technique if param is None else f"{technique}({param}={json.loads(value)})"
        entry: dict[str, Any] = {"family": name, "technique": technique,
                                 "params": {} if param is None else {param: json.loads(value)},
                                 "finished": family.finished, "after_trials": self.trials, "declined": 0}
        if len(family.rejected) >= self.after:
            scores = [a for a in family.rejected if a is not None]
            span = ""
            if scores:
                low, high = min(scores), max(scores)
                span = f" ({self.quality} {low:.4f}" + (f"–{high:.4f})" if f"{high:.4f}" != f"{low:.4f}" else ")")
            entry.update(reason="quality", rejected=len(family.rejected),
                         quality={"metric": self.quality, "min": min(scores, default=None),
                                  "max": max(scores, default=None)},
                         message=f"{name} ruled out: rejected for quality in {len(family.rejected)} of "
                                 f"{family.finished}{span}")
            return entry
        if result.inapplicable == technique and param is None:
            entry.update(reason="not applicable", failed=1, cause=result.error,
                         message=f"{name} ruled out: it does not apply to this model ({result.error[:200]})")
            return entry
        errors = max(family.failures.values(), key=len, default=[])
        if len(errors) >= self.after:
            entry.update(reason="failure", failed=len(errors), cause=errors[0],
                         message=f"{name} ruled out: failed in {len(errors)} of {family.finished} with the same "
                                 f"cause ({errors[0][:160]})")
            return entry
        return None

    def covers(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The entry of the ruled-out family a configuration is in, or None."""
        return next((self.out[k] for k in self.keys(config) if k in self.out), None)

    def decline(self, config: dict[str, Any]) -> Any:
        """A proposal in a ruled-out family, not run: counted in that family's entry; returns what to tell the sampler."""
        key = next(k for k in self.keys(config) if k in self.out)
        self.out[key]["declined"] += 1
        return self.families[key].told

    @property
    def ruled_out(self) -> list[dict[str, Any]]:
        """results.json's `ruled_out`: each family ruled out, in order, with its counts, reason and message."""
        return list(self.out.values())
