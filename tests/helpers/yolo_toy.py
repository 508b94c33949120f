"""Models whose outputs structured pruning must keep, made in the test itself: no download.

`yolo_toy`: a small YOLOv8-shaped detector (image [N, 3, 64, 64] -> [N, 4 + 3, 320]). A backbone of
conv + batch norm + SiLU blocks with C2f-style split/concat bottlenecks gives two scales (16x16 and
8x8); each scale has a box branch (3 convs, 4 x 8 distribution bins) and a class branch (3 convs,
3 scores), concatenated and flattened per scale, then concatenated over the scales; the box bins go
through a DFL (softmax over 8 bins, a fixed 1x1 conv of 0..7), become (cx, cy, w, h) in pixels
around the anchor points, and are concatenated with the sigmoid class scores, as YOLOv8 exports them.
`two_outputs`: a backbone with two outputs: an embedding (global pool, Linear) and a map that is the
concat of two 1x1-conv heads (4 + 2 channels).
Weights come from a fixed seed; the class biases start low (as YOLOv8 initialises them) so that a
sample has a few confident anchors, not hundreds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

BINS, CLASSES, SIZE = 8, 3, 64
STRIDES = (4, 8)


def _conv(c1: int, c2: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())


class C2f(nn.Module):
    """YOLOv8's C2f: a 1x1 conv split in two halves, a residual bottleneck on the second, all concatenated."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = _conv(c, c, 1), _conv(c + c // 2, c, 1)
        self.m = nn.Sequential(_conv(c // 2, c // 2), _conv(c // 2, c // 2))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.append(y[-1] + self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss decoding: the expected bin of a softmax over BINS, by a fixed 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(BINS, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(BINS, dtype=torch.float32).view(1, BINS, 1, 1)

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, BINS, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def _init(model: nn.Module) -> None:
    """He-normal convolutions (torch's default shrinks the signal layer by layer: flat scores)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


def _anchors() -> tuple[torch.Tensor, torch.Tensor]:
    points, strides = [], []
    for stride in STRIDES:
        n = SIZE // stride
        ys, xs = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
        points.append(torch.stack([xs.flatten(), ys.flatten()]))
        strides.append(torch.full((1, n * n), float(stride)))
    return torch.cat(points, 1).unsqueeze(0), torch.cat(strides, 1).unsqueeze(0)


class YoloToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(_conv(3, 16, 3, 2), _conv(16, 32, 3, 2), C2f(32))       # 16x16
        self.down = nn.Sequential(_conv(32, 64, 3, 2), C2f(64))                           # 8x8
        self.box = nn.ModuleList(nn.Sequential(_conv(c, 32), _conv(32, 32), nn.Conv2d(32, 4 * BINS, 1)) for c in (32, 64))
        self.cls = nn.ModuleList(nn.Sequential(_conv(c, 32), _conv(32, 32), nn.Conv2d(32, CLASSES, 1)) for c in (32, 64))
        _init(self)
        for i, head in enumerate(self.cls):  # not equal: the ONNX export would share one initializer
            nn.init.constant_(head[-1].bias, -3.0 - 0.1 * i)
        self.dfl = DFL()
        anchors, strides = _anchors()
        self.register_buffer("anchors", anchors)
        self.register_buffer("strides", strides)

    def forward(self, images):
        p3 = self.stem(images)
        p4 = self.down(p3)
        b = images.shape[0]
        x = torch.cat([torch.cat([box(p), cls(p)], 1).view(b, 4 * BINS + CLASSES, -1)
                       for p, box, cls in zip((p3, p4), self.box, self.cls)], 2)
        bins, scores = x.split((4 * BINS, CLASSES), 1)
        lt, rb = self.dfl(bins).chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        boxes = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((boxes, scores.sigmoid()), 1)


def _settle(model: nn.Module) -> nn.Module:
    """Batch-norm statistics from images like `samples`' (a trained model's layers see normalised inputs)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average
    with torch.no_grad():
        model.train()(torch.from_numpy(_images(64, seed=99)))
    return model.eval()


def yolo_toy() -> nn.Module:
    """The factory `--model tests.helpers.yolo_toy:yolo_toy` calls."""
    return _settle(YoloToy())


class TwoOutputs(nn.Module):
    """images -> (embedding [N, 16], concat of two heads [N, 4 + 2, 16, 16])."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(_conv(3, 16, 3, 2), _conv(16, 32, 3, 2), C2f(32), _conv(32, 32))
        self.embed = nn.Linear(32, 16)
        self.head_a, self.head_b = nn.Conv2d(32, 4, 1), nn.Conv2d(32, 2, 1)
        _init(self)

    def forward(self, images):
        x = self.body(images)
        return self.embed(x.mean((2, 3))), torch.cat([self.head_a(x), self.head_b(x).sigmoid()], 1)


def two_outputs() -> nn.Module:
    return _settle(TwoOutputs())


def export(model: nn.Module, path: Path) -> Path:
    """`model` as an ONNX file: input `images` (batch, 3, 64, 64), outputs `output0`, `output1`, ...; batch dynamic."""
    with torch.no_grad():
        out = model(torch.zeros(1, 3, SIZE, SIZE))
    names = [f"output{i}" for i in range(len(out) if isinstance(out, tuple) else 1)]
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, SIZE, SIZE),), str(path), input_names=["images"],
                      output_names=names, dynamic_axes={n: {0: "batch"} for n in ["images", *names]},
                      dynamo=False, opset_version=17)
    proto = onnx.load(str(path))  # the exporter leaves a flattened view's sizes symbolic: static, as YOLOv8's are
    for spec, tensor in zip(proto.graph.output, out if isinstance(out, tuple) else (out,)):
        for dim, size in zip(spec.type.tensor_type.shape.dim[1:], tensor.shape[1:]):
            dim.Clear()
            dim.dim_value = int(size)
    onnx.save(proto, str(path))
    return path


def samples(path: Path, rows: int = 64, seed: int = 0) -> Path:
    """Unlabeled images: smooth random blobs in [0, 1], saved as an .npz named as the model's input."""
    np.savez(path, images=_images(rows, seed))
    return path


def _images(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 1.0, size=(rows, 3, SIZE // 8, SIZE // 8)).astype(np.float32)
    images = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)
    images += rng.normal(0.0, 0.05, size=images.shape).astype(np.float32)
    return np.clip(images, 0.0, 1.0).astype(np.float32)
