"""Low-rank factorization: an example third-party technique for edge-orchestrator.

Every Conv2d (k x k, C_in -> C_out) whose weight matrix (C_out x C_in*k*k) has a
good truncated SVD becomes a k x k conv to `rank` channels followed by a 1x1 conv
to C_out; every Linear becomes two Linears through `rank` features. The model is
then fine-tuned for `epochs` (with the base model as teacher) to win back accuracy.
It only ever makes a layer smaller: a layer whose factorized form would have more
weights than the original is left alone.
"""

from __future__ import annotations

from typing import Any

from orchestrator import Technique, choice, hookimpl

__version__ = "0.1.0"


def _factorize(layer: Any, rank_ratio: float) -> Any:
    import torch
    import torch.nn as nn

    if isinstance(layer, nn.Linear):
        w = layer.weight.data  # (out, in)
        out_f, in_f = w.shape
        rank = max(1, int(min(out_f, in_f) * rank_ratio))
        if rank * (out_f + in_f) >= out_f * in_f:
            return layer
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        first = nn.Linear(in_f, rank, bias=False)
        second = nn.Linear(rank, out_f, bias=layer.bias is not None)
        first.weight.data = (torch.diag(s[:rank].sqrt()) @ vh[:rank]).contiguous()
        second.weight.data = (u[:, :rank] @ torch.diag(s[:rank].sqrt())).contiguous()
        if layer.bias is not None:
            second.bias.data = layer.bias.data.clone()
        return nn.Sequential(first, second)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        w = layer.weight.data  # (out, in, kh, kw)
        out_c, in_c, kh, kw = w.shape
        rank = max(1, int(min(out_c, in_c * kh * kw) * rank_ratio))
        if rank * (in_c * kh * kw + out_c) >= out_c * in_c * kh * kw:
            return layer
        u, s, vh = torch.linalg.svd(w.reshape(out_c, -1), full_matrices=False)
        first = nn.Conv2d(in_c, rank, (kh, kw), layer.stride, layer.padding, layer.dilation, bias=False)
        second = nn.Conv2d(rank, out_c, 1, bias=layer.bias is not None)
        first.weight.data = (torch.diag(s[:rank].sqrt()) @ vh[:rank]).reshape(rank, in_c, kh, kw).contiguous()
        second.weight.data = (u[:, :rank] @ torch.diag(s[:rank].sqrt())).reshape(out_c, rank, 1, 1).contiguous()
        if layer.bias is not None:
            second.bias.data = layer.bias.data.clone()
        return nn.Sequential(first, second)
    return layer


class LowRank(Technique):
    """Truncated-SVD factorization of conv and linear layers, then a short fine-tune."""

    name = "low-rank"
    stage = "training"
    version = "1"
    description = "low-rank (truncated SVD) factorization of Conv2d/Linear layers, then fine-tuning"
    search_space = {"rank_ratio": choice([0.25, 0.5]), "epochs": choice([0, 1])}
    defaults = {"min_channels": 16}

    def invalid(self, params: dict[str, Any]) -> str | None:
        """Rank ratios must be in (0, 1); epochs must be >= 0."""
        if not 0 < params["rank_ratio"] < 1:
            return f"rank_ratio must be between 0 and 1, got {params['rank_ratio']}"
        if params["epochs"] < 0:
            return f"epochs must be >= 0, got {params['epochs']}"
        return None

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """Factorize every large-enough layer of a copy of `model`, then fine-tune it."""
        import copy

        import torch.nn as nn

        model = copy.deepcopy(model)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                big = isinstance(child, (nn.Conv2d, nn.Linear)) and min(child.weight.shape[:2]) >= params["min_channels"]
                if big:
                    setattr(parent, name, _factorize(child, params["rank_ratio"]))
        if params["epochs"]:
            ctx.fine_tune(model, params["epochs"], teacher=ctx.teacher)
        return model.eval()


@hookimpl
def register_techniques(register):
    """Register the low-rank technique."""
    register(LowRank())
