"""Models the benchmarks measure, shared with the tests that check the same figures.

A tiny BERT-like transformer (int64 input_ids and attention_mask, embeddings, two layers of
attention with a float-min mask, GELU feed-forward, LayerNorms), exported as the pipeline
exports, with its token data, a TechniqueContext and the cosine of a model's outputs to it
(bench/cpu_numerics.py, tests/test_graph_params.py); and this CPU's int8 case as its agent
reports it.
"""

from __future__ import annotations

import argparse
import io
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from agents.info import cmd_info
from orchestrator.api import Dataset, DeviceFacts, Task, TechniqueContext, TensorSpec
from orchestrator.config.profile import load_profile

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ a tiny BERT-like transformer

VOCAB, SEQ, HIDDEN = 500, 16, 64

# This CPU as its agent reports it (agents/info.py). onnxruntime's U8S8 kernels on x86-64 without
# VNNI (AVX2, AVX-512BW) multiply with vpmaddubsw, which adds pairs of u8 x s8 products in 16 bits:
# with full-range int8 weights (2 * 255 * 127 > 32767) the sums saturate. With VNNI (32-bit sums),
# U8U8 (uint8 weights) or on ARM the integer sums are exact.
CPU = DeviceFacts.from_info(cmd_info(argparse.Namespace()))
SATURATING_U8S8 = CPU.x86 and not CPU.has("avx512_vnni", "avx_vnni", "amx_int8")
CPU_CASE = (f"{CPU.arch} ({', '.join(sorted(CPU.isa)) or 'no ISA features reported'}): "
            + ("U8S8 sums saturate with 8-bit int8 weights: 7-bit weights (static), uint8 weights (dynamic)"
               if SATURATING_U8S8 else "exact integer sums with 8-bit int8 weights"))


class Layer(nn.Module):
    """One encoder layer: multi-head attention with a float-min mask, then a GELU feed-forward, each + LayerNorm."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.d = heads, hidden // heads
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.ff1, self.ff2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def split(self, x):
        return x.view(x.shape[0], x.shape[1], self.heads, self.d).permute(0, 2, 1, 3)

    def forward(self, x, mask):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d) + mask
        ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous().view(x.shape[0], x.shape[1], -1)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.ff2(nn.functional.gelu(self.ff1(x))))


class TinyBert(nn.Module):
    """BERT's structure (as Hugging Face writes it) at toy size."""

    def __init__(self, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.word, self.pos, self.ln = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(SEQ, HIDDEN), nn.LayerNorm(HIDDEN)
        self.layers = nn.ModuleList(Layer(HIDDEN, heads) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        x = self.ln(self.word(input_ids) + self.pos(torch.arange(input_ids.shape[1]).unsqueeze(0)))
        mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
        for layer in self.layers:
            x = layer(x, mask)
        return x


class TokensTask(Task):
    """Just what a TechniqueContext needs of a task with two int64 inputs."""

    name = "tokens"
    inputs = (TensorSpec("input_ids", "int64", ("batch", "sequence")),
              TensorSpec("attention_mask", "int64", ("batch", "sequence")))
    outputs = (TensorSpec("last_hidden_state", "float32", ("batch", "sequence", HIDDEN)),)


def tokens(n: int, seed: int) -> dict[str, np.ndarray]:
    """`n` rows of random token ids, each padded (mask 0) after a random length of 4 to SEQ - 1."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (n, SEQ)).astype(np.int64)
    mask = np.ones((n, SEQ), np.int64)
    for row, length in enumerate(rng.integers(4, SEQ, n)):
        mask[row, length:] = 0  # padding, which the mask hides
    return {"input_ids": ids, "attention_mask": mask}


def tiny_bert() -> onnx.ModelProto:
    """TinyBert with seed 0 and sharpened attention, exported to ONNX (opset 17) as the pipeline exports."""
    torch.manual_seed(0)
    model = TinyBert().eval()
    with torch.no_grad():  # sharper attention than a fresh init: what attention computes then matters
        for layer in model.layers:
            layer.q.weight.mul_(8)
            layer.k.weight.mul_(8)
    example = (torch.zeros((1, SEQ), dtype=torch.int64), torch.ones((1, SEQ), dtype=torch.int64))
    axes = {0: "batch", 1: "sequence"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, buf, dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})
    return onnx.load_from_string(buf.getvalue())


def token_context(tmp_path) -> TechniqueContext:
    """32 calibration rows, 16 evaluation rows, the x86 host's profile."""
    data = {"calibration": Dataset(tokens(32, 1), None), "eval": Dataset(tokens(16, 2), None)}
    data["train"] = data["calibration"]
    return TechniqueContext(task=TokensTask(), data=data, teacher=None,
                            profile=load_profile(ROOT / "device_profiles" / "x86-host.yaml").profile,
                            scratch_dir=tmp_path, seed=0)


def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], kernels: bool = True) -> np.ndarray:
    """The model's outputs, one flattened row per sample (kernels=False: no graph optimisation, QDQ as written)."""
    options = ort.SessionOptions()
    if not kernels:  # no fusion: every QuantizeLinear/DequantizeLinear as written, the MatMuls in float
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rows = [session.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(len(feeds["input_ids"]))]
    return np.concatenate(rows).reshape(len(rows), -1)


def cosine(model: onnx.ModelProto, reference: onnx.ModelProto, ctx, kernels: bool = True) -> float:
    """Mean cosine of `model`'s outputs to `reference`'s on the evaluation rows.

    kernels=False evaluates a QDQ graph as written, in float: what the quantization itself costs,
    the same on every CPU. kernels=True lets onnxruntime fuse it into this CPU's int8 kernels.
    """
    feeds = ctx.data["eval"].inputs
    a, b = outputs(model, feeds, kernels), outputs(reference, feeds)
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

