"""`drop-layers` (stage `training`): a shallower transformer, distilled from the model it came from.

The depth half of DistilBERT, for any model: the longest `nn.ModuleList` of blocks of one class
(BERT's `encoder.layer`, GPT-2's `h`, a ViT's `blocks`, ...) keeps a share of its blocks, evenly
spread and always the first (`keep` 0.5 of 12 layers keeps 0, 2, 4, 6, 8, 10, as DistilBERT
does), each with the teacher's weights; everything else (embeddings, heads) stays as it was.
The student is then distilled toward the teacher's outputs for `epochs` with the task's own
training (`ctx.fine_tune(model, epochs, teacher=ctx.teacher)`): for a model brought with
`--model`, label-free on its training set (`--train`), bounded by the profile's
`search.train_time_budget_s` (orchestrator/models/owntrain.py).

Written as a third party would: only `orchestrator`'s public API.
"""

from __future__ import annotations

from typing import Any

from orchestrator import NotApplicable, Technique, choice, hookimpl


def block_list(model: Any) -> tuple[str, Any]:
    """(dotted name, the nn.ModuleList) of the model's longest list of at least 2 blocks of one class."""
    import torch

    best: tuple[str, Any] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 \
                and len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise NotApplicable("the model has no nn.ModuleList of 2 or more blocks of one class (transformer layers) to drop")
    return best


def kept_indices(count: int, keep: float) -> list[int]:
    """`keep` of `count` blocks, evenly spread from the first (at least 1, at most count - 1)."""
    kept = min(max(round(count * keep), 1), count - 1)
    return sorted({round(i * count / kept) for i in range(kept)})


class DropLayers(Technique):
    """Keep a share of a transformer's layers (the teacher's weights), then distil toward the teacher."""

    name = "drop-layers"
    stage = "training"
    version = "1"
    description = ("drop transformer layers (the longest ModuleList of identical blocks), keep the teacher's weights "
                   "in the rest, distil toward the teacher (label-free for a brought model)")
    search_space = {
        "keep": choice([0.5, 0.67]),    # share of the layers kept (every other one at 0.5)
        "epochs": choice([0, 1, 3]),    # distillation passes over the training data (a time budget also bounds it)
    }
    defaults: dict[str, Any] = {}

    def recommended(self, device: Any) -> list[dict[str, Any]]:
        """DistilBERT's student: every other layer, distilled (3 passes; the time budget bounds them),
        on every device: half the layers is about half the time wherever the layers dominate."""
        return [{"keep": 0.5, "epochs": 3}]

    def invalid(self, params: dict[str, Any]) -> str | None:
        """keep must be in (0, 1), epochs an integer >= 0."""
        keep, epochs = params.get("keep"), params.get("epochs")
        if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0 < keep < 1:
            return f"keep must be a share between 0 and 1, got {keep!r}"
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
            return f"epochs must be an integer >= 0, got {epochs!r}"
        return None

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """A copy with the kept layers only, distilled for `epochs`; returned in eval mode."""
        import copy

        import torch

        model = copy.deepcopy(model).eval()
        path, blocks = block_list(model)
        kept = kept_indices(len(blocks), float(params["keep"]))
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, torch.nn.ModuleList([blocks[i] for i in kept]))
        for module in model.modules():  # a Hugging Face config counts the layers too (head masks, caches)
            config = getattr(module, "config", None)
            if config is not None and getattr(config, "num_hidden_layers", None) == len(blocks):
                config.num_hidden_layers = len(kept)
        if params["epochs"]:
            ctx.fine_tune(model, params["epochs"], teacher=ctx.teacher)
        return model.eval()


@hookimpl
def register_techniques(register):
    """Register drop-layers."""
    register(DropLayers())
