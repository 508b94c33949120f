"""Bring your own model: an ONNX file, a PyTorch module from a factory, or a Hugging Face folder, as a task.

`orchestrate --profile P --model SOURCE [--inputs SAMPLES.npz]` (or the profile's `model:` section)
turns the model into an `OwnModelTask`: a pretrained task whose inputs and outputs are read from the
model or the samples, and whose quality is the task metric on `labels`, else agreement with the
fp32 model's own outputs on the samples (`QUALITY_METRICS`).

SOURCE is one of:
  path/to/model.onnx       an ONNX file: graph-stage techniques on the file, training-stage ones on its
                           checked onnx2torch conversion (orchestrator/models/onnxconvert.py)
  package.module:factory   a Python callable returning a torch.nn.Module with its weights loaded
  path/to/hf-folder        a Hugging Face model folder on disk (config.json + weights), loaded offline
                           with `transformers` (the `hf` extra); never downloads

SAMPLES is an `.npz` of representative inputs, one array per model input, named as the model
names them, rows along axis 0 (and optionally `labels`); without it, random. `--train PATH`: a training set, no held-out row of SAMPLES (orchestrator/models/trainset.py).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from orchestrator.api import Dataset, Task, TensorSpec
from orchestrator.errors import ModelSourceError
from orchestrator.models.agreement import (DetectionSettings, agreement_score, auto_quality, channel_scales,
                                           compares_text, detection_layout)
from orchestrator.models.hfmodel import load_hf_folder
from orchestrator.models.modelfacts import onnx_specs, spec_json
from orchestrator.models.outputs import onnx_outputs, torch_outputs
from orchestrator.models.owntrain import fine_tune, train_set_of

#: How a model brought without labels is scored against the fp32 model's own outputs (1.0 = identical).
QUALITY_METRICS = {
    "top1": "share of samples whose arg-max class is the fp32 model's",
    "cosine": "each output's mean per-sample cosine to the fp32 model's, in its own scale (channels of different "
              "scales standardised by fp32's); the worst output",
    "detection": "F1 of the detections (score threshold, class-agnostic NMS) against the fp32 model's, matched by "
                 "class and IoU",
    "segmentation": "share of pixels whose arg-max class is the fp32 model's",
    "relative_error": "1 - mean |output - fp32| / mean |fp32|",
    "labels": "the task metric (top-1 accuracy) against the samples' labels",
}
#: Rows of the samples the fp32 model runs on to confirm an output is detector-shaped (auto quality).
DETECTION_PROBE_ROWS = 8
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
RANDOM_SAMPLES = 64
DEFAULT_SEQUENCE = 128


def source_kind(source: str) -> str:
    """"onnx" | "hf" | "torch" for a --model value, or ModelSourceError saying what it accepts."""
    path = Path(source)
    if path.is_file() and path.suffix == ".onnx":
        return "onnx"
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise ModelSourceError(f"--model {source}: a folder without config.json (not a Hugging Face model folder)")
    if FACTORY.match(source):
        return "torch"
    if path.suffix == ".onnx":
        raise ModelSourceError(f"--model {source}: no such file")
    raise ModelSourceError(f"--model {source}: give an .onnx file, a Hugging Face model folder (with config.json) "
                           "or a Python factory as package.module:function")


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


class OwnModelTask(Task):
    """A pretrained model brought by the user (see the module docstring), used as it is."""

    name = "own-model"
    version = "1"
    description = "a model brought with --model (ONNX file, PyTorch factory or Hugging Face folder)"
    pretrained = True

    def __init__(self, source: str, samples: str | None = None, quality: str = "auto",
                 axes: dict[str, int] | None = None, search_dir: str | None = None,
                 detection: dict[str, Any] | None = None, train: str | None = None,
                 train_time_budget_s: float | None = None) -> None:
        self.kind = source_kind(str(source))
        # absolute: Ray workers rebuild the task from its spec in another working folder
        self.source = str(source) if self.kind == "torch" else str(Path(source).resolve())
        self.samples_path = str(Path(samples).resolve()) if samples else None
        if self.samples_path and not Path(self.samples_path).is_file():
            raise ModelSourceError(f"--inputs {self.samples_path}: no such file")
        if quality not in ("auto", *QUALITY_METRICS):
            raise ModelSourceError(f"model quality {quality!r}: use auto or one of {', '.join(QUALITY_METRICS)}")
        self.requested_quality = quality
        self.train_path, self.train_time_budget_s = (str(Path(train).resolve()) if train else None), train_time_budget_s
        self.training_log: list[dict[str, Any]] = []  # what each fine-tuning in this process used (owntrain.py)
        self.detection = DetectionSettings(**(detection or {}))
        self._layout: str | None = None  # a detector's output layout (quality "detection")
        self._compared: list[str] = []  # which parts the last score compared, for results.json
        self.search_dir = search_dir or os.getcwd()
        self.axes = dict(axes or {})
        self._model: Any = None
        self._convert_why: str | None = None  # an ONNX file: "" once converted and checked, else why not
        self._samples: dict[str, Any] | None = None
        self._vocab = 0
        self._hf_output = ""
        self.inputs, self.outputs = self._specs()
        self.quality_metric = self._quality()
        self._digest: str | None = None
        self._train_checked = False  # scanned for held-out rows: once, by the driver, not again in each worker
        if self.train_path:
            train_set_of(self).check_inputs(self.inputs)

    # ------------------------------------------------------------------ what workers rebuild it from
    def spec(self) -> dict[str, Any]:
        """What a Ray worker needs to rebuild this task (`from_spec`)."""
        # the quality as resolved here: a worker does not run the fp32 model again to detect it
        return {"task": self.name, "class": f"{OwnModelTask.__module__}:{OwnModelTask.__qualname__}",
                "source": self.source, "samples": self.samples_path, "quality": self.quality_metric,
                "axes": self.axes, "search_dir": self.search_dir, "fingerprint": self.fingerprint(),
                "detection": dataclasses.asdict(self.detection), "train": self.train_path,
                "train_time_budget_s": self.train_time_budget_s, "train_checked": self._train_checked}

    def check_rebuilt(self, spec: dict[str, Any], where: str) -> None:
        """Refuse to go on when `where` (a Ray worker) built other weights than the driver did (`spec`'s fingerprint).

        A factory that trains, or initialises anything randomly, returns another model on each
        call: the candidates would be compressed from a model the run never scored.
        """
        if spec.get("fingerprint") not in (None, self.fingerprint()):
            raise ModelSourceError(
                f"--model {self.source}: {where} got other weights from it than this run did: a factory must return "
                "the same pretrained model on every call (load saved weights; do not train or initialise randomly in it)")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> OwnModelTask:
        task = cls(spec["source"], spec.get("samples"), spec.get("quality", "auto"), spec.get("axes"),
                   spec.get("search_dir"), spec.get("detection"), spec.get("train"), spec.get("train_time_budget_s"))
        task._train_checked = bool(spec.get("train_checked"))
        return task

    def resume_options(self) -> dict[str, Any]:
        """What a resumed run needs to rebuild this model: absolute paths (a factory stays as it is)."""
        absolute = (lambda v: str(Path(v).resolve()) if v and Path(v).exists() else v)  # noqa: E731
        return {"model": absolute(self.source), "inputs": absolute(self.samples_path),
                **({"train": self.train_path} if self.train_path else {})}

    def describe(self) -> dict[str, Any]:
        """What results.json says of the model."""
        return {"source": self.source, "kind": self.kind,
                "samples": self.samples_path or f"random ({RANDOM_SAMPLES} rows: no --inputs given)",
                "quality_metric": self.quality_metric, "quality_means": QUALITY_METRICS[self.quality_metric],
                "quality_compares": self.quality_compares(),
                **({"train": train_set_of(self).describe(self.train_time_budget_s)} if self.train_path else {}),
                "inputs": [spec_json(s) for s in self.inputs], "outputs": [spec_json(s) for s in self.outputs]}

    # ------------------------------------------------------------------------------- the model
    def build(self, arch: dict[str, Any] | None = None) -> Any:
        """The pretrained model: onnx.ModelProto for an ONNX file (the file itself: the baseline and every
        graph-stage technique start from it; see `torch_form` for the training stage), else a torch module
        in eval mode."""
        if self.kind == "onnx":
            import onnx

            try:
                return onnx.load(self.source)
            except Exception as exc:  # noqa: BLE001 - a corrupt file says so in one line
                raise ModelSourceError(f"--model {self.source}: not a readable ONNX model "
                                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None

        return copy.deepcopy(self._torch_model())

    def torch_form(self) -> Any:
        """A fresh torch module of the model, for training-stage techniques: for an ONNX file its checked
        onnx2torch conversion, or ModelSourceError saying in one line why there is none (`not_trainable`)."""
        return copy.deepcopy(self._torch_model())

    def not_trainable(self) -> str:
        """Why training-stage techniques cannot change this model ("" when they can): an ONNX file that
        onnx2torch does not convert, or whose conversion disagrees with it on the samples."""
        if self.kind != "onnx":
            return ""
        if self._convert_why is None:
            from orchestrator.models.onnxconvert import CHECK_ROWS, convert

            feeds = {k: v[:CHECK_ROWS] for k, v in self.sample_inputs(0).items()}
            reference = onnx_outputs(Path(self.source).read_bytes(), self, Dataset(feeds, None))
            self._model, self._convert_why = convert(self.source, feeds, [s.name for s in self.inputs],
                                                     [s.name for s in self.outputs], reference)
        return self._convert_why

    def _torch_model(self) -> Any:
        if self.kind == "onnx":
            why = self.not_trainable()
            if why:
                raise ModelSourceError(f"--model {self.source}: no PyTorch form for training-stage techniques: {why}")
            return self._model
        if self._model is None:
            if self.kind == "hf":
                self._model, (self._hf_output, self._vocab) = load_hf_folder(self.source)
            else:
                self._model = _call_factory(self.source, self.search_dir)
        return self._model

    def fingerprint(self) -> str:
        """The model's and the samples' content (the stage and accuracy caches key on it)."""
        if self._digest is None:
            src = Path(self.source)
            if self.kind == "onnx":
                files = [src]
            elif self.kind == "hf":
                files = [p for p in src.iterdir() if p.is_file()]
            else:
                files = []
            model_part = _file_digest(files) if files else _state_digest(self._torch_model())
            samples_part = _file_digest([Path(self.samples_path)]) if self.samples_path else "random"
            self._digest = f"{model_part}:{samples_part}" + (f":{train_set_of(self).key(self.train_time_budget_s)}"
                                                              if self.train_path else "")
        return f"own-model:{self.version}:{self.kind}:{self._digest}:{self.quality_metric}:{sorted(self.axes.items())}"

    def train(self, model: Any, data: Dataset, epochs: int, seed: int,
              teacher: Any = None, temperature: float = 4.0, alpha: float = 0.5) -> Any:
        """Fine-tune (owntrain.py: label-free on --train, else labels, else fp32's outputs); see `training_log`."""
        return fine_tune(self, model, self._torch_model(), data, epochs, seed, teacher, temperature, alpha) \
            if epochs > 0 else model

    # -------------------------------------------------------------------------------- inputs
    def _specs(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        if self.kind == "onnx":
            return onnx_specs(self.source)
        if self.kind == "hf":
            self._torch_model()
            name = self._hf_output
            seq = ("batch", "sequence")
            out = ("batch", "sequence", "hidden") if name == "last_hidden_state" else ("batch", "features")
            return (TensorSpec("input_ids", "int64", seq), TensorSpec("attention_mask", "int64", seq)), \
                (TensorSpec(name, "float32", out),)
        self._torch_model()
        samples = self._load_samples()
        if samples is None:
            raise ModelSourceError(f"--model {self.source}: a PyTorch factory needs --inputs SAMPLES.npz "
                                   "(one array per input, named as forward() takes them, in that order)")
        inputs = tuple(TensorSpec(n, str(a.dtype), ("batch", *a.shape[1:]))
                       for n, a in samples.items() if n != "labels")
        import torch

        try:
            with torch.no_grad():
                result = self._torch_model()(*(torch.from_numpy(samples[s.name][:1]) for s in inputs))
        except Exception as exc:  # noqa: BLE001 - the user's model on the user's samples: one line
            raise ModelSourceError(f"--model {self.source}: forward() on the first row of --inputs failed: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        result = [result] if isinstance(result, torch.Tensor) else list(result)
        names = ["output"] if len(result) == 1 else [f"output{i}" for i in range(len(result))]
        return inputs, tuple(TensorSpec(n, str(t.numpy().dtype), ("batch", *t.shape[1:])) for n, t in zip(names, result))

    def _load_samples(self) -> dict[str, Any] | None:
        if self.samples_path is None:
            return None
        if self._samples is None:
            import numpy as np

            try:
                with np.load(self.samples_path, allow_pickle=False) as npz:
                    samples = {k: npz[k] for k in npz.files}
            except Exception as exc:  # noqa: BLE001
                raise ModelSourceError(f"--inputs {self.samples_path}: not a readable .npz "
                                       f"({type(exc).__name__})") from None
            for name, value in samples.items():  # a zip member that is no .npy comes back as its bytes
                if not isinstance(value, np.ndarray):
                    raise ModelSourceError(f"--inputs {self.samples_path}: member {name!r} is not an array "
                                           "(an .npz holds .npy arrays only)")
            arrays = {k: v for k, v in samples.items() if k != "labels"}
            if not arrays:
                raise ModelSourceError(f"--inputs {self.samples_path}: holds no input array")
            rows = {len(v) for v in samples.values() if v.ndim > 0}
            if len(rows) != 1 or any(v.ndim == 0 for v in samples.values()):
                raise ModelSourceError(f"--inputs {self.samples_path}: every array needs the same number of rows "
                                       "along axis 0")
            if rows == {0}:
                raise ModelSourceError(f"--inputs {self.samples_path}: holds 0 rows (at least 1 is needed)")
            for name, value in samples.items():  # quality, calibration and timing on NaN mean nothing
                if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
                    bad = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)
                    raise ModelSourceError(f"--inputs {self.samples_path}: {name} holds NaN or infinite values "
                                           f"({int(bad.sum())} of {len(value)} rows, the first row {int(bad.argmax())})"
                                           "; inputs must be finite")
            self._samples = samples
        return self._samples

    def _quality(self) -> str:
        samples = self._load_samples()
        if self.requested_quality != "auto":
            if self.requested_quality == "labels" and (samples is None or "labels" not in samples):
                raise ModelSourceError("model quality 'labels' needs a `labels` array in --inputs")
            return self.requested_quality
        if samples is not None and "labels" in samples:
            return "labels"
        return auto_quality(self.outputs, self._fp32_probe)

    def _fp32_probe(self) -> Any:
        """The fp32 model's first output on a few sample rows (auto quality looks at its values)."""
        feeds = self.sample_inputs(0)
        return self._reference(Dataset({k: v[:DETECTION_PROBE_ROWS] for k, v in feeds.items()}, None))[0]

    def quality_compares(self) -> str:
        """Which parts of the outputs the quality compares, in words (results.json, the terminal)."""
        return compares_text(self.quality_metric, self.outputs, self._layout, self.detection, self._compared)

    def sample_inputs(self, seed: int) -> dict[str, Any]:
        """{input name: array (N, ...)}: the given samples, or random ones at the profile's axis sizes."""
        import numpy as np

        samples = self._load_samples()
        if samples is not None:
            wanted = [s.name for s in self.inputs]
            missing = [n for n in wanted if n not in samples]
            if missing:
                raise ModelSourceError(f"--inputs {self.samples_path}: no array for input(s) {', '.join(missing)} "
                                       f"(it has {', '.join(k for k in samples if k != 'labels')})")
            out = {}
            for spec in self.inputs:
                array = samples[spec.name]
                if str(array.dtype) != spec.dtype:
                    raise ModelSourceError(f"--inputs {self.samples_path}: {spec.name} is {array.dtype}, "
                                           f"the model wants {spec.dtype}")
                wrong = len(array.shape) != len(spec.shape) or any(
                    isinstance(d, int) and d != got for d, got in zip(spec.shape[1:], array.shape[1:]))
                if wrong:  # found now, in one line, not by onnxruntime halfway through the base model
                    want = "(" + ", ".join(map(str, spec.shape)) + ")"
                    raise ModelSourceError(f"--inputs {self.samples_path}: {spec.name} has shape "
                                           f"{tuple(array.shape)}, the model wants {want} (rows first)")
                out[spec.name] = array
            return out
        rng = np.random.default_rng(seed)
        if self.kind == "hf":
            self._torch_model()  # its vocabulary size bounds the random token ids
        out = {}
        for spec in self.inputs:
            shape = [RANDOM_SAMPLES] + [self.axes.get(d, DEFAULT_SEQUENCE if d == "sequence" else 1)
                                        if isinstance(d, str) else d for d in spec.shape[1:]]
            if spec.name == "attention_mask":
                out[spec.name] = np.ones(shape, dtype=spec.dtype)
            elif np.issubdtype(np.dtype(spec.dtype), np.integer):
                high = self._vocab or 10
                out[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
            else:
                out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        return out

    def measure_axes(self, seed: int = 0) -> dict[str, int]:
        """Sizes of the named dynamic axes (batch aside) at which the device times the model: the samples'."""
        sizes = dict(self.axes)
        feeds = self.sample_inputs(seed)
        for spec in self.inputs:
            for i, d in spec.dynamic_axes().items():
                if i > 0 and d not in sizes:
                    sizes[d] = int(feeds[spec.name].shape[i])
        return sizes

    def load_data(self, seed: int) -> dict[str, Dataset]:
        """Calibration: the first half of the samples (at most 128); eval: the rest; labels or fp32 outputs."""
        feeds = self.sample_inputs(seed)
        n = len(next(iter(feeds.values())))
        cut = min(n // 2, 128) if n >= 4 else n
        calibration = {k: v[:cut] for k, v in feeds.items()}
        evaluation = {k: v[cut:] for k, v in feeds.items()} if cut < n else calibration
        samples = self._load_samples()
        if self.train_path and cut < n and not self._train_checked:  # quality is measured on rows no training saw
            train_set_of(self).refuse_overlap(evaluation, [s.name for s in self.inputs])
            self._train_checked = True
        if self.quality_metric == "labels":
            labels = samples["labels"]
            eval_labels = labels[cut:] if cut < n else labels[:cut]
            return {"train": Dataset(calibration, labels[:cut]), "calibration": Dataset(calibration, labels[:cut]),
                    "eval": Dataset(evaluation, eval_labels)}
        import numpy as np

        reference = self._reference(Dataset(evaluation, None))
        if self.quality_metric == "detection":
            self._layout = detection_layout(reference[0].shape)
        self._compared = [f"{o.name} ({ref.shape[1]} channels, each standardised by fp32's mean and spread)"
                          if channel_scales(np.asarray(ref)) is not None else f"{o.name} (as it is)"
                          for o, ref in zip(self.outputs, reference)]
        return {"train": Dataset(calibration, None), "calibration": Dataset(calibration, None),
                "eval": Dataset(evaluation, reference)}

    def _reference(self, data: Dataset) -> list[Any]:
        """The fp32 model's outputs on `data`: what label-free quality compares with."""
        if self.kind == "onnx":

            return onnx_outputs(Path(self.source).read_bytes(), self, data)

        return torch_outputs(self, self._torch_model(), data, batch=16)

    # ------------------------------------------------------------------------------- quality
    def score(self, outputs: list[Any], labels: Any) -> float:
        """The quality named by `quality_metric` (1.0 = the fp32 model's own outputs)."""
        if self.quality_metric == "labels":
            return self.metric(outputs[0], labels)
        return agreement_score(self.quality_metric, outputs, labels, [o.name for o in self.outputs], self._layout,
                               self.detection)


def _call_factory(source: str, search_dir: str | None = None) -> Any:
    """Import package.module and call the factory. `search_dir` (the run's working folder) is tried last
    on the import path, as `python -m` would, but after the installed packages: it never shadows them."""
    module_name, _, attr = source.partition(":")
    if search_dir and search_dir not in sys.path:
        sys.path.append(search_dir)
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ModelSourceError(f"--model {source}: {type(exc).__name__}: {exc}") from None
    except SystemExit as exc:  # its module called sys.exit() on import: the run must not end as a clean exit
        raise ModelSourceError(f"--model {source}: importing {module_name} called sys.exit({exc.code!r}); "
                               "a model module must not exit") from None
    try:
        model = target()
    except SystemExit as exc:  # not Ctrl-C (KeyboardInterrupt goes on): a factory that exits is an error
        raise ModelSourceError(f"--model {source}: the factory called sys.exit({exc.code!r}) instead of returning "
                               "a model") from None
    except Exception as exc:  # noqa: BLE001 - the user's factory: its error, in one line
        raise ModelSourceError(f"--model {source}: the factory raised {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not hasattr(model, "state_dict") or not callable(model):
        raise ModelSourceError(f"--model {source}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _state_digest(model: Any) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
