"""Device profiles: one YAML file per class of device, validated with pydantic.

A bad profile is reported as one line, `FILE:LINE: field.path: message`, where
LINE is the line of the offending field in the YAML file (orchestrator/config/yamlfile.py, which the
other YAML files we read, inventories, share).
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from orchestrator.config.yamlfile import (  # noqa: F401  (re-exported: inventories read YAML the same way)
    MAX_YAML_BYTES,
    MAX_YAML_VALUES,
    YamlFile,
    dotted,
    line_of,
    parse_yaml,
    read_yaml,
    validation_message,
)
from orchestrator.errors import ProfileError
from orchestrator.metrics import metric as metric_row
from orchestrator.metrics import objective_metrics

#: onnxruntime's execution provider names (`onnxruntime.get_all_providers()` across releases). Kept here
#: because the host need not have the device's onnxruntime build; a name not in this list is a typo.
EXECUTION_PROVIDERS = (
    "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider",
    "OpenVINOExecutionProvider", "CoreMLExecutionProvider", "DmlExecutionProvider", "ROCMExecutionProvider",
    "MIGraphXExecutionProvider", "QNNExecutionProvider", "NnapiExecutionProvider", "XnnpackExecutionProvider",
    "ACLExecutionProvider", "ArmNNExecutionProvider", "CANNExecutionProvider", "AzureExecutionProvider",
    "VitisAIExecutionProvider", "WebGpuExecutionProvider", "WebNNExecutionProvider", "JsExecutionProvider",
    "DnnlExecutionProvider", "RknpuExecutionProvider", "VSINPUExecutionProvider", "SNPEExecutionProvider",
    "TvmExecutionProvider",
)

Percentile = Literal["p50", "p90", "p99"]

#: Metrics an objective may name, and which way is better for each: the rows of the table of metrics
#: (orchestrator/metrics.py) a profile may optimise. `Objective` reads the table itself, so a row added
#: there is an objective at once.
OBJECTIVE_METRICS: dict[str, str] = objective_metrics()


def _allows_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_allows_bool(a) for a in typing.get_args(annotation))
    return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `trials: true` as 1; its strict mode would also refuse `1e-3`,
        # which YAML 1.1 hands over as a string. So only booleans are refused where no bool belongs.
        if isinstance(value, bool) and not _allows_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a {_kind(cls.model_fields[info.field_name].annotation)}, not {str(value).lower()}")
        problem = None if _is_section(cls.model_fields[info.field_name].annotation) else _unbounded(value)
        if problem:  # `.inf`, `.nan` or 1e51 would pass `gt=0` and end up in results.json (Infinity is not JSON)
            raise ValueError(problem)
        return value


#: The largest magnitude a number in a profile may have: no count, size, time or power of a device is near it.
MAX_NUMBER = 1e12


def _is_section(annotation: Any) -> bool:
    """Whether a field holds a section (a model of its own, maybe optional): its fields check themselves,
    so that a message names the field, not the section."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return any(isinstance(a, type) and issubclass(a, BaseModel) for a in (annotation, *args))


def _unbounded(value: Any, depth: int = 0) -> str | None:
    """Why `value` (a number, or lists and mappings of them, as in search.params) is no setting: NaN,
    infinite, or over MAX_NUMBER in magnitude; None when it is fine."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, not {value}"
    if isinstance(value, (int, float)) and abs(value) > MAX_NUMBER:
        return f"expected a number of magnitude at most {MAX_NUMBER:.0e}, not {value:.3g}"
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)) and depth < 20:
        return next(filter(None, (_unbounded(v, depth + 1) for v in value)), None)
    return None


def _kind(annotation: Any) -> str:
    names = {int: "whole number", float: "number", str: "string"}
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    for a in (annotation, *args):
        if a in names:
            return names[a]
    return "value of another type"


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

    @field_validator("execution_providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in EXECUTION_PROVIDERS:
                # "cuda" or "CUDAExecutionprovider" is a spelling of a known one: name it
                stem = name.lower().removesuffix("executionprovider")
                near = [p for p in EXECUTION_PROVIDERS if p.lower().removesuffix("executionprovider") == stem]
                hint = f"did you mean {near[0]}? " if near else ""
                raise ValueError(f"unknown execution provider {name!r}: {hint}onnxruntime knows "
                                 f"{', '.join(EXECUTION_PROVIDERS)}")
        return value


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

    metric: str = Field(description="a metric of the table (orchestrator/metrics.py) a profile may optimise: "
                                    + ", ".join(OBJECTIVE_METRICS))
    goal: Literal["minimize", "maximize"] | None = None
    tie_within: float = Field(
        default=0.0, ge=0, lt=1,
        description="objective values within this share of the best count as a tie (e.g. 0.03 for a "
                    "measurement's noise); ties go by `tie_break`",
    )
    tie_break: list[Literal["size", "accuracy"]] = Field(
        default_factory=lambda: ["size", "accuracy"], min_length=1, max_length=2,
        description="the order in which a tie on the objective is broken among feasible candidates: "
                    "size (the smaller model wins, by 1% or more), accuracy (the more accurate, by 0.1 points "
                    "or more); then the better objective value. Default: size, then accuracy (within the "
                    "profile's accuracy budget an edge fleet pays for every megabyte)",
    )

    @field_validator("tie_break")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"tie_break names a rule twice: {value}")
        return value

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        names = objective_metrics()
        if value not in names:
            raise ValueError(f"{value!r} is not a metric an objective may name: {', '.join(names)}")
        return value

    @model_validator(mode="after")
    def _goal_matches_metric(self) -> Objective:
        natural = metric_row(self.metric).goal
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
    train_time_budget_s: float = Field(
        default=60.0, gt=0,
        description="a brought model's fine-tuning (orchestrator/models/owntrain.py) stops after this long, per technique "
                    "of a candidate that trains, even with epochs left; its build info says what it used")
    seed: int = 0
    devices_per_candidate: int = Field(
        default=1, ge=1,
        description="measure each candidate on this many devices of the profile at once and take the medians "
                    "(1: the devices share the candidates out, for throughput)")
    params: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="technique parameters, {technique: {param: value or [values]}}: a value fixes the parameter, "
                    "a list restricts a searched one to those values (checked against the installed techniques "
                    "when the search space is built: orchestrator/search/space.py)")


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
    finalists: int = Field(
        default=3, ge=1,
        description="the final round: this many best feasible candidates (plus the baseline) are measured again")
    final_rounds: int = Field(
        default=40, ge=3,
        description="interleaved rounds of the final round (A B C base, B C base A, ...); the pick is decided on them")
    final_time_budget_s: float = Field(
        default=20.0, gt=0, description="the final round stops after this long (at least 3 rounds are always run)")
    axes: dict[str, int] = Field(
        default_factory=dict,
        description="sizes of the model's named dynamic axes (batch aside) the agent times it at; filled from the "
                    "model's samples when absent")


class DetectionQuality(_Strict):
    """How a detector's outputs are decoded and matched to the fp32 model's (quality `detection`)."""

    score_threshold: float = Field(default=0.25, gt=0, lt=1, description="a detection's least class score")
    nms_iou: float = Field(default=0.45, gt=0, le=1, description="class-agnostic NMS: overlap that suppresses")
    match_iou: float = Field(default=0.5, gt=0, le=1, description="overlap at which a detection matches fp32's")
    max_detections: int = Field(default=300, gt=0, le=100_000, description="detections kept per sample after NMS")


class ModelSection(_Strict):
    """The model to optimise when it is not a task plugin's: the same as `--model`/`--inputs` (docs: README)."""

    source: str | None = Field(default=None,
                               description="an .onnx file, a Hugging Face model folder, or package.module:factory; "
                                           "a relative path is read from the profile's folder (--model wins)")
    inputs: str | None = Field(default=None, description="an .npz of representative inputs (and optionally labels)")
    train: str | None = Field(default=None,
                              description="a training set for label-free distillation, separate from `inputs` (no "
                                          "held-out row of it): a folder of .npy files or an uncompressed .npz, read "
                                          "lazily (--train wins; docs/own_models.md)")
    quality: Literal["auto", "top1", "cosine", "detection", "segmentation", "relative_error", "labels"] = Field(
        default="auto", description="how quality is scored: the task metric on `labels`, or agreement with the fp32 "
                                    "model's outputs (auto: labels if given, top1 for classifier logits, detection "
                                    "for a YOLO-style head, segmentation for a segmentation map, else cosine per "
                                    "output; docs/own_models.md)")
    detection: DetectionQuality = Field(default_factory=lambda: DetectionQuality(),
                                        description="how detections are decoded and matched (quality: detection)")
    axes: dict[str, int] = Field(default_factory=dict,
                                 description="sizes of named dynamic axes to measure at, e.g. {sequence: 128}")

    @field_validator("axes")
    @classmethod
    def _positive_axes(cls, value: dict[str, int]) -> dict[str, int]:
        for name, size in value.items():
            if size <= 0:
                raise ValueError(f"axis {name!r} must be a positive size, got {size}")
        return value


class CostModel(_Strict):
    """Instructions -> milliseconds for an emulated board (orchestrator/emulation/icount.py): instructions x cpi
    / (clock_mhz x 1000)."""

    cpi: float = Field(gt=0, description="cycles per guest instruction on the board")
    clock_mhz: float = Field(gt=0, description="the board's CPU clock")
    calibrated: bool = Field(
        default=False, description="true only when cpi was fitted to latencies measured on a board; "
                                   "false: a default from a data sheet and an assumed cpi, an estimate")
    source: str = Field(description="where the figures come from")


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
    cost_model: CostModel | None = Field(
        default=None, description="instruction counts -> milliseconds (latency_source: emulated-icount)")
    latency: Literal["native-scaled", "emulated-icount"] = Field(
        default="native-scaled",
        description="where an emulated device's latency comes from: this host's native measurement x latency_scale, "
                    "or the guest instructions counted on the emulated CPU model through cost_model")
    note: str | None = None

    @model_validator(mode="after")
    def _icount_needs_cost_model(self) -> Emulation:
        if self.latency == "emulated-icount" and self.cost_model is None:
            raise ValueError("latency 'emulated-icount' needs a cost_model (cpi, clock_mhz, source)")
        return self


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
    model: ModelSection | None = Field(default=None, description="a model of your own instead of a task plugin's")
    task: str | None = Field(default=None, description="the task plugin to run (the command line's --task wins)")
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
        return line_of(self.node, loc)

    def error(self, loc: tuple[str | int, ...], message: str) -> ProfileError:
        """A ProfileError shaped `FILE:LINE: field.path: message`."""
        return ProfileError(f"{self.path}:{self.line_of(loc)}: {dotted(loc)}: {message}")


def load_profile(path: str | Path) -> LoadedProfile:
    """Read and validate a profile; raise ProfileError with `FILE:LINE: field.path: message`."""
    path = Path(path)
    if path.is_dir():
        raise ProfileError(f"{path}: cannot read profile: it is a folder")
    return _validated(path, read_yaml(path, "profile", ProfileError))


def profile_from_text(text: str, path: str | Path) -> LoadedProfile:
    """A profile from text kept elsewhere (a run's stored copy); `path` is the file it was read from.

    Relative paths in it (`model.source`) are still read from that file's folder.
    """
    path = Path(path)
    return _validated(path, parse_yaml(text, path, ProfileError))


def _validated(path: Path, parsed: YamlFile) -> LoadedProfile:
    text, node, data = parsed
    if data is None:
        raise ProfileError(f"{path}:1: (top level): the profile is empty")
    if not isinstance(data, dict):
        raise ProfileError(f"{path}:1: (top level): a profile is a YAML mapping, got {type(data).__name__}")
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(validation_message(path, node, exc)) from None
    return LoadedProfile(profile=profile, path=path, text=text, node=node)
