"""The layers whose output channels a model's outputs are made of: pruning must not remove them.

A classifier has one such layer, its last Linear. A detector has several: YOLOv8 concatenates
per scale a box branch and a class branch, flattens, concatenates the scales, decodes the box
bins with a fixed DFL convolution and concatenates box coordinates with sigmoid scores. Cutting
a channel of any layer whose output reaches an output through concat, split, element-wise ops
or batch norm only would change that output's shape (or the meaning of its channels).

`protected_layers(model, example)` finds them on torch-pruning's DependencyGraph of the model
(the autograd graph of one forward pass on `example`, so torch modules and onnx2torch's
GraphModules alike): from every model output, walk towards the inputs through the ops that
keep the channel layout, and stop at each layer that makes channels (Conv, Linear, LSTM,
attention, embedding), which is kept whole. The walk goes on past a kept layer when that layer
cannot absorb a cut in its own inputs:

- a depthwise convolution (its input channels are its output channels);
- a convolution whose input arrives through a reshape (view, unflatten; a DFL's bins): torch-
  pruning maps indices through a reshape only for the flatten before a Linear.

torch-pruning's own groups are then checked: a group that would reach an output op is kept too.
torch-pruning's YOLOv8 example does this by hand (every layer of the Detect head ignored); here it
is found on any graph, and only the layers that must stay do.
"""

from __future__ import annotations

import copy
from typing import Any


def _as_tuple(example: Any) -> tuple[Any, ...]:
    return example if isinstance(example, tuple) else (example,)


def output_tensors(out: Any) -> list[Any]:
    """The tensors of a forward's output: a tensor, nested tuples/lists/dicts (a Hugging Face output); others skipped."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in output_tensors(item)]
    return []


def dependency_graph(model: Any, example: Any) -> tuple[Any, list[Any]]:
    """(torch-pruning DependencyGraph of `model` on `example`, the grad_fns of the model's outputs)."""
    import torch
    import torch_pruning as tp

    outputs: list[Any] = []

    def capture(out: Any) -> Any:
        outputs.extend(t.grad_fn for t in output_tensors(out) if t.grad_fn is not None)
        return out

    with torch.enable_grad():  # the graph is read from autograd
        graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=_as_tuple(example),
                                                      output_transform=capture)
    return graph, outputs


def output_walk(model: Any, example: Any) -> tuple[Any, list[Any], list[Any]]:
    """(dependency graph, output grad_fns, the modules and unwrapped parameters whose output channels
    reach a model output directly): the walk described above."""
    from torch_pruning.ops import OPTYPE

    graph, output_fns = dependency_graph(model, example)
    makers = {OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.LSTM, OPTYPE.MHA, OPTYPE.EMBED, OPTYPE.PARAMETER,
              OPTYPE.CUSTOMIZED, OPTYPE.DEPTHWISE_CONV}
    reshapes = {OPTYPE.RESHAPE, OPTYPE.UNBIND, OPTYPE.EXPAND}
    nodes = list(graph.module2node.values())
    kept: dict[int, Any] = {}
    # (node, mode, reshaped). mode "output": walking back from a model output, every channel-making layer
    # reached is kept. "conv"/"other": walking back from the inputs of a kept layer of that kind, which
    # absorbs a cut of its inputs, unless it is a convolution and a reshape lies in between (`reshaped`).
    stack = [(n, "output", False) for n in nodes if n.grad_fn in output_fns or n.type == OPTYPE.OUTPUT]
    seen: set[tuple[int, str, bool]] = set()
    while stack:
        node, mode, reshaped = stack.pop()
        if (id(node), mode, reshaped) in seen:
            continue
        seen.add((id(node), mode, reshaped))
        if node.type not in makers:
            stack.extend((i, mode, reshaped or node.type in reshapes) for i in node.inputs)
        elif mode == "output" or (mode == "conv" and reshaped):
            kept[id(node.module)] = node.module
            if node.type == OPTYPE.DEPTHWISE_CONV:  # its inputs are its outputs
                stack.extend((i, mode, reshaped) for i in node.inputs)
            else:
                stack.extend((i, "conv" if node.type == OPTYPE.CONV else "other", False) for i in node.inputs)
    return graph, output_fns, list(kept.values())


def protected_layers(model: Any, example: Any) -> list[Any]:
    """What structured pruning must leave whole: `output_walk`'s layers, the roots of torch-pruning groups
    that reach an output op or map indices past a member's channels, and those a cut on a copy breaks."""
    from torch_pruning import ops

    graph, output_fns, found = output_walk(model, example)
    kept = {id(m): m for m in found}
    # torch-pruning's groups: one that still reaches an output op, or that maps a channel index beyond a
    # member's channels, is left whole (its root ignored)
    roots = (ops.TORCH_CONV, ops.TORCH_LINEAR, ops.TORCH_LSTM)
    for group in list(graph.get_all_groups(ignored_layers=list(kept.values()), root_module_types=roots)):
        if any(_unsafe(graph, dep, idxs, output_fns) for dep, idxs in group):
            root = group[0].dep.target.module
            kept[id(root)] = root
    return _tried(model, example, list(kept.values()))


def output_shapes(out: Any) -> list[tuple[int, ...]]:
    """The shapes of a forward's output tensors."""
    return [tuple(t.shape) for t in output_tensors(out)]


def _tried(model: Any, example: Any, kept: list[Any]) -> list[Any]:
    """`kept` plus the root of every group whose cut breaks the model when tried on a copy.

    A converted model can hold channel counts as constants (onnx2torch's Split sizes, a Reshape's
    target shape) that torch-pruning cannot see: cutting such a group makes the forward pass fail or
    an output change shape. On a copy, every prunable group loses one channel in turn, the model
    runs after each; a group after which it fails or changes an output's shape is left whole, and the
    trial starts again on a fresh copy without it, until a pass goes through.
    """
    import torch
    from torch_pruning import ops

    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n for n, p in model.named_parameters()})
    kept_names = {names[id(m)] for m in kept if id(m) in names}
    with torch.no_grad():
        want = output_shapes(model.eval()(*_as_tuple(example)))
    roots = (ops.TORCH_CONV, ops.TORCH_LINEAR, ops.TORCH_LSTM)
    every_group = True  # first all groups cut at once, one forward pass; on a failure, group by group
    while True:
        trial = copy.deepcopy(model)
        by_name = dict(trial.named_modules()) | dict(trial.named_parameters())
        graph, _ = dependency_graph(trial, example)
        broken = None
        for group in graph.get_all_groups(ignored_layers=[by_name[n] for n in kept_names], root_module_types=roots):
            root = group[0].dep.target.module
            pruner = graph.get_pruner_of_module(root)
            if (pruner.get_out_channels(root) or 0) < 2:
                continue
            try:
                graph.get_pruning_group(root, pruner.prune_out_channels, idxs=[0]).prune()
                fine = every_group or _runs_as(trial, example, want)
            except Exception:  # noqa: BLE001 - any failure of the cut model is what this looks for
                fine = False
            if not fine:
                broken = next(n for n, m in by_name.items() if m is root)
                break
        if broken is None and every_group and not _runs_as(trial, example, want):
            every_group = False
            continue
        if broken is None:
            by_name = dict(model.named_modules()) | dict(model.named_parameters())
            return [m for m in kept if id(m) not in names] + [by_name[n] for n in sorted(kept_names)]
        kept_names.add(broken)


def _runs_as(model: Any, example: Any, shapes: list[tuple[int, ...]]) -> bool:
    import torch

    try:
        with torch.no_grad():
            return output_shapes(model(*_as_tuple(example))) == shapes
    except Exception:  # noqa: BLE001 - a model the cut broke
        return False


def _unsafe(graph: Any, dep: Any, idxs: Any, output_fns: list[Any]) -> bool:
    """Whether cutting `idxs` through `dep` would change a model output or index past the target's channels.

    The second is torch-pruning mapping indices wrongly: a split whose half is added to a layer's output
    (YOLOv8's C2f; its example rewrites the block for this) maps the whole tensor's indices onto a half.
    """
    from torch_pruning.ops import OPTYPE

    target, out = dep.target, graph.is_out_channel_pruning_fn(dep.handler)
    if target.type == OPTYPE.OUTPUT or (out and target.grad_fn in output_fns):
        return True
    try:
        channels = graph.get_out_channels(target) if out else graph.get_in_channels(target)
    except Exception:  # noqa: BLE001 - an op torch-pruning has no channel count for: nothing to check
        return False
    return channels is not None and len(idxs) > 0 and (max(idxs) >= channels or min(idxs) < 0)
