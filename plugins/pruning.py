"""Built-in pruning techniques (stage `training`).

`prune-structured` removes whole channels with torch-pruning's dependency graph: every
layer coupled to a pruned channel (the batch norm after a convolution, the next
convolution's inputs, both sides of a residual addition) loses the same channel, so
the model stays consistent and is really smaller. Every output keeps its shape: the layers whose
channels an output is made of (a classifier's last Linear, each head of a detector feeding its
final concat) are found on the dependency graph and kept whole (plugins/_keep_outputs.py).

`prune-magnitude` zeroes the smallest weights (unstructured). The tensors keep their
shapes, so onnxruntime on a CPU runs it exactly as fast as the dense model; what it
gives is a model that compresses (see `compressed_size_bytes` in a candidate's build
info) and a sparse starting point for runtimes that exploit sparsity.

Both fine-tune afterwards with the task's own training (`ctx.fine_tune`), for a
budget given in epochs, and that time is reported as `<technique>.fine_tune`.
"""

from __future__ import annotations

from typing import Any

from orchestrator import Technique, choice, hookimpl
from plugins._batchnorm import recalibrate_batch_norm
from plugins._keep_outputs import output_walk, protected_layers


def _weight_layer_types() -> tuple[type, ...]:
    import torch

    return (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def _check_bool(params: dict[str, Any], key: str) -> str | None:
    if not isinstance(params.get(key), bool):
        return f"{key} must be true or false, got {params.get(key)!r}"
    return None


def example_input(ctx: Any) -> Any:
    """One real input row for tracing the model (a tensor, or a tuple for a model of several inputs).

    From the calibration split, so a model brought with `--model` (named, typed inputs with
    dynamic axes) is traced as it runs; zeros of the task's `input_shape` when there is none.
    """
    import numpy as np
    import torch

    rows = ctx.calibration_batches(1)
    if not rows:
        return torch.zeros((1, *ctx.task.input_shape), dtype=torch.float32)
    feeds = ctx.task.feeds(rows[0])
    tensors = [torch.from_numpy(np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype))
               for spec in ctx.task.input_specs()]
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def output_layers(model: Any, example: Any) -> list[Any]:
    """The Conv/Linear layers (and any other channel-making layer) whose outputs a model output is made of:
    a classifier's last Linear; every head of a detector (plugins/_keep_outputs.py). Never pruned."""
    layers = output_walk(model, example)[2]
    if not any(isinstance(m, _weight_layer_types()) for m in model.modules()):
        raise ValueError("the model has no Conv or Linear layer to prune")
    return layers


def _shapes(model: Any, example: Any) -> list[tuple[int, ...]]:
    import torch

    with torch.no_grad():
        out = model.eval()(*example) if isinstance(example, tuple) else model.eval()(example)
    out = [out] if isinstance(out, torch.Tensor) else list(out.values()) if isinstance(out, dict) else list(out)
    return [tuple(t.shape) for t in out if isinstance(t, torch.Tensor)]


class PruneStructured(Technique):
    """Channel pruning with torch-pruning's DependencyGraph, then fine-tuning."""

    name = "prune-structured"
    stage = "training"
    version = "1"
    description = "structured channel pruning (torch-pruning dependency graph; L1/L2/Taylor), then fine-tuning"
    search_space = {
        "ratio": choice([0.25, 0.5, 0.75]),         # share of channels removed in every prunable group
        "importance": choice(["l1", "l2", "taylor"]),
        "scope": choice(["layer", "global"]),         # same ratio everywhere, or ranked across the network
        "epochs": choice([0, 1, 2, 4]),               # fine-tuning budget
    }
    # round_to: channel counts stay multiples of this (vectorised kernels like them);
    # taylor_samples: training samples whose loss gradient scores channels for `taylor`;
    # recalibrate_bn: re-estimate batch-norm statistics on the training inputs at the end.
    defaults = {"round_to": 4, "taylor_samples": 256, "recalibrate_bn": True}
    needs_labels = {"importance": ("taylor",)}  # a loss's gradient ranks the channels: labels needed
    # Fine-tuning would regrow the zeros of unstructured pruning: magnitude pruning goes last.
    cannot_follow = ("prune-magnitude",)

    def recommended(self, device: Any) -> list[dict[str, Any]]:
        """Half the channels by L1 norm, layer by layer, with four epochs of fine-tuning (two left the
        demo task 1-2 points short; four recover it to within one): 3.9x smaller and ~3x faster.
        Fewer channels help every runtime, so this is recommended everywhere."""
        return [{"ratio": 0.5, "importance": "l1", "scope": "layer", "epochs": 4}]

    def invalid(self, params: dict[str, Any]) -> str | None:
        """round_to and taylor_samples must be positive integers."""
        for key in ("round_to", "taylor_samples"):
            value = params.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"{key} must be an integer >= 1, got {value!r}"
        return _check_bool(params, "recalibrate_bn")

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """Prune a copy of the torch model, fine-tune it, return it (in eval mode)."""
        import copy

        import numpy as np
        import torch
        import torch.nn.functional as F
        import torch_pruning as tp

        model = copy.deepcopy(model).eval()
        example = example_input(ctx)
        shapes = _shapes(model, example)
        # every head whose channels an output is made of, and every group torch-pruning cannot cut cleanly
        keep = protected_layers(model, example)
        importance = {
            "l1": lambda: tp.importance.MagnitudeImportance(p=1),
            "l2": lambda: tp.importance.MagnitudeImportance(p=2),
            "taylor": lambda: tp.importance.GroupTaylorImportance(),
        }[params["importance"]]()
        pruner = tp.pruner.BasePruner(
            model, example if isinstance(example, tuple) else (example,), importance=importance,
            pruning_ratio=float(params["ratio"]),
            global_pruning=params["scope"] == "global",
            # Global ranking may empty a whole layer; keep at least a tenth of every group.
            max_pruning_ratio=0.9,
            ignored_layers=keep,
            round_to=params["round_to"],
        )
        if params["importance"] == "taylor":
            train = ctx.data["train"]
            if train.labels is None or not np.issubdtype(np.asarray(train.labels).dtype, np.integer):
                # the run leaves taylor out for unlabeled samples (needs_labels); a direct call says why
                raise ValueError("importance 'taylor' needs labelled training samples (class ids): the "
                                 "gradient of a loss ranks the channels; use l1 or l2")
            n = params["taylor_samples"]
            feeds = ctx.task.feeds(train.rows(0, n))
            inputs = [torch.from_numpy(np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype))
                      for spec in ctx.task.input_specs()]
            y = torch.from_numpy(np.asarray(train.labels[:n], dtype=np.int64))
            model.zero_grad()
            F.cross_entropy(model(*inputs), y).backward()  # eval mode: batch-norm statistics stay untouched
        before = sum(p.numel() for p in model.parameters())
        pruner.step()
        model.zero_grad(set_to_none=True)
        if sum(p.numel() for p in model.parameters()) == before:
            raise ValueError(f"nothing to prune at ratio {params['ratio']} with channels rounded to "
                             f"multiples of {params['round_to']}: the layers are too narrow")
        if _shapes(model, example) != shapes:  # the protection above is meant to make this impossible
            raise ValueError(f"pruning changed the model's output shapes from {shapes} to {_shapes(model, example)}")
        if params["epochs"]:
            ctx.fine_tune(model, params["epochs"])
        if params["recalibrate_bn"]:
            recalibrate_batch_norm(model, ctx.task, ctx.data["train"])
        return model.eval()


class PruneMagnitude(Technique):
    """Unstructured magnitude pruning: the smallest weights become exact zeros, shapes unchanged."""

    name = "prune-magnitude"
    stage = "training"
    version = "1"
    description = ("unstructured magnitude pruning (weights zeroed, shapes kept): smaller compressed, "
                   "not faster on dense runtimes")
    search_space = {
        "sparsity": choice([0.5, 0.7, 0.9]),   # share of Conv/Linear weights set to zero
        "scope": choice(["layer", "global"]),  # same share in every layer, or smallest across the network
        "epochs": choice([0, 1]),              # fine-tuning with the zeros held (masks on)
    }
    defaults = {"recalibrate_bn": True}  # re-estimate batch-norm statistics on the training inputs at the end

    def invalid(self, params: dict[str, Any]) -> str | None:
        """recalibrate_bn must be a boolean."""
        return _check_bool(params, "recalibrate_bn")

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """Zero the smallest weights of a copy (all Conv/Linear but the output layers), fine-tune, make it permanent."""
        import copy

        from torch.nn.utils import prune

        model = copy.deepcopy(model).eval()
        example = example_input(ctx)
        keep = {id(m) for m in output_layers(model, example)}
        targets = [(m, "weight") for m in model.modules() if isinstance(m, _weight_layer_types()) and id(m) not in keep]
        if not targets:
            raise ValueError("the model has no Conv or Linear layer to prune besides its output layers")
        amount = float(params["sparsity"])
        if params["scope"] == "global":
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
        else:
            for module, attr in targets:
                prune.l1_unstructured(module, attr, amount=amount)
        if params["epochs"]:
            ctx.fine_tune(model, params["epochs"])  # the masks hold the zeros while the rest retrains
        for module, attr in targets:
            prune.remove(module, attr)
        if params["recalibrate_bn"]:
            recalibrate_batch_norm(model, ctx.task, ctx.data["train"])
        return model.eval()


def sparsity_of(model: Any) -> float:
    """Share of exact zeros among the Conv/Linear weights of a torch model."""
    weights = [m.weight for m in model.modules() if isinstance(m, _weight_layer_types())]
    total = sum(w.numel() for w in weights)
    return float(sum((w == 0).sum().item() for w in weights) / total) if total else 0.0


@hookimpl
def register_techniques(register):
    """Register the built-in pruning techniques."""
    register(PruneStructured())
    register(PruneMagnitude())
