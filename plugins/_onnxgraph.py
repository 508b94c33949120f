"""ONNX graph helpers of the quantization plugin: naming nodes, constants, the attention core, pre-processing,
calibration feeds and parameter checks (plugins/quantization.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator

#: A node without inputs makes a constant only if it is one of these (RandomNormal has no input either).
_CONSTANT_SOURCES = ("Constant",)
#: Operators that multiply by weights: the attention core's walk stops at them.
_MATMUL_LIKE = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul", "Attention",
                          "MultiHeadAttention", "FusedMatMul"})


class FeedReader:
    """Feeds calibration samples to onnxruntime's calibrator (a CalibrationDataReader)."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._items = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._items, None)

    def rewind(self) -> None:  # pragma: no cover - only some calibrators call it
        raise NotImplementedError


def calibration_feeds(model: Any, ctx: Any, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` single-sample feeds {model input name: array} from the task's calibration split.

    A single-input model whose input the task names otherwise (an ONNX file brought as it is)
    gets the task's one array under the model's own input name.
    """
    feeds = ctx.calibration_feeds(limit)
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(names) == 1 and feeds and set(feeds[0]) != set(names) and len(feeds[0]) == 1:
        feeds = [{names[0]: next(iter(f.values()))} for f in feeds]
    return feeds


def with_node_names(model: Any) -> Any:
    """`model`, or a copy whose nameless nodes got unique names (node exclusions go by name)."""
    if all(node.name for node in model.graph.node):
        return model
    import copy

    model = copy.deepcopy(model)
    taken = {node.name for node in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name, k = f"{node.op_type}_{i}", 0
            while name in taken:
                k += 1
                name = f"{node.op_type}_{i}_{k}"
            node.name = name
            taken.add(name)
    return model


def _uses_contrib_ops(model: Any) -> bool:
    """Nodes of another domain than ONNX's (com.microsoft's fused Attention, SkipLayerNormalization, ...)."""
    return any(node.domain not in ("", "ai.onnx") for node in model.graph.node)


def prepared(model: Any, work: Any, stem: str) -> tuple[Any, Any]:
    """Save `model` and run onnxruntime's quantization pre-processing; returns (prepared path, output path).

    ONNX's shape inference knows no contrib operator, so a graph with fused transformer nodes
    (plugins/fusion.py) gets onnxruntime's symbolic shape inference, which does: without it
    the quantizer cannot type the tensors after those nodes.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, prep, out = work / f"{stem}-fp32.onnx", work / f"{stem}-prep.onnx", work / f"{stem}-int8.onnx"
    onnx.save(_at_least_opset_13(with_node_names(model)), str(src))
    fused = _uses_contrib_ops(model)
    # auto_merge: a fused BERT's position ids are Min(512, sequence) long, which symbolic inference
    # must merge with `sequence` to go on
    with _working_directory(work):
        quant_pre_process(str(src.resolve()), str(prep.resolve()), skip_symbolic_shape=not fused, auto_merge=fused)
    return prep, out


_CWD_LOCK = threading.Lock()


@contextlib.contextmanager
def _working_directory(folder: Any) -> Iterator[None]:
    """Run in `folder`: onnxruntime's symbolic shape inference, when it cannot finish, dumps the model
    (with its weights as a side file) as `sym_shape_infer_temp.onnx` into the current directory,
    which would be the user's checkout. The lock keeps two threads of one process from moving it
    under each other."""
    with _CWD_LOCK:
        before = os.getcwd()
        os.chdir(folder)
        try:
            yield
        finally:
            os.chdir(before)


def _at_least_opset_13(model: Any) -> Any:
    """The model at ONNX opset 13 or later: per-channel Q/DQ needs the `axis` attribute opset 13 gave
    DequantizeLinear (an opset-11 model, as many converters still write, would quantize into an
    invalid graph)."""
    from onnx import version_converter

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    return model if opset >= 13 else version_converter.convert_version(model, 13)


def constant_tensors(graph: Any) -> set[str]:
    """Names of the tensors that do not depend on the model's inputs: initializers and what only they feed."""
    const = {t.name for t in graph.initializer}
    for node in graph.node:  # ONNX graphs are topologically sorted
        if (not node.input and node.op_type in _CONSTANT_SOURCES) or \
                (node.input and all(i in const or i == "" for i in node.input)):
            const.update(o for o in node.output if o)
    return const


def attention_core(model: Any) -> list[str]:
    """Names of the nodes of a transformer's attention core, which int8 destroys.

    The MatMuls whose two inputs are activations (neither an initializer nor computed from
    constants only: attention's Q·Kᵀ and P·V), plus the nodes on the paths from one such
    MatMul to the next that pass no other MatMul-like node (the scale, the mask addition and
    the Softmax). A CNN has none; a fused graph's Attention nodes are not MatMuls (empty too).
    """
    graph = model.graph
    const = constant_tensors(graph)
    pairs = [n for n in graph.node if n.op_type == "MatMul" and len(n.input) >= 2
             and not any(i in const for i in n.input[:2])]
    if not pairs:
        return []
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    core = {id(n) for n in pairs}

    def walk(start: Any, step: Any) -> tuple[dict[int, Any], set[int]]:
        seen: dict[int, Any] = {}
        hits: set[int] = set()
        stack = [start]
        while stack:
            for nxt in step(stack.pop()):
                if id(nxt) in core:
                    hits.add(id(nxt))
                elif nxt.op_type not in _MATMUL_LIKE and id(nxt) not in seen:
                    seen[id(nxt)] = nxt
                    stack.append(nxt)
        return seen, hits

    def down(n: Any) -> list[Any]:
        return [c for o in n.output for c in consumers.get(o, [])]

    def up(n: Any) -> list[Any]:
        return [producer[i] for i in n.input if i in producer]

    between: set[int] = set()
    for a in pairs:
        below, reached = walk(a, down)
        for b in pairs:
            if id(b) in reached:
                above, _ = walk(b, up)
                between |= below.keys() & above.keys()
    return [n.name for n in graph.node if id(n) in core or id(n) in between]


def string_list_error(params: dict[str, Any], key: str) -> str | None:
    """The error when `params[key]` is not a list of non-empty names, else None."""
    value = params.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return f"{key} must be a list of names, got {value!r}"
    return None


def check_nodes_exist(model: Any, names: list[str]) -> None:
    """Refuses node names the graph does not have (a typo would otherwise exclude nothing, silently)."""
    missing = sorted(set(names) - {n.name for n in model.graph.node})
    if missing:
        raise ValueError(f"nodes_to_exclude names no node of this graph: {', '.join(missing)} "
                         "(names are the graph's as this technique receives it)")


