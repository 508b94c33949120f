"""A detector-shaped toy model (YOLOv8's output layout), made in the test itself: no download.

`ToyDetector`: features (N, 6, 96) -> (N, 4 + 3, 96): per anchor, 4 box coordinates in pixels
(cx, cy, w, h; 0-320) and 3 class scores (sigmoid, 0-1), concatenated along the channels as
YOLOv8 exports them. Its weights come from a fixed seed; the samples are features drawn so that
each sample has a few confident anchors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CHANNELS, ANCHORS, CLASSES = 6, 96, 3


class ToyDetector(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.box = torch.nn.Conv1d(CHANNELS, 4, 1)
        self.cls = torch.nn.Conv1d(CHANNELS, CLASSES, 1)
        self.register_buffer("pixels", torch.tensor([320.0, 320.0, 80.0, 80.0]).reshape(1, 4, 1))

    def forward(self, features):
        boxes = torch.sigmoid(self.box(features)) * self.pixels
        scores = torch.sigmoid(3.0 * self.cls(features) - 2.0)
        return torch.cat([boxes, scores], dim=1)


def export(path: Path) -> Path:
    """The toy detector as an ONNX file (input `features`, output `output0` (batch, 7, 96), static)."""
    torch.onnx.export(ToyDetector().eval(), (torch.zeros(1, CHANNELS, ANCHORS),), str(path), input_names=["features"],
                      output_names=["output0"], dynamic_axes={"features": {0: "batch"}, "output0": {0: "batch"}},
                      dynamo=False)
    return path


def samples(path: Path, rows: int = 48, seed: int = 0) -> Path:
    """Unlabeled features: `rows` samples, saved as an .npz named as the model's input."""
    rng = np.random.default_rng(seed)
    np.savez(path, features=rng.normal(0.0, 1.0, size=(rows, CHANNELS, ANCHORS)).astype(np.float32))
    return path
