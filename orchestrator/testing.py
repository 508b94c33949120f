"""pytest fixtures for plugin authors: a tiny real task, a local device, a registry with your plugin.

Installed as a pytest plugin (entry point `pytest11`), so in a plugin's own tests:

    def test_my_technique(eo_plugin_registry, eo_technique_context, eo_tiny_onnx, eo_local_device):
        registry = eo_plugin_registry(my_package)        # built-ins + your plugin
        technique = registry.technique("my-technique")
        params = technique.check_params({"clusters": 16})
        out = technique.apply(eo_tiny_onnx(), params, eo_technique_context)
        assert eo_local_device(out.SerializeToString())["latency_ms"]["p50"] > 0

Every fixture's name starts with `eo_`, so none collides with a fixture of the plugin's own.

The tiny task is real: scikit-learn's 8x8 digits (shipped with scikit-learn) and a
residual CNN that trains to about 90% in a few seconds.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest

from orchestrator.api import (
    Dataset,
    DeviceFacts,
    Task,
    Technique,
    TechniqueContext,
    distillation_loss,
)
from orchestrator.config.profile import Profile
from orchestrator.devices.local import LocalTransport
from orchestrator.devices.local import local_device as _local
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.models.training import train_epochs
from orchestrator.search.pipeline import evaluate_onnx, export_onnx


class TinyDigitsTask(Task):
    """Native 8x8 digits and a small CNN with a residual block; knobs: width (int), blocks (int)."""

    name = "tiny-digits"
    version = "1"
    description = "8x8 digits, tiny residual CNN (for plugin tests)"
    input_name = "input"
    input_shape = (1, 8, 8)
    default_arch = {"width": 8, "blocks": 1}
    train_epochs = 5

    def build(self, arch: dict[str, Any] | None = None) -> Any:
        """A tiny residual CNN; `width` channels, `blocks` residual blocks."""
        import torch.nn as nn

        a = {**self.default_arch, **(arch or {})}
        width, blocks = int(a["width"]), int(a["blocks"])

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv2d(width, width, 3, padding=1)
                self.conv2 = nn.Conv2d(width, width, 3, padding=1)
                self.relu = nn.ReLU()

            def forward(self, x):  # noqa: D102
                return self.relu(x + self.conv2(self.relu(self.conv1(x))))

        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), *[Block() for _ in range(blocks)],
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(width * 4, 10))

    def scaled_arch(self, width_mult: float = 1.0, depth: int | None = None) -> dict[str, Any]:
        """`width` scaled by `width_mult`; `depth` residual blocks."""
        return {"width": max(2, round(self.default_arch["width"] * width_mult)),
                "blocks": self.default_arch["blocks"] if depth is None else depth}

    def load_data(self, seed: int) -> dict[str, Dataset]:
        """Train / calibration / eval splits of the 8x8 digits (eval 20%, fixed by seed)."""
        import numpy as np
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = ((digits.images.astype(np.float32) / 16.0 - 0.3) / 0.4)[:, None]
        y = digits.target.astype(np.int64)
        xt, xe, yt, ye = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
        return {"train": Dataset(xt, yt), "calibration": Dataset(xt[:64], yt[:64]), "eval": Dataset(xe, ye)}

    def train(self, model: Any, data: Dataset, epochs: int, seed: int,
              teacher: Any = None, temperature: float = 4.0, alpha: float = 0.5) -> Any:
        """Adam, batch 64; distils from `teacher` when given."""
        import torch
        import torch.nn.functional as F

        gen = torch.Generator().manual_seed(seed)
        x, y = torch.from_numpy(data.inputs), torch.from_numpy(data.labels)

        def loss(idx: Any) -> Any:
            logits = model(x[idx])
            if teacher is None:
                return F.cross_entropy(logits, y[idx])
            with torch.no_grad():
                teacher_logits = teacher(x[idx])
            return distillation_loss(logits, teacher_logits, y[idx], temperature, alpha)

        model.train()
        train_epochs(model, torch.optim.Adam(model.parameters(), lr=0.01), epochs,
                     lambda _: torch.randperm(len(y), generator=gen).split(64), loss)
        return model.eval()


@pytest.fixture(scope="session")
def eo_tiny_task() -> TinyDigitsTask:
    """The tiny real task."""
    return TinyDigitsTask()


@pytest.fixture(scope="session")
def eo_tiny_data(eo_tiny_task: TinyDigitsTask) -> dict[str, Dataset]:
    """Its data splits (seed 0)."""
    return eo_tiny_task.load_data(0)


@pytest.fixture(scope="session")
def _eo_trained_tiny_model(eo_tiny_task: TinyDigitsTask, eo_tiny_data: dict[str, Dataset]) -> Any:
    import torch

    torch.manual_seed(0)
    return eo_tiny_task.train(eo_tiny_task.build(), eo_tiny_data["train"], epochs=eo_tiny_task.train_epochs, seed=0)


@pytest.fixture
def eo_tiny_model(_eo_trained_tiny_model: Any) -> Any:
    """A trained tiny model (a fresh copy per test, so a technique may change it)."""
    return copy.deepcopy(_eo_trained_tiny_model)


@pytest.fixture
def eo_tiny_onnx(eo_tiny_task: TinyDigitsTask, _eo_trained_tiny_model: Any) -> Callable[[], Any]:
    """Call it for the trained tiny model as an onnx.ModelProto (input `input`, output `logits`)."""
    import onnx


    return lambda: onnx.load_from_string(export_onnx(eo_tiny_task, copy.deepcopy(_eo_trained_tiny_model)))


@pytest.fixture
def eo_technique_context(eo_tiny_task: TinyDigitsTask, eo_tiny_data: dict[str, Dataset], _eo_trained_tiny_model: Any,
                         tmp_path: Path) -> TechniqueContext:
    """The `ctx` a technique receives, for the tiny task (the x86-host profile, seed 0)."""
    profile = Profile.model_validate({
        "name": "plugin-test", "hardware": {"arch": "x86_64", "cpu": "test", "cores": 1, "memory_mb": 1024},
        "objective": {"metric": "latency_p50"},
        "power": {"idle_watts": 1.0, "active_watts": 2.0, "source": "test fixture, not a real board"},
    })
    return TechniqueContext(task=eo_tiny_task, data=eo_tiny_data, teacher=copy.deepcopy(_eo_trained_tiny_model),
                            profile=profile, scratch_dir=tmp_path, seed=0)


@pytest.fixture
def eo_evaluate(eo_tiny_task: TinyDigitsTask, eo_tiny_data: dict[str, Dataset]) -> Callable[[Any], float]:
    """Call it with ONNX bytes or a ModelProto: held-out accuracy with onnxruntime."""

    def _evaluate(model: Any) -> float:
        data = model if isinstance(model, bytes) else model.SerializeToString()
        return evaluate_onnx(eo_tiny_task, data, eo_tiny_data["eval"])

    return _evaluate


@pytest.fixture
def eo_local_device() -> Callable[[bytes], dict[str, Any]]:
    """Call it with ONNX bytes: the real agent measures them on this machine (quick protocol)."""
    profile = Profile.model_validate({
        "name": "plugin-test", "hardware": {"arch": "x86_64", "cpu": "test", "cores": 1, "memory_mb": 1024},
        "objective": {"metric": "latency_p50"}, "measurement": {"warmup_runs": 3, "runs": 30, "time_budget_s": 2},
        "power": {"idle_watts": 1.0, "active_watts": 2.0, "source": "test fixture, not a real board"},
    })
    transport = LocalTransport(_local())
    return lambda model_bytes: transport.bench(model_bytes, profile)


@pytest.fixture
def eo_plugin_registry() -> Callable[..., Any]:
    """Call it with your plugin module(s): a registry with the installed plugins plus yours."""

    def _registry(*plugins: Any) -> Any:
        registry = get_plugin_manager()
        for plugin in plugins:
            if registry.pm.is_registered(plugin):  # already installed through its entry point
                name = registry.pm.get_name(plugin)
            else:
                name = getattr(plugin, "__name__", type(plugin).__name__)
                registry.add_plugin(plugin, name)
            if registry.plugins[name].error:
                raise AssertionError(f"plugin {name} is broken: {registry.plugins[name].error}")
        return registry

    return _registry


#: The devices `eo_recommendations` asks a technique about (what their agents' `info` would report).
RECOMMENDATION_DEVICES = {
    "x86-64 AVX2": DeviceFacts("x86_64", frozenset({"avx2"})),
    "x86-64 AVX-512 VNNI": DeviceFacts("x86_64", frozenset({"avx2", "avx512f", "avx512_vnni"})),
    "Cortex-A72 (rpi4)": DeviceFacts("aarch64", frozenset({"asimd"})),
    "Cortex-A76 (rpi5)": DeviceFacts("aarch64", frozenset({"asimd", "asimddp", "asimdhp", "fphp"})),
    "Jetson TensorRT": DeviceFacts("aarch64", frozenset({"asimd", "asimddp"}),
                                   ("TensorrtExecutionProvider", "CUDAExecutionProvider")),
    "Jetson CUDA": DeviceFacts("aarch64", frozenset({"asimd"}), ("CUDAExecutionProvider",)),
    # a transformer's graph (MatMul, no Conv): some techniques recommend differently for one
    "x86-64 AVX-512 VNNI, transformer": DeviceFacts("x86_64", frozenset({"avx2", "avx512f", "avx512_vnni"}),
                                                    model_ops=frozenset({"MatMul", "Softmax", "Gather"})),
    "Cortex-A76 (rpi5), transformer": DeviceFacts("aarch64", frozenset({"asimd", "asimddp", "asimdhp", "fphp"}),
                                                  model_ops=frozenset({"MatMul", "Softmax", "Gather"})),
}


@pytest.fixture
def eo_recommendations() -> Callable[[Technique], dict[str, list[dict[str, Any]]]]:
    """Ask a technique for its recommended configurations on a range of devices and check them.

    Each recommendation must pass `check_params` (inside the search space, valid); returns
    {device label: [full params, ...]} for the test's own assertions.
    """
    def check(technique: Technique) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for label, device in RECOMMENDATION_DEVICES.items():
            recommendations = technique.recommended(device)
            assert isinstance(recommendations, list), f"{technique.name}.recommended({label}) must return a list"
            out[label] = [technique.check_params(dict(params)) for params in recommendations]
        return out

    return check
