"""Built-in hardware-aware architecture search (stage `architecture`).

`nas` searches the task's model family (width multiplier, blocks per stage, kernel
size) and trains each architecture briefly with the base model as teacher. It is
hardware-aware through the orchestrator's per-device latency predictor: it declares
the architecture it will build (`architecture()`, untrained and cheap), the search
predicts that architecture's latency on the device from the device's own earlier
measurements, and skips it before any training when the prediction breaks the
profile's latency constraint. The search algorithm itself (grid or Optuna through
Ray Tune) is the orchestrator's: this plugin only defines the space and the training.
"""

from __future__ import annotations

from typing import Any

from orchestrator import Technique, choice, hookimpl


class ArchitectureSearch(Technique):
    """A member of the task's model family, trained briefly from the base model as teacher."""

    name = "nas"
    stage = "architecture"
    version = "1"
    description = "hardware-aware architecture search over the task's family (width, depth, kernel), distilled briefly"
    search_space = {
        "width": choice([0.5, 0.75, 1.0]),   # width multiplier of every stage
        "depth": choice([1, 2, 3]),          # blocks per stage
        "kernel": choice([3, 5]),            # convolution kernel size in the blocks
        "epochs": choice([4, 8]),            # brief training, distilled from the base model
    }
    defaults = {"temperature": 4.0, "alpha": 0.7}
    incompatible_with = ("distill",)         # both decide the architecture

    def recommended(self, device: Any) -> list[dict[str, Any]]:
        """The smallest member with 3x3 kernels and the longer training: a fast start for the predictor."""
        return [{"width": 0.5, "depth": 1, "kernel": 3, "epochs": 8}]

    def invalid(self, params: dict[str, Any]) -> str | None:
        """alpha (the weight of the soft-target loss) must be in [0, 1]."""
        if not 0 <= params["alpha"] <= 1:
            return f"alpha must be in [0, 1], got {params['alpha']}"
        return None

    def architecture(self, params: dict[str, Any], ctx: Any) -> Any:
        """The untrained model this technique will train (cheap: used to predict latency before training)."""
        arch = ctx.task.scaled_arch(params["width"], params["depth"])
        if "kernel" in arch:
            arch["kernel"] = params["kernel"]
        return ctx.task.build(arch)

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """Build the architecture and train it with `ctx.teacher` (the base model) as teacher."""
        import torch

        from plugins._batchnorm import recalibrate_batch_norm

        torch.manual_seed(ctx.seed)
        student = self.architecture(params, ctx)
        ctx.fine_tune(student, params["epochs"], teacher=ctx.teacher,
                      temperature=float(params["temperature"]), alpha=float(params["alpha"]))
        recalibrate_batch_norm(student, ctx.task, ctx.data["train"])
        return student.eval()


@hookimpl
def register_techniques(register):
    """Register the built-in architecture search technique."""
    register(ArchitectureSearch())
