"""Structured pruning of any CNN keeps every output (issue 29 item 2): detector heads and concatenated outputs.

The layers whose channels a model output is made of are found on torch-pruning's dependency graph
(plugins/_keep_outputs.py) and kept whole; everything else loses channels. A YOLOv8-shaped toy
detector (tests/helpers/yolo_toy.py: two scales, box and class branches per scale, DFL, a final
concat of pixel boxes and sigmoid scores) is pruned as a torch module and as an ONNX file converted
with onnx2torch, through the pipeline; a model with two outputs, one a concat of two heads, likewise.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch_pruning as tp

from orchestrator.config.profile import load_profile
from orchestrator.hooks.manager import get_plugin_manager
from orchestrator.models.onnxconvert import _onnx2torch
from orchestrator.models.ownmodel import OwnModelTask
from orchestrator.search.pipeline import build_candidate, evaluate_onnx
from plugins._keep_outputs import protected_layers
from plugins.pruning import PruneStructured, output_layers
from tests.helpers import yolo_toy
from tests.helpers.own_models import small_cnn

ROOT = Path(__file__).resolve().parents[1]
X86 = ROOT / "device_profiles" / "x86-host.yaml"
FACTORY = "tests.helpers.yolo_toy:yolo_toy"
HEADS = {"box.0.2", "box.1.2", "cls.0.2", "cls.1.2", "dfl.conv"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("prune-detector")
    return {"detector": yolo_toy.export(yolo_toy.yolo_toy(), folder / "det.onnx"),
            "two": yolo_toy.export(yolo_toy.two_outputs(), folder / "two.onnx"),
            "samples": yolo_toy.samples(folder / "samples.npz")}


def _converted(path: Path) -> torch.nn.Module:
    return _onnx2torch().convert(str(path)).eval()


def _names(model: torch.nn.Module, layers: list) -> set[str]:
    by_id = {id(m): n for n, m in model.named_modules()}
    return {by_id[id(m)] for m in layers}


def _images(rows: int = 2) -> torch.Tensor:
    return torch.from_numpy(yolo_toy._images(rows, seed=5))


def _apply(model: torch.nn.Module, images: torch.Tensor, ratio: float) -> torch.nn.Module:
    """prune-structured's apply with the little of a TechniqueContext it reads at 0 epochs."""
    task = types.SimpleNamespace(feeds=lambda rows: rows,
                                 input_specs=lambda: [types.SimpleNamespace(name="images", dtype="float32")])
    ctx = types.SimpleNamespace(task=task, calibration_batches=lambda n: [{"images": images[:1].numpy()}])
    technique = PruneStructured()
    params = technique.check_params({"ratio": ratio, "importance": "l1", "scope": "layer", "epochs": 0,
                                     "recalibrate_bn": False})
    return technique.apply(model, params, ctx)


def _shapes(out) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))]


def _macs_params(model: torch.nn.Module, images: torch.Tensor) -> tuple[float, int]:
    macs, params = tp.utils.count_ops_and_params(model, images[:1])
    return macs, params


def test_the_layers_every_output_is_made_of_are_found_on_the_graph(files):
    image = _images(1)
    detector = yolo_toy.yolo_toy()
    # each scale's last box and class convolution feed the final concat; the DFL's fixed convolution decodes
    # the box bins, and the box branch reaches it through a reshape, so neither side may lose a channel
    assert _names(detector, output_layers(detector, image)) == HEADS
    # to prune structurally, also the C2f blocks' second bottleneck: its output is added to one half of a split,
    # which torch-pruning maps onto the whole (its YOLOv8 example rewrites C2f for this)
    assert _names(detector, protected_layers(detector, image)) == HEADS | {"stem.2.m.1.0", "down.1.m.1.0"}
    two = yolo_toy.two_outputs()
    assert _names(two, output_layers(two, image)) == {"embed", "head_a", "head_b"}
    # a classifier: its last Linear only, also once converted from ONNX (a Gemm)
    cnn = small_cnn()
    assert output_layers(cnn, torch.zeros(1, 3, 16, 16)) == [cnn[-1]]
    converted = _converted(files["detector"])
    assert {n.split("/")[0] + "." + ".".join(n.split("/")[-2:-1]) for n in _names(converted, output_layers(converted, image))} \
        == {"box.2", "cls.2", "dfl.conv"}


@pytest.mark.parametrize("form", ["torch", "onnx"])
def test_a_detector_pruned_keeps_its_output_and_is_smaller_at_each_ratio(files, form):
    images = _images()
    base = yolo_toy.yolo_toy() if form == "torch" else _converted(files["detector"])
    with torch.no_grad():
        want = _shapes(base(images))
    assert want == [(2, 7, 320)]
    macs, params = _macs_params(base, images)
    for ratio in (0.25, 0.5):
        pruned = _apply(base, images, ratio)
        with torch.no_grad():
            assert _shapes(pruned(images)) == want
        pruned_macs, pruned_params = _macs_params(pruned, images)
        keep = (1 - ratio) ** 2  # a layer between two pruned ones keeps (1 - ratio)^2 of its weights
        assert pruned_params < (keep + 0.08) * params and pruned_macs < (keep + 0.08) * macs, \
            (ratio, pruned_params / params, pruned_macs / macs)
    # the heads kept their output channels (4 x 8 bins, 3 classes); the branch convolutions before them lost theirs
    heads = sorted((m.out_channels, m.in_channels) for n, m in pruned.named_modules()  # box.0.2 or box/0/box/0/2/Conv
                   if isinstance(m, torch.nn.Conv2d) and n.startswith(("box", "cls")) and n.replace("/Conv", "").endswith("2"))
    assert heads == [(3, 16), (3, 16), (32, 16), (32, 16)], heads


def test_a_model_with_two_outputs_one_a_concat_of_two_heads_keeps_both(files):
    images = _images()
    for base in (yolo_toy.two_outputs(), _converted(files["two"])):
        with torch.no_grad():
            want = _shapes(base(images))
        assert want == [(2, 16), (2, 6, 16, 16)]
        pruned = _apply(base, images, 0.5)
        with torch.no_grad():
            assert _shapes(pruned(images)) == want
        assert _macs_params(pruned, images)[1] < 0.4 * _macs_params(base, images)[1]


@pytest.mark.parametrize("form", ["torch", "onnx"])
def test_a_detector_is_pruned_through_the_pipeline_and_scored_by_detection_f1(files, form):
    source = FACTORY if form == "torch" else str(files["detector"])
    task = OwnModelTask(source, str(files["samples"]))
    assert task.quality_metric == "detection"  # the ONNX file's and the module's output: (batch, 4 + 3, 320)
    base = task.build(None)
    data = task.load_data(0)
    ctx = {"data": data, "profile": load_profile(X86).profile, "seed": 0}
    pruned, info = build_candidate(get_plugin_manager(), task, base, [
        {"technique": "prune-structured", "params": {"ratio": 0.5, "importance": "l1", "scope": "layer",
                                                     "epochs": 0}}], ctx)
    assert "prune-structured" in info["build_seconds"] and "export" in info["build_seconds"]
    session = ort.InferenceSession(pruned)
    rows = data["eval"].rows(0, 4)
    feeds = task.feeds(rows)
    (out,) = session.run(None, feeds)
    assert out.shape == (4, 7, 320)
    fp32 = base if isinstance(base, onnx.ModelProto) else None
    size = sum(int(np.prod(t.dims)) for t in onnx.load_from_string(pruned).graph.initializer)
    full = sum(p.numel() for p in yolo_toy.yolo_toy().parameters())
    assert size < 0.4 * full, (size, full)
    quality = evaluate_onnx(task, pruned, data["eval"])  # detection F1 against fp32's detections
    # the module keeps batch norm, recalibrated after the cut: some detections survive without fine-tuning; the
    # converted file has it folded into the convolutions, nothing to recalibrate (docs/techniques.md: measured)
    assert 0.0 < quality <= 1.0 if form == "torch" else 0.0 <= quality <= 1.0
    assert fp32 is None or [o.name for o in session.get_outputs()] == ["output0"]
