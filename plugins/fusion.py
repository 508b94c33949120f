"""Built-in graph fusion for transformer models (stage `graph`), with onnxruntime.

`transformer-optimize`: `onnxruntime.transformers.optimizer.optimize_model` rewrites a
transformer's subgraphs into onnxruntime's fused operators (com.microsoft domain): Attention
(or MultiHeadAttention), EmbedLayerNormalization, SkipLayerNormalization, (Bias/Fast)Gelu.
Fewer, bigger kernels: on CPU and GPU providers alike a BERT-like model usually runs faster,
and it computes the same function (float32, within rounding).

It runs before any quantization or fp16 in a pipeline (`cannot_follow`): the quantizers know
the fused operators (dynamic int8 makes QAttention and QEmbedLayerNormalization of them), while
the fusion patterns do not match a quantized graph. A graph it fuses nothing of (a CNN, or a
transformer whose export the patterns miss) is refused, so such a candidate fails at once
instead of being measured as a copy of its input.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, ClassVar

from orchestrator import Choice, Technique, hookimpl

#: The model types of onnxruntime.transformers.optimizer (MODEL_TYPES, onnxruntime 1.32); an
#: older onnxruntime that lacks one refuses it when the technique runs.
MODEL_TYPES = ("bert", "bert_tf", "bert_keras", "bart", "clip", "conformer", "gpt2", "gpt2_tf", "gpt_neox", "phi",
               "qwen3", "sam2", "swin", "tnlr", "t5", "unet", "vae", "vit", "mmdit")
#: Operators a fusion makes (BertOnnxModel.get_fused_operator_statistics and the other model types').
FUSED_OPS = frozenset({
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "EmbedLayerNormalization",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
    "SimplifiedLayerNormalization", "Gelu", "FastGelu", "BiasGelu", "GemmFastGelu", "QuickGelu", "BiasSplitGelu",
    "BiasAdd", "RotaryEmbedding",
})  # not onnxruntime's generic FusedConv/FusedMatMul (opt_level 2 makes them of a CNN too)


class TransformerOptimize(Technique):
    """onnxruntime's transformer fusions: Attention, LayerNorm, GELU, embedding subgraphs into fused operators."""

    name = "transformer-optimize"
    stage = "graph"
    version = "1"
    description = "transformer graph fusion (Attention, SkipLayerNorm, Gelu) with onnxruntime's optimizer"
    cannot_follow = ("int8-static", "int8-dynamic", "fp16", "ort-session")
    search_space: ClassVar[dict[str, Choice]] = {}
    defaults: ClassVar[dict[str, Any]] = {
        # the optimizer's fusion patterns: "bert" fits BERT/RoBERTa/DistilBERT-like encoders
        "model_type": "bert",
        # onnxruntime's own graph optimizations first: 0 none, 1 basic (constant folding,
        # provider independent), 2 extended (may use CPU-only fused operators)
        "opt_level": 1,
        # 0: detected from the graph (BERT-like models)
        "num_heads": 0,
        "hidden_size": 0,
    }

    def invalid(self, params: dict[str, Any]) -> str | None:
        """A known model type, opt_level 0-2, head count and hidden size whole numbers >= 0 (0: detect)."""
        if params.get("model_type") not in MODEL_TYPES:
            return f"model_type must be one of {list(MODEL_TYPES)}, got {params.get('model_type')!r}"
        level = params.get("opt_level")
        if isinstance(level, bool) or level not in (0, 1, 2):
            return f"opt_level must be 0, 1 or 2, got {level!r}"
        for key in ("num_heads", "hidden_size"):
            value = params.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return f"{key} must be a whole number >= 0 (0: detect it), got {value!r}"
        return None

    def recommended(self, device: Any) -> list[dict[str, Any]]:
        """The defaults, everywhere: fused operators are onnxruntime's advice for transformers on every provider."""
        return [{}]

    def apply(self, model: Any, params: dict[str, Any], ctx: Any) -> Any:
        """The fused onnx.ModelProto; ValueError when nothing was fused."""
        from onnxruntime.transformers import optimizer

        if params["model_type"] not in optimizer.MODEL_TYPES:
            raise ValueError(f"this onnxruntime's transformer optimizer has no model type {params['model_type']!r}")
        before = Counter(node.op_type for node in model.graph.node)
        if not before["MatMul"] and not any(before[op] for op in FUSED_OPS):
            raise ValueError("the graph has no MatMul (no attention or feed-forward layer) "
                             "to fuse: not a transformer")
        try:
            fused = optimizer.optimize_model(
                copy.deepcopy(model),  # with opt_level 0 the optimizer rewrites the proto it is given
                model_type=params["model_type"],
                num_heads=params["num_heads"],
                hidden_size=params["hidden_size"],
                opt_level=params["opt_level"],
                use_gpu=False,
            ).model
        except Exception as exc:  # noqa: BLE001 - the optimizer's own errors on a graph it does not understand
            raise ValueError(f"onnxruntime's {params['model_type']} optimizer cannot read this "
                             f"graph as a transformer ({type(exc).__name__}: {exc})") from exc
        after = Counter(node.op_type for node in fused.graph.node)
        gained = sorted(op for op in FUSED_OPS if after[op] > before[op])
        if not gained:
            raise ValueError(f"transformer-optimize fused nothing: no {params['model_type']} attention, "
                             "layer normalization or GELU pattern in this graph (not a transformer?)")
        return fused


@hookimpl
def register_techniques(register):
    """Register the built-in graph fusion technique."""
    register(TransformerOptimize())
