"""The typed record of one candidate: what was built (its pipeline), how it went, what was measured.

A trial builds a `CandidateRecord`; it travels between processes (Ray Tune results, the run
store, the plugins' `candidate_measured` hook, results.json) as `to_json()`, the plain dict
documented in docs/results.md, and is read back with `from_json`. `from_json(d).to_json() == d`
for every record this project writes; keys it does not know are kept as they are.

The selection does not change a record: it returns a `Verdict` per candidate (feasible, the
constraints it broke, whether it is on the Pareto front) and `with_verdict` gives the annotated
copy whose JSON has "feasible", "violations" and "on_front", as results.json always had.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from orchestrator.metrics import metric

STATUSES = ("ok", "failed", "rejected", "skipped")


@dataclass(frozen=True)
class Step:
    """One technique applied with its parameters."""

    technique: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"technique": self.technique, "params": dict(self.params)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Step:
        return cls(str(data["technique"]), dict(data.get("params") or {}))


@dataclass(frozen=True)
class Pipeline:
    """The techniques of a candidate, in order; no steps is the baseline (the model exported unchanged)."""

    steps: tuple[Step, ...] = ()

    @property
    def is_baseline(self) -> bool:
        return not self.steps

    @property
    def label(self) -> str:
        """'baseline', or the technique names joined by '+'."""
        return "+".join(s.technique for s in self.steps) if self.steps else "baseline"

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.steps]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]] | None) -> Pipeline:
        return cls(tuple(Step.from_json(s) for s in data or []))


@dataclass(frozen=True)
class Metrics:
    """What was scored (accuracy, size) and measured on the device (latency, memory, energy).

    accuracy is the task's quality (accuracy, or agreement with the fp32 model: results name the
    metric); accuracy_drop is in points against the baseline and is filled by the selection.
    latency_ms holds p50/p90/p99/mean/std/cv in ms. energy_source says whether energy was
    measured or estimated ("unavailable" when neither).
    """

    accuracy: float | None = None
    size_bytes: int | None = None
    compressed_size_bytes: int | None = None
    latency_ms: dict[str, float] | None = None
    peak_memory_mb: float | None = None
    model_memory_mb: float | None = None
    energy_mj: float | None = None
    energy_source: str | None = None
    accuracy_drop: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    def value(self, name: str) -> float | None:
        """Metric `name` as a float, or None when not measured, read as the table of metrics says
        (orchestrator/metrics.py; "latency_p50" etc. read latency_ms, a metric this version has no
        field for is read from `extra`).

        Raises ValueError for a name that is not a metric.
        """
        return metric(name).value(self.to_json())

    def to_json(self) -> dict[str, Any]:
        """Scored and measured groups together, as a trial writes them; absent groups are left out."""
        out: dict[str, Any] = {}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        if self.size_bytes is not None:
            out.update(size_bytes=self.size_bytes, compressed_size_bytes=self.compressed_size_bytes)
        if self.latency_ms is not None:
            out.update(latency_ms=dict(self.latency_ms), peak_memory_mb=self.peak_memory_mb,
                       model_memory_mb=self.model_memory_mb, energy_mj=self.energy_mj,
                       energy_source=self.energy_source)
        if self.accuracy_drop is not None:
            out["accuracy_drop"] = self.accuracy_drop
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Metrics:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: data.pop(k) for k in list(data) if k in known}, extra=data)


@dataclass(frozen=True)
class Verdict:
    """What the selection said about one candidate against a profile."""

    feasible: bool
    violations: tuple[dict[str, Any], ...] = ()
    on_front: bool | None = None  # None: no front was computed (nothing feasible)


# the record's own keys, in the order results.json has always had them
_CORE = ("id", "pipeline", "status", "error", "metrics", "device")
_VERDICT = ("violations", "feasible", "on_front")


@dataclass(frozen=True)
class CandidateRecord:
    """One candidate of a run: id, pipeline, status ("ok" | "failed" | "rejected" | "skipped"), metrics.

    error says why a candidate is not ok; device names where it was measured; model_sha256 finds
    its model in the cache; measurement is the agent's protocol (runs, threads, inputs, emulation);
    details holds the rest of what the trial recorded (timing, build seconds, cache hits, flags).
    """

    id: str
    pipeline: Pipeline = Pipeline()
    status: str = "ok"
    error: str | None = None
    metrics: Metrics = Metrics()
    device: str | None = None
    model_sha256: str | None = None
    measurement: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    verdict: Verdict | None = None

    @property
    def is_baseline(self) -> bool:
        return self.pipeline.is_baseline

    @property
    def label(self) -> str:
        return self.pipeline.label

    def value(self, name: str) -> float | None:
        return self.metrics.value(name)

    def with_verdict(self, verdict: Verdict, accuracy_drop: float | None = None) -> CandidateRecord:
        """A copy annotated by the selection (this record is left as it was)."""
        metrics = dataclasses.replace(self.metrics, accuracy_drop=accuracy_drop) \
            if accuracy_drop is not None else self.metrics
        return dataclasses.replace(self, metrics=metrics, verdict=verdict)

    def to_json(self) -> dict[str, Any]:
        """The candidate as results.json, the run store and the plugins' hooks have it."""
        out: dict[str, Any] = {"id": self.id, "pipeline": self.pipeline.to_json(), "status": self.status,
                               "error": self.error, "metrics": self.metrics.to_json(), "device": self.device}
        if self.model_sha256 is not None:
            out["model_sha256"] = self.model_sha256
        out.update(self.details)
        if self.measurement is not None:
            out["measurement"] = self.measurement
        if self.verdict is not None:
            out["violations"] = list(self.verdict.violations)
            out["feasible"] = self.verdict.feasible
            if self.verdict.on_front is not None:
                out["on_front"] = self.verdict.on_front
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CandidateRecord:
        """Read a candidate dict (a trial's, the store's, results.json's); the dict is not kept or changed."""
        verdict = None
        if "feasible" in data:
            verdict = Verdict(bool(data["feasible"]), tuple(data.get("violations") or ()), data.get("on_front"))
        details = {k: v for k, v in data.items() if k not in (*_CORE, *_VERDICT, "model_sha256", "measurement")}
        return cls(id=str(data.get("id", "")), pipeline=Pipeline.from_json(data.get("pipeline")),
                   status=str(data.get("status", "ok")), error=data.get("error"),
                   metrics=Metrics.from_json(data.get("metrics")), device=data.get("device"),
                   model_sha256=data.get("model_sha256"), measurement=data.get("measurement"),
                   details=details, verdict=verdict)


def as_record(candidate: CandidateRecord | dict[str, Any]) -> CandidateRecord:
    """`candidate` as a record: results.json readers pass dicts, the run passes records."""
    return candidate if isinstance(candidate, CandidateRecord) else CandidateRecord.from_json(candidate)
