"""`prune-heads` (stage `training`): fewer attention heads and a narrower feed-forward, distilled from the teacher.

The width half of shrinking a transformer (`drop-layers` is the depth half), for a model a user brings:

- **heads**: in every attention with separate query/key/value `nn.Linear` layers and a head count
  (BERT's `query`/`key`/`value` + `num_attention_heads`, BART's `q_proj`..., DistilBERT's `q_lin`...,
  T5's `q`/`k`/`v` + `n_heads`), `heads` of the heads are kept. torch-pruning's dependency graph finds
  what each head's channels reach (the key and value rows, the output projection's columns) and cuts
  them all; the head size stays, so the attention's scaling is unchanged, and the attention module's
  head count (and `all_head_size`-like widths) are set to the new numbers.
- **ffn**: in every block of the model's longest `nn.ModuleList` of identical blocks, each expanding
  `nn.Linear` (more outputs than inputs: BERT's `intermediate.dense`, `nn.TransformerEncoderLayer`'s
  `linear1`) keeps `ffn` of its outputs (rounded to `round_to`), and the layer that reads them (BERT's
  `output.dense`, `linear2`) loses the same inputs.

What goes is what adds least, label-free: a channel's mean |activation| on `score_rows` calibration
rows times the L2 norm of the weights reading it (in the output projection or the feed-forward's
second layer; as Wanda scores weights), summed per head; by weight norms alone without rows.

Nothing on the residual stream is cut: the hidden size, the embeddings and every output keep their
shapes (checked on a real input before the student is trained). Then the student is distilled toward
the teacher for `epochs` with the task's own training (`ctx.fine_tune(model, epochs, teacher=ctx.teacher)`):
for a model brought with `--model`, label-free on its training set (`--train`), bounded by the profile's
`search.train_time_budget_s`.

An architecture it cannot handle is refused in one line (a ValueError, the candidate fails with it):
`torch.nn.MultiheadAttention` (its heads are packed into projections as wide as the model, so a head
cannot go without narrowing the model: `heads=1` still narrows its feed-forward), a fused
query/key/value layer (GPT-2's `c_attn`, timm's `qkv`), grouped-query attention, or a model where
no attention or feed-forward is found.

Written as a third party would: only `orchestrator`'s public API.
"""

from __future__ import annotations

import copy
from typing import Any

from orchestrator import NotApplicable, Technique, choice, hookimpl
from plugins._keep_outputs import output_shapes, output_tensors
from plugins.layerdrop import block_list
from plugins.pruning import example_input

#: Child names of an attention's separate query, key and value projections.
QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"),
             ("to_q", "to_k", "to_v"), ("q", "k", "v"))
#: Attributes an attention module keeps its head count in.
HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
#: Attributes holding heads x head size (the attention's inner width), updated with the head count.
INNER_WIDTHS = ("all_head_size", "inner_dim", "dim")
#: Names of fused query/key/value layers: recognised only to refuse them by name.
FUSED_QKV = ("qkv", "c_attn", "Wqkv", "query_key_value", "in_proj")


def _share(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def find_attentions(model: Any) -> list[tuple[str, Any, tuple[Any, Any, Any], int]]:
    """(name, module, (query, key, value) Linears, head count) of every attention whose heads can be cut."""
    import torch

    found = []
    for name, module in model.named_modules():
        for names in QKV_NAMES:
            layers = tuple(getattr(module, n, None) for n in names)
            if not all(isinstance(layer, torch.nn.Linear) for layer in layers):
                continue
            counts = [getattr(module, a) for a in HEAD_COUNTS if isinstance(getattr(module, a, None), int)]
            config = getattr(module, "config", None)
            if not counts and isinstance(getattr(config, "num_attention_heads", None), int):
                counts = [config.num_attention_heads]
            where = f"{name or 'the model'} ({type(module).__name__})"
            if not counts:
                raise NotApplicable(f"prune-heads: {where} has {'/'.join(names)} layers but no head count "
                                 f"({', '.join(HEAD_COUNTS)}): cannot tell its heads apart")
            widths = {layer.out_features for layer in layers}
            if len(widths) > 1:
                raise NotApplicable(f"prune-heads: {where} has query/key/value of different widths {sorted(widths)} "
                                 "(grouped-query attention): its key/value heads are shared; not supported")
            if layers[0].out_features % counts[0]:
                raise NotApplicable(f"prune-heads: {where}: {layers[0].out_features} channels do not split into "
                                 f"{counts[0]} heads")
            found.append((name, module, layers, counts[0]))
            break
    return found


def _unprunable_attention(model: Any) -> str:
    """Why no attention of the model can lose heads: a named reason, or '' when it has no attention at all."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            return (f"{name} is a torch.nn.MultiheadAttention: its heads are packed into projections as wide as "
                    "the model (in_proj_weight), so a head cannot be removed without narrowing the whole model; "
                    "use heads=1 (feed-forward width only)")
        fused = [n for n in FUSED_QKV if isinstance(getattr(module, n, None), torch.nn.Module)]
        if fused:
            return (f"{name}.{fused[0]} ({type(module).__name__}) computes query, key and value in one layer "
                    "(fused): its heads cannot be told apart; use heads=1 (feed-forward width only)")
    return ""


def _group_modules(group: Any, graph: Any) -> tuple[set[Any], set[Any]]:
    """(modules losing output channels, modules losing input channels) in a torch-pruning group."""
    out, into = set(), set()
    for dep, _ in group:
        module = dep.target.module
        if graph.is_out_channel_pruning_fn(dep.handler):
            out.add(module)
        elif graph.is_in_channel_pruning_fn(dep.handler):
            into.add(module)
    return out, into


def _is_internal(out: set[Any], into: set[Any], allowed_out: set[Any]) -> bool:
    """True when a group cuts only `allowed_out`'s outputs and Linear inputs (plus norms, no residual stream)."""
    import torch

    params = {m for m in out | into if isinstance(m, torch.nn.Module) and any(True for _ in m.parameters(False))}
    return ({m for m in params & out} <= allowed_out and any(isinstance(m, torch.nn.Linear) for m in into)
            and all(isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) for m in params))


def _weakest(scores: Any, drop: int) -> list[int]:
    import torch

    return sorted(torch.argsort(scores)[:drop].tolist())


def input_activity(model: Any, batches: list[tuple[Any, ...]]) -> dict[Any, Any]:
    """{Linear: mean |input| per input channel} of every nn.Linear of the model, over `batches` of real rows."""
    import torch

    sums: dict[Any, Any] = {}
    counts: dict[Any, int] = {}

    def record(module: Any, args: tuple[Any, ...], _out: Any) -> None:
        x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).float()
        sums[module] = sums.get(module, 0) + x.sum(0)
        counts[module] = counts.get(module, 0) + len(x)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {m: sums[m] / counts[m] for m in sums}


def channel_scores(group: Any, graph: Any, activity: dict[Any, Any]) -> Any:
    """What each channel of a group adds: mean |activation| x the L2 norm of the weights that read it (in the
    Linear reading the group, label-free, as Wanda scores weights); by weights alone (L2) without rows."""
    import torch
    import torch_pruning as tp

    readers = [m for m in _group_modules(group, graph)[1] if isinstance(m, torch.nn.Linear) and m in activity]
    if readers:
        return sum(activity[r] * r.weight.detach().norm(dim=0) for r in readers)
    return torch.as_tensor(tp.importance.MagnitudeImportance(p=2)(group))


def prune_heads(model: Any, graph: Any, keep: float, activity: dict[Any, Any]) -> dict[str, int]:
    """Cut every attention's weakest heads to `keep` of them; returns {'heads_before', 'heads_after'}."""
    import torch_pruning as tp

    attentions = find_attentions(model)
    before = after = 0
    for name, module, (query, key, value), heads in attentions:
        kept = max(1, round(heads * keep))
        before, after = before + heads, after + kept
        if kept == heads:
            continue
        size = query.out_features // heads
        group = graph.get_pruning_group(query, tp.prune_linear_out_channels, idxs=list(range(query.out_features)))
        out, into = _group_modules(group, graph)
        if not {key, value} <= out or not _is_internal(out, into, {query, key, value}):
            raise ValueError(f"prune-heads: the head channels of {name} ({type(module).__name__}) reach beyond its "
                             "query/key/value and output projection (the model's width would change): not supported")
        scores = channel_scores(group, graph, activity).view(heads, size).sum(1)
        cut = [head * size + i for head in _weakest(scores, heads - kept) for i in range(size)]
        graph.get_pruning_group(query, tp.prune_linear_out_channels, idxs=cut).prune()
        for attr in HEAD_COUNTS:
            if getattr(module, attr, None) == heads:
                setattr(module, attr, kept)
        for attr in INNER_WIDTHS:
            if getattr(module, attr, None) == heads * size:
                setattr(module, attr, kept * size)
    return {"heads_before": before, "heads_after": after}


def expanding_layers(model: Any, skip: set[Any]) -> list[list[Any]]:
    """Per block of the model's longest ModuleList of identical blocks: its Linears with more outputs than inputs."""
    import torch

    try:
        _, blocks = block_list(model)
    except ValueError:
        raise ValueError("prune-heads: the model has no nn.ModuleList of 2 or more identical blocks "
                         "(transformer layers) to narrow the feed-forward of") from None
    ups = [[m for m in block.modules() if isinstance(m, torch.nn.Linear) and m not in skip
            and m.out_features > m.in_features] for block in blocks]
    if not any(ups):
        raise ValueError(f"prune-heads: the blocks ({type(blocks[0]).__name__}) have no nn.Linear with more outputs "
                         "than inputs (a feed-forward's first layer) to narrow")
    return ups


def prune_ffn(model: Any, graph: Any, keep: float, round_to: int, skip: set[Any],
              activity: dict[Any, Any]) -> dict[str, int]:
    """Narrow every block's expanding Linear (and its reader) to `keep` of its width; returns widths summed."""
    import torch_pruning as tp

    before = after = 0
    for ups in expanding_layers(model, skip):
        widths = {up: up.out_features for up in ups}
        for up in ups:
            width = up.out_features
            if width != widths[up]:  # already narrowed with an earlier one (a gated pair: both read alike)
                continue
            group = graph.get_pruning_group(up, tp.prune_linear_out_channels, idxs=list(range(width)))
            out, into = _group_modules(group, graph)
            if not _is_internal(out, into, set(ups)):
                continue  # its outputs reach the residual stream or the model's outputs: not a feed-forward
            kept = min(width, max(round_to, round(width * keep / round_to) * round_to))
            before, after = before + width, after + kept
            if kept < width:
                graph.get_pruning_group(up, tp.prune_linear_out_channels,
                                        idxs=_weakest(channel_scores(group, graph, activity), width - kept)).prune()
    if not before:
        raise ValueError("prune-heads: found no feed-forward (an expanding Linear read only by another Linear) "
                         "in the model's blocks")
    return {"ffn_before": before, "ffn_after": after}


class PruneHeads(Technique):
    """Keep a share of every attention's heads and of every block's feed-forward width, then distil."""

    name = "prune-heads"
    stage = "training"
    version = "1"
    description = ("remove attention heads and feed-forward width of a transformer (torch-pruning dependency graph; "
                   "the hidden size and outputs kept), distil toward the teacher (label-free for a brought model)")
    search_space = {
        "heads": choice([0.5, 0.75, 1.0]),   # share of every attention's heads kept (1.0: all)
        "ffn": choice([0.5, 0.75, 1.0]),     # share of every feed-forward's width kept (1.0: all)
        "epochs": choice([0, 1, 3]),         # distillation passes over the training data (a time budget also bounds it)
    }
    # round_to: feed-forward widths stay multiples of this (vectorised kernels like them); score_rows: calibration
    # rows whose activations rank heads and channels (0: weights alone)
    defaults = {"round_to": 8, "score_rows": 64}

    def recommended(self, device: Any) -> list[dict[str, Any]]:
        """A quarter of the heads and of the feed-forward off, distilled for 3 passes, then half of each: fewer
        multiply-adds help every runtime. Measured on all-MiniLM-L6-v2 (1 thread, AVX2): 1.36x faster at 3/4
        (cosine 0.88 undistilled, 0.91 after 15 minutes of distillation), 1.9x at 1/2 (0.65): on a pretrained
        transformer quality returns only with a long `search.train_time_budget_s` (docs/own_models.md)."""
        return [{"heads": 0.75, "ffn": 0.75, "epochs": 3}, {"heads": 0.5, "ffn": 0.5, "epochs": 3}]

    def invalid(self, params: dict[str, Any]) -> str | None:
        """heads and ffn are shares in (0, 1], not both 1; epochs, score_rows integers >= 0; round_to >= 1."""
        for key in ("heads", "ffn"):
            if not _share(params.get(key)):
                return f"{key} must be a share in (0, 1], got {params.get(key)!r}"
        if params["heads"] == 1 and params["ffn"] == 1:
            return "heads=1 and ffn=1 keep everything: nothing to prune"
        for key, least in (("epochs", 0), ("round_to", 1), ("score_rows", 0)):
            value = params.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                return f"{key} must be an integer >= {least}, got {value!r}"
        return None

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """A copy with fewer heads and a narrower feed-forward, outputs' shapes checked, distilled for `epochs`."""
        import torch
        import torch_pruning as tp

        model = copy.deepcopy(model).eval()
        example = example_input(ctx)
        inputs = example if isinstance(example, tuple) else (example,)
        with torch.no_grad():
            shapes = output_shapes(model(*inputs))
        qkv = {layer for _, _, layers, _ in find_attentions(model) for layer in layers}
        try:
            expanding_layers(model, qkv)
            no_ffn = ""
        except ValueError as exc:
            no_ffn = str(exc)
        no_heads = "" if qkv else "prune-heads: " + (_unprunable_attention(model) or (
            "found no attention with separate query/key/value Linear layers "
            f"({', '.join('/'.join(n) for n in QKV_NAMES[:3])}, ...) and a head count"))
        if no_heads and no_ffn:  # refused before tracing, what is missing by name: nothing here to prune at all
            raise NotApplicable(f"{no_heads}; {no_ffn.removeprefix('prune-heads: ')}")
        if params["heads"] < 1 and no_heads:
            raise ValueError(no_heads)
        if params["ffn"] < 1 and no_ffn:
            raise ValueError(no_ffn)
        try:  # traced from every output tensor (a cache object aside)
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=inputs, output_transform=lambda out: [t for t in output_tensors(out) if t.requires_grad])
        except Exception as exc:  # noqa: BLE001 - the tracer's failure is the architecture's, said in one line
            raise NotApplicable(f"prune-heads: torch-pruning cannot trace {type(model).__name__}'s dependencies "
                             f"({_one_line(exc)})") from None
        activity = input_activity(model, _calibration_rows(ctx, params["score_rows"]))
        if params["heads"] < 1:
            prune_heads(model, graph, float(params["heads"]), activity)
        if params["ffn"] < 1:
            prune_ffn(model, graph, float(params["ffn"]), int(params["round_to"]), qkv, activity)
        model.zero_grad(set_to_none=True)
        try:
            with torch.no_grad():
                pruned = output_shapes(model(*inputs))
        except Exception as exc:  # noqa: BLE001 - any failure here is the architecture's, said in one line
            raise ValueError(f"prune-heads: the pruned {type(model).__name__} no longer runs "
                             f"({_one_line(exc)}): it keeps "
                             "a head count or width somewhere this technique does not update") from None
        if pruned != shapes:
            raise ValueError(f"prune-heads: pruning changed the outputs' shapes {shapes} -> {pruned}: not supported")
        if params["epochs"]:
            ctx.fine_tune(model, params["epochs"], teacher=ctx.teacher)
        return model.eval()


def _calibration_rows(ctx: Any, limit: int, batch: int = 16) -> list[tuple[Any, ...]]:
    """Up to `limit` calibration rows as batches of input tensors (never the held-out rows quality is measured on)."""
    import numpy as np  # only with torch, when a candidate is built
    import torch

    rows = [ctx.task.feeds(r) for r in ctx.calibration_batches(limit)]
    specs = ctx.task.input_specs()
    return [tuple(torch.from_numpy(np.ascontiguousarray(np.concatenate([r[s.name] for r in rows[i:i + batch]]),
                                                        dtype=s.dtype)) for s in specs)
            for i in range(0, len(rows), batch)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@hookimpl
def register_techniques(register):
    """Register prune-heads."""
    register(PruneHeads())
