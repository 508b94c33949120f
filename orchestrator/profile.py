"""Device profiles: one YAML file per class of device, validated with pydantic.

A bad profile is reported as one line, `FILE:LINE: field.path: message`, where
LINE is the line of the offending field in the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from orchestrator.errors import ProfileError

Percentile = Literal["p50", "p90", "p99"]

#: Metrics an objective may name, and which way is better for each.
OBJECTIVE_METRICS: dict[str, str] = {
    "latency_p50": "min",
    "latency_p90": "min",
    "latency_p99": "min",
    "energy_mj": "min",
    "size_bytes": "min",
    "peak_memory_mb": "min",
    "accuracy": "max",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hardware(_Strict):
    """What the board is: checked against a device's `info` when it is registered."""

    arch: Literal["aarch64", "x86_64", "armv7l"]
    cpu: str = Field(description="CPU model, e.g. 'Cortex-A72'")
    cores: int = Field(gt=0)
    memory_mb: int = Field(gt=0)
    accelerator: str | None = None


class Runtime(_Strict):
    """How onnxruntime runs on the device."""

    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1)
    intra_op_threads: int = Field(default=1, ge=1)
    inter_op_threads: int = Field(default=1, ge=1)


class Constraints(_Strict):
    """Hard limits; a candidate that breaks any one of them is never picked. All optional."""

    latency_percentile: Percentile = "p90"
    max_latency_ms: float | None = Field(default=None, gt=0)
    max_peak_memory_mb: float | None = Field(default=None, gt=0)
    max_model_size_mb: float | None = Field(default=None, gt=0)
    max_energy_mj: float | None = Field(default=None, gt=0, description="energy per inference, millijoules")
    max_accuracy_drop: float | None = Field(
        default=None, ge=0, description="accuracy lost against the baseline, in percentage points"
    )


class Objective(_Strict):
    """What the pick optimises among the feasible Pareto front."""

    metric: Literal[tuple(OBJECTIVE_METRICS)]  # type: ignore[valid-type]
    goal: Literal["minimize", "maximize"] | None = None
    tie_within: float = Field(
        default=0.0, ge=0, lt=1,
        description="objective values within this share of the best count as a tie (e.g. 0.03 for a "
                    "measurement's noise); ties go to higher accuracy, then smaller size",
    )

    @model_validator(mode="after")
    def _goal_matches_metric(self) -> Objective:
        natural = "minimize" if OBJECTIVE_METRICS[self.metric] == "min" else "maximize"
        if self.goal is None:
            self.goal = natural
        elif self.goal != natural:
            raise ValueError(f"{self.metric} can only be {natural}d")
        return self


class Search(_Strict):
    """What the search may try, and how much of it."""

    techniques: list[str] = Field(default_factory=list, description="allowed technique names")
    max_pipeline_length: int = Field(default=3, ge=1)
    trials: int = Field(default=12, gt=0)
    time_budget_s: float | None = Field(default=None, gt=0)
    seed: int = 0
    devices_per_candidate: int = Field(
        default=1, ge=1,
        description="measure each candidate on this many devices of the profile at once and take the medians "
                    "(1: the devices share the candidates out, for throughput)")


class Measurement(_Strict):
    """The agent's measurement protocol."""

    warmup_runs: int = Field(default=20, ge=0)
    warmup_until_stable: bool = Field(
        default=False,
        description="after warmup_runs, go on warming up until the last 10 runs vary by at most 5% (CV), "
                    "within time_budget_s; else exactly warmup_runs")
    runs: int = Field(default=200, gt=0)
    time_budget_s: float = Field(default=10.0, gt=0, description="stop timed runs early after this long")
    batch_size: int = Field(default=1, gt=0)


class Emulation(_Strict):
    """How QEMU stands in for the board when none is registered."""

    qemu_cpu: str
    cores: int = Field(gt=0)
    memory_mb: int = Field(gt=0)
    latency_scale: float = Field(
        default=1.0, gt=0,
        description="board latency / this host's native latency, calibrated once from a board's fp32 baseline "
                    "(board p50 / host p50); an emulated device's latency is the native one times this. "
                    "1.0 (the default) means not calibrated: the latency constraint is then unverified")
    note: str | None = None


class PowerModel(_Strict):
    """Board power used to *estimate* energy when no sensor can be read."""

    idle_watts: float = Field(gt=0)
    active_watts: float = Field(gt=0, description="all cores busy")
    source: str = Field(description="where the figures come from")

    @model_validator(mode="after")
    def _active_above_idle(self) -> PowerModel:
        if self.active_watts < self.idle_watts:
            raise ValueError("active_watts must be at least idle_watts")
        return self


class Profile(_Strict):
    """A class of device: its hardware, runtime, constraints, objective and search budget."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    hardware: Hardware
    runtime: Runtime = Field(default_factory=Runtime)
    constraints: Constraints = Field(default_factory=Constraints)
    objective: Objective
    search: Search = Field(default_factory=Search)
    measurement: Measurement = Field(default_factory=Measurement)
    emulation: Emulation | None = None
    power: PowerModel
    fallback_device: Literal["local", "emulated", "none"] = Field(
        default="local",
        description="what measures when no device of the profile is registered: this machine ('local'), the "
                    "profile's QEMU-emulated device ('emulated', or this machine when QEMU is unavailable), or "
                    "nothing ('none')")

    @field_validator("fallback_device")
    @classmethod
    def _emulated_fallback_needs_emulation(cls, value: str, info: ValidationInfo) -> str:
        # `emulation` is declared earlier: validated by now (absent from info.data when it failed)
        if value == "emulated" and "emulation" in info.data and info.data["emulation"] is None:
            raise ValueError("'emulated' needs an emulation section (qemu_cpu, cores, memory_mb)")
        return value


class LoadedProfile(BaseModel):
    """A validated profile plus where it came from (for error messages)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    profile: Profile
    path: Path
    text: str
    node: Any = None  # yaml node tree, for line numbers of later checks

    def line_of(self, loc: tuple[str | int, ...]) -> int:
        """The 1-based line of the field at `loc` (or of its nearest parent that exists)."""
        return _line_of(self.node, loc)

    def error(self, loc: tuple[str | int, ...], message: str) -> ProfileError:
        """A ProfileError shaped `FILE:LINE: field.path: message`."""
        return ProfileError(f"{self.path}:{self.line_of(loc)}: {_dotted(loc)}: {message}")


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _line_of(node: Any, loc: tuple[str | int, ...]) -> int:
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):  # YAML keeps the last of duplicate keys
                if key.value == part:
                    line = key.start_mark.line + 1
                    child = value
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def load_profile(path: str | Path) -> LoadedProfile:
    """Read and validate a profile; raise ProfileError with `FILE:LINE: field.path: message`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{path}: profile not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        position = getattr(exc, "position", None)  # ReaderError (bad characters) has no mark
        line = mark.line + 1 if mark else (text.count("\n", 0, position) + 1 if position is not None else 1)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ProfileError(f"{path}:{line}: (YAML): {problem}") from None
    if data is None:
        raise ProfileError(f"{path}:1: (top level): the profile is empty")
    if not isinstance(data, dict):
        raise ProfileError(f"{path}:1: (top level): a profile is a YAML mapping, got {type(data).__name__}")
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        elif first["type"] == "missing":
            message = "field required"
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        raise ProfileError(f"{path}:{_line_of(node, loc)}: {_dotted(loc)}: {message}{suffix}") from None
    return LoadedProfile(profile=profile, path=path, text=text, node=node)
