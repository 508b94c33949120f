"""Built-in task `digits`: a small ResNet-style CNN on scikit-learn's handwritten digits.

The data ships with scikit-learn (no download): 1,797 8x8 images, upsampled to
32x32 so the network has the shape of a CIFAR ResNet-20. The held-out split is
fixed by the seed. Registered through the `edge_orchestrator` entry point, exactly
as a third-party task would be.
"""

from __future__ import annotations

from typing import Any

from orchestrator import Dataset, Task, distillation_loss, hookimpl, train_epochs

CALIBRATION_SIZE = 128
EVAL_FRACTION = 0.2


def _build_resnet(widths: list[int], depths: list[int], kernel: int, num_classes: int, in_channels: int) -> Any:
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            pad = kernel // 2
            self.conv1 = nn.Conv2d(cin, cout, kernel, stride, pad, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, kernel, 1, pad, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):  # noqa: D102
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
            )
            layers, cin = [], widths[0]
            for stage, (width, depth) in enumerate(zip(widths, depths)):
                for block in range(depth):
                    layers.append(BasicBlock(cin, width, 2 if stage > 0 and block == 0 else 1))
                    cin = width
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):  # noqa: D102
            return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))

    return ResNet()


class DigitsTask(Task):
    """ResNet-20-style CNN on sklearn's digits, 32x32 grey images, 10 classes."""

    name = "digits"
    version = "1"
    description = "ResNet-20-style CNN on scikit-learn's digits (8x8 upsampled to 32x32), 10 classes"
    input_name = "input"
    input_shape = (1, 32, 32)
    default_arch = {"widths": [16, 32, 64], "depths": [3, 3, 3], "kernel": 3}
    train_epochs = 12
    num_classes = 10

    def build(self, arch: dict[str, Any] | None = None) -> Any:
        """An untrained model; `arch` may set widths (3 ints), depths (3 ints) and kernel (3 or 5)."""
        a = {**self.default_arch, **(arch or {})}
        if len(a["widths"]) != 3 or len(a["depths"]) != 3 or a["kernel"] not in (3, 5):
            raise ValueError(f"digits: bad architecture {a}")
        return _build_resnet(list(a["widths"]), list(a["depths"]), int(a["kernel"]), self.num_classes, 1)

    def scaled_arch(self, width_mult: float = 1.0, depth: int | None = None) -> dict[str, Any]:
        """The default ResNet with every stage's width times `width_mult` (a multiple of 4) and `depth` blocks."""
        if not 0 < width_mult <= 4:
            raise ValueError(f"digits: width_mult must be in (0, 4], got {width_mult!r}")
        if depth is not None and not (isinstance(depth, int) and 1 <= depth <= 9):
            raise ValueError(f"digits: depth must be an integer from 1 to 9 blocks per stage, got {depth!r}")
        a = self.default_arch
        # Multiples of 4 keep channel counts friendly to vectorised convolution kernels.
        widths = [max(4, round(w * width_mult / 4) * 4) for w in a["widths"]]
        depths = list(a["depths"]) if depth is None else [depth] * len(a["depths"])
        return {"widths": widths, "depths": depths, "kernel": a["kernel"]}

    def load_data(self, seed: int) -> dict[str, Dataset]:
        """Train / calibration (a slice of train) / eval (20% held out, stratified, fixed by seed)."""
        import numpy as np
        import torch
        import torch.nn.functional as F
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
        images = ((images - 0.3) / 0.4).numpy().astype(np.float32)
        labels = digits.target.astype(np.int64)
        x_train, x_eval, y_train, y_eval = train_test_split(
            images, labels, test_size=EVAL_FRACTION, stratify=labels, random_state=seed
        )
        return {
            "train": Dataset(x_train, y_train),
            "calibration": Dataset(x_train[:CALIBRATION_SIZE], y_train[:CALIBRATION_SIZE]),
            "eval": Dataset(x_eval, y_eval),
        }

    def train(self, model: Any, data: Dataset, epochs: int, seed: int,
              teacher: Any = None, temperature: float = 4.0, alpha: float = 0.5) -> Any:
        """SGD with a one-cycle schedule and small random shifts; distils from `teacher` when given."""
        import torch
        import torch.nn.functional as F

        if epochs <= 0:
            return model
        gen = torch.Generator().manual_seed(seed)
        x = torch.from_numpy(data.inputs)
        y = torch.from_numpy(data.labels)
        batch = 64
        steps = epochs * ((len(y) + batch - 1) // batch)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)

        def loss(idx: Any) -> Any:
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            logits = model(xb)
            if teacher is None:
                return F.cross_entropy(logits, y[idx])
            with torch.no_grad():
                teacher_logits = teacher(xb)
            return distillation_loss(logits, teacher_logits, y[idx], temperature, alpha)

        if teacher is not None:
            teacher.eval()
        model.train()
        train_epochs(model, opt, epochs, lambda _: torch.randperm(len(y), generator=gen).split(batch), loss,
                     scheduler=sched)
        model.eval()
        return model


@hookimpl
def register_tasks(register):
    """Register the built-in `digits` task."""
    register(DigitsTask())
