"""The public plugin API: what a technique or task author subclasses and calls.

Heavy libraries (torch, onnxruntime.quantization, torch_pruning) are imported
inside methods, never at module level, so `orchestrate plugins` and `--help`
stay fast.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Sequence

import pluggy

from orchestrator.errors import TechniqueParamsError

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config.profile import Profile

PROJECT_NAME = "edge_orchestrator"
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Stage = Literal["architecture", "training", "graph"]
#: Stages run in this order; `export` (torch -> ONNX) sits between training and graph.
STAGE_ORDER: tuple[str, ...] = ("architecture", "training", "graph")


@dataclass(frozen=True)
class Choice:
    """A searchable parameter: one of a finite list of values."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("choice() needs at least one value")


def choice(values: Sequence[Any]) -> Choice:
    """Declare a parameter the search picks from `values`."""
    return Choice(tuple(values))


class NotApplicable(ValueError):
    """Raise it from `Technique.apply` when the model has nothing the technique can work on, whatever its
    parameters (no list of blocks to drop, no attention to prune): the search rules the technique out at
    this first failure (results.json `ruled_out`, reason `not applicable`) instead of after three."""


class Technique:
    """One way to make a model smaller or faster. Subclass it and implement `apply`.

    Class attributes an author sets:
      name          unique, kebab-case, shown to users and written in profiles
      stage         "architecture" | "training" (model is a torch.nn.Module) or "graph" (model is onnx.ModelProto)
      version       bump it when `apply` changes its output, so caches are invalidated
      search_space  {param: choice([...])}: what the search may try
      defaults      {param: value}: used for params the search does not set
      incompatible_with  names of techniques never to share a pipeline with this one
      cannot_follow      names of techniques that must not run before this one

    Combinations are checked before the search starts (`orchestrator.search.space`), never
    discovered by a crash mid-search. Either side of a pair may declare the
    incompatibility, and a name that is not installed is simply ignored. Within one
    stage, `cannot_follow` orders the pipeline (this technique runs first); where the
    stages force the other order, the pipeline is refused.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[Stage] = "graph"
    version: ClassVar[str] = "1"
    search_space: ClassVar[dict[str, Choice]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""
    incompatible_with: ClassVar[tuple[str, ...]] = ()
    cannot_follow: ClassVar[tuple[str, ...]] = ()

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and refuse unknown or out-of-space parameters; returns the full params."""
        known = set(self.search_space) | set(self.defaults)
        unknown = sorted(set(params) - known)
        if unknown:
            raise TechniqueParamsError(
                f"technique {self.name!r}: unknown parameter(s) {', '.join(unknown)}; "
                f"it accepts {', '.join(sorted(known)) or 'none'}"
            )
        full = {**self.defaults, **params}
        for key, domain in self.search_space.items():
            if key not in full:
                full[key] = domain.values[0]
            if full[key] not in domain.values:
                raise TechniqueParamsError(
                    f"technique {self.name!r}: {key}={full[key]!r} is not one of {list(domain.values)}"
                )
        reason = self.invalid(full)
        if reason:
            raise TechniqueParamsError(f"technique {self.name!r}: {reason}")
        return full

    def invalid(self, params: dict[str, Any]) -> str | None:
        """Return why this combination of parameters is invalid, or None. Checked before the search."""
        return None

    #: Searched parameter values that need labelled training data (a loss to take gradients of), as
    #: {parameter: (values, ...)}. For a model brought without labels the run leaves them out of the
    #: search, and refuses them with one line when the profile fixes them. Added in 0.4.
    needs_labels: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def param_grid(self) -> list[dict[str, Any]]:
        """Every valid parameter combination in the search space (used for grid search)."""
        keys = sorted(self.search_space)
        grid = []
        for values in itertools.product(*(self.search_space[k].values for k in keys)):
            params = {**self.defaults, **dict(zip(keys, values))}
            if self.invalid(params) is None:
                grid.append(params)
        return grid

    def apply(self, model: Any, params: dict[str, Any], ctx: TechniqueContext) -> Any:
        """Return the transformed model. Must not modify `model` in place."""
        raise NotImplementedError

    def recommended(self, device: DeviceFacts) -> list[dict[str, Any]]:
        """Known-good parameter sets for `device`, best first; the search tries them before exploring.

        Each is a (partial) params dict inside `search_space` (missing keys take their defaults).
        `device` says what the device's agent reported: arch, ISA features, execution providers.
        Return [] where the technique has no configuration worth trying first on this device
        (the search may still explore it). Added in 0.2.
        """
        return []

    def architecture(self, params: dict[str, Any], ctx: TechniqueContext) -> Any | None:
        """For `architecture`-stage techniques: the untrained torch model `apply` would train, or None.

        Lets the hardware-aware search predict a candidate's latency before paying for its
        training. Other stages never need it. Added in 0.2.
        """
        return None


@dataclass(frozen=True)
class DeviceFacts:
    """What a technique may condition its recommendations on: what the device's agent reported.

    arch: "x86_64" | "aarch64" | ...; isa: CPU features in lower case as /proc/cpuinfo spells them
    ("avx2", "avx512_vnni", "avx_vnni", "asimddp" (ARM dot product), "asimdhp"/"fphp" (ARM fp16),
    "i8mm"); providers: onnxruntime execution providers the profile runs with, in order.
    """

    arch: str = ""
    isa: frozenset[str] = frozenset()
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    #: Operator types of the base model's ONNX graph (added in 0.3; empty when not known): a technique
    #: may recommend differently for a transformer (MatMul, no Conv) than for a CNN.
    model_ops: frozenset[str] = frozenset()

    @classmethod
    def from_info(cls, info: dict[str, Any] | None, providers: Sequence[str] = ("CPUExecutionProvider",)) -> DeviceFacts:
        """From an agent `info` dict (missing fields: unknown)."""
        info = info or {}
        return cls(arch=str(info.get("arch") or ""), isa=frozenset(str(f).lower() for f in info.get("isa") or ()),
                   providers=tuple(providers))

    def has(self, *features: str) -> bool:
        """True when the CPU reports any of `features`."""
        return any(f.lower() in self.isa for f in features)

    @property
    def matmul_model(self) -> bool:
        """The base model is MatMul-heavy without convolutions (a transformer or an MLP), as far as is known."""
        return "MatMul" in self.model_ops and "Conv" not in self.model_ops

    @property
    def x86(self) -> bool:
        """An x86-64 CPU."""
        return self.arch in ("x86_64", "amd64")

    @property
    def arm(self) -> bool:
        """A 64-bit ARM CPU."""
        return self.arch in ("aarch64", "arm64")

    @property
    def gpu(self) -> bool:
        """A CUDA or TensorRT execution provider comes first."""
        return bool(self.providers) and self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class TensorSpec:
    """One named model input or output: numpy dtype name and full shape, dynamic axes named.

    `shape` includes the batch axis: ("batch", 1, 32, 32) for an image, ("batch", "sequence")
    for token ids (dtype "int64"). A string is a dynamic axis: the export keeps it dynamic,
    and the device measures at the size the profile gives it (`model.axes`; batch: the
    measurement's batch size).
    """

    name: str
    dtype: str = "float32"
    shape: tuple[int | str, ...] = ("batch",)

    def dynamic_axes(self) -> dict[int, str]:
        """{axis index: name} of the dynamic axes (torch.onnx.export's `dynamic_axes` entry)."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass
class Dataset:
    """Inputs and what the metric compares outputs with, as numpy.

    `inputs`: one array (a single-input model: (N, ...)) or {input name: array (N, ...)} for a
    model with several inputs (token ids and attention mask, say). `labels`: the task's labels
    (N,), or, for a model brought without labels, the fp32 model's own outputs on these inputs
    (a list of arrays, one per output), which the quality is agreement with.
    """

    inputs: Any
    labels: Any

    def __len__(self) -> int:
        if isinstance(self.inputs, dict):
            return len(next(iter(self.inputs.values())))
        return len(self.inputs)

    def rows(self, start: int, stop: int) -> Any:
        """Inputs of rows [start, stop): an array, or a dict of arrays."""
        if isinstance(self.inputs, dict):
            return {name: array[start:stop] for name, array in self.inputs.items()}
        return self.inputs[start:stop]


class Task:
    """A model family plus its data and metric. Subclass it to bring your own model.

    `build(arch)` makes an untrained model of the family; `arch` holds the family's
    knobs (empty means the default architecture). `train(model, data, epochs, seed)`
    trains in place. Data comes from `load_data(seed)`; `metric` scores logits.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    input_name: ClassVar[str] = "input"
    input_shape: ClassVar[tuple[int, ...]] = ()  # without the batch dimension
    #: Named, typed inputs and outputs (added in 0.3). Empty: one float32 input `input_name` of
    #: `input_shape` (plus the batch axis), one output `logits`.
    inputs: ClassVar[tuple[TensorSpec, ...]] = ()
    outputs: ClassVar[tuple[TensorSpec, ...]] = ()
    #: What `metric` measures, as results.json and the report name it ("accuracy", "cosine", ...).
    quality_metric: ClassVar[str] = "accuracy"
    #: True: `build()` returns the trained (pretrained) model as it is; nothing is trained or cached.
    pretrained: ClassVar[bool] = False
    default_arch: ClassVar[dict[str, Any]] = {}
    train_epochs: ClassVar[int] = 1

    # ------------------------------------------------------------- every model is a Task (added in 0.4)
    def spec(self) -> dict[str, Any]:
        """What a Ray worker rebuilds this task from: JSON-able, "task" its name.

        A registered task plugin needs nothing more (the worker loads the same plugins). A task
        made with arguments (a model brought with --model) adds "class" ("module:QualName" of its
        Task subclass) and what `from_spec` needs, including what the driver established once
        (the source's kind, the resolved quality, a fingerprint), so a worker does not derive it again.
        """
        return {"task": self.name}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Task:
        """The task `spec()` described, rebuilt in a worker (the default: the class takes no arguments)."""
        return cls()

    def check_rebuilt(self, spec: dict[str, Any], where: str) -> None:
        """Refuse (raise an OrchestratorError) when the task rebuilt in `where` differs from the driver's `spec`."""

    def measure_axes(self, seed: int) -> dict[str, int]:
        """Sizes of the model's named dynamic axes (batch aside) the device should time it at; {}: the profile's."""
        return {}

    def describe(self) -> dict[str, Any] | None:
        """What results.json says of the model (its `model` block), or None for a task plugin's own."""
        return None

    def resume_options(self) -> dict[str, Any]:
        """What a resumed run needs to make this task again (absolute paths), beyond the task's name."""
        return {}

    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs, in the order its forward() takes them."""
        return self.inputs or (TensorSpec(self.input_name, "float32", ("batch", *self.input_shape)),)

    def output_specs(self) -> tuple[TensorSpec, ...]:
        """The model's outputs, in the order its forward() returns them (the first is scored by `metric`)."""
        return self.outputs or (TensorSpec("logits", "float32", ("batch", "classes")),)

    def feeds(self, rows: Any) -> dict[str, Any]:
        """{input name: array} for `Dataset.rows(...)` (one array for a single-input task)."""
        if isinstance(rows, dict):
            return dict(rows)
        return {self.input_specs()[0].name: rows}

    def score(self, outputs: list[Any], labels: Any) -> float:
        """The quality of a model's outputs (a list, one array per output) on a dataset; default: `metric` on the first."""
        return self.metric(outputs[0], labels)

    def build(self, arch: dict[str, Any] | None = None) -> Any:
        """An untrained torch.nn.Module of this family."""
        raise NotImplementedError

    def load_data(self, seed: int) -> dict[str, Dataset]:
        """{'train', 'calibration', 'eval'} datasets; the eval split is fixed by `seed`."""
        raise NotImplementedError

    def train(self, model: Any, data: Dataset, epochs: int, seed: int,
              teacher: Any = None, temperature: float = 4.0, alpha: float = 0.5) -> Any:
        """Train `model` in place on `data`; with a teacher, distil (soft targets mixed with labels)."""
        raise NotImplementedError

    def metric(self, logits: Any, labels: Any) -> float:
        """Accuracy in [0, 1] of logits (N, classes) against labels (N,)."""
        import numpy as np

        return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())

    def scaled_arch(self, width_mult: float = 1.0, depth: int | None = None) -> dict[str, Any]:
        """Knobs for a smaller (or larger) member of the family, for `build()`.

        `width_mult` scales every stage's channel count; `depth` sets the number of
        blocks per stage (None keeps the default). Techniques that make a new model
        of the family (distillation, architecture search) call this, so they need not
        know the family's knobs. A task without a scalable family keeps this default,
        which refuses.
        """
        raise NotImplementedError(f"task {self.name!r} does not say how to scale its model (Task.scaled_arch)")

    def fingerprint(self) -> str:
        """What the trained base model depends on, beyond the seed (part of its cache key)."""
        return f"{self.name}:{self.version}:{self.default_arch}:{self.train_epochs}"


@dataclass
class TechniqueContext:
    """What a technique gets besides the model: data, the teacher, a fine-tune helper, scratch space."""

    task: Task
    data: dict[str, Dataset]
    teacher: Any
    profile: Profile
    scratch_dir: Path
    seed: int
    #: Seconds spent in `fine_tune` since the context was made (the pipeline reports it per technique).
    fine_tune_seconds: float = 0.0

    def fine_tune(self, model: Any, epochs: int, teacher: Any = None, **kwargs: Any) -> Any:
        """Train `model` for `epochs` on the task's training data (distilling when given a teacher)."""
        start = time.perf_counter()
        try:
            return self.task.train(model, self.data["train"], epochs=epochs, seed=self.seed, teacher=teacher, **kwargs)
        finally:
            self.fine_tune_seconds += time.perf_counter() - start

    def calibration_batches(self, limit: int) -> list[Any]:
        """Up to `limit` single-sample input batches from the calibration split (arrays, or dicts by input name)."""
        data = self.data["calibration"]
        return [data.rows(i, i + 1) for i in range(min(limit, len(data)))]

    def calibration_feeds(self, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` single-sample feeds {input name: array} from the calibration split (for onnxruntime)."""
        return [self.task.feeds(rows) for rows in self.calibration_batches(limit)]


def distillation_loss(student_logits: Any, teacher_logits: Any, labels: Any, temperature: float = 4.0,
                      alpha: float = 0.5) -> Any:
    """The soft-target distillation loss (Hinton et al.) for a task's `train`, as a torch scalar.

    `alpha` * KL(teacher || student) on logits softened by `temperature` (scaled by
    `temperature`**2, so its gradients keep their size), plus (1 - `alpha`) * the cross-entropy
    against `labels`. Compute `teacher_logits` under `torch.no_grad()`; they are detached here
    anyway, so no gradient reaches the teacher.
    """
    import torch.nn.functional as F

    hard = F.cross_entropy(student_logits, labels)
    soft = F.softmax(teacher_logits.detach() / temperature, dim=1)
    kd = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), soft, reduction="batchmean")
    return alpha * kd * temperature**2 + (1 - alpha) * hard


Register = Callable[[Any], None]


# ------------------------------------------------------------------ progress of long training

_training_progress: list[Callable[[int, int], None]] = []


def training_progress(done: int, total: int) -> None:
    """A task's `train()` calls this after each epoch (`done` of `total`): while the base model is trained,
    the run turns it into the `base_model_progress` event (the terminal shows epochs and time left).
    Outside that, it does nothing; a task that never calls it still works (no progress is shown)."""
    for callback in _training_progress[-1:]:
        callback(done, total)


class progress_to:  # noqa: N801 - used as a context manager, like a function
    """While inside, `training_progress(done, total)` calls `callback(done, total)` (the innermost one only)."""

    def __init__(self, callback: Callable[[int, int], None]) -> None:
        self.callback = callback

    def __enter__(self) -> None:
        _training_progress.append(self.callback)

    def __exit__(self, *exc: object) -> None:
        _training_progress.remove(self.callback)
