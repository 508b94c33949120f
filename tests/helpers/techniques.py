"""The technique tests' tiny setting: a small digits architecture, a context on random samples, the ONNX contract."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from orchestrator.api import Dataset, TechniqueContext
from orchestrator.config.profile import load_profile
from orchestrator.search.pipeline import export_onnx
from plugins.digits import DigitsTask
from tests.helpers import ROOT

TINY_ARCH = {"widths": [4, 8, 8], "depths": [1, 1, 1], "kernel": 3}


def tiny_context(tmp_path, teacher, samples: int = 64) -> TechniqueContext:
    """A TechniqueContext on the digits task with a few random samples (training is then a blink)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, 1, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, samples).astype(np.int64)
    data = {name: Dataset(x, y) for name in ("train", "calibration", "eval")}
    return TechniqueContext(task=DigitsTask(), data=data, teacher=teacher,
                            profile=load_profile(ROOT / "device_profiles" / "x86-host.yaml").profile,
                            scratch_dir=tmp_path, seed=0)


def params_count(model) -> int:
    """The number of parameters of a torch model."""
    return sum(p.numel() for p in model.parameters())


def check_contract(task, model, x) -> np.ndarray:
    """Exports to ONNX, runs in onnxruntime with the task's input name and shape; returns the logits."""
    session = ort.InferenceSession(export_onnx(task, model), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == task.input_name and inp.shape[1:] == list(task.input_shape)
    logits = session.run(None, {inp.name: x})[0]
    assert logits.shape == (len(x), 10)
    return logits
