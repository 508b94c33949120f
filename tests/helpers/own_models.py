"""Models a user brings (`--model package.module:factory`), made in the test itself: no download.

`tiny_bert`: a 2-layer BERT built from a config with a fixed seed, taking int64 (input_ids,
attention_mask) and returning mean-pooled embeddings: the shape of a sentence-embedding model.
`export_breaks`: a model that runs in torch but cannot be exported (the fail-fast test).
`small_cnn`: a 3-layer CNN with a fixed seed (image [N, 3, 16, 16] -> 10 logits): what structured
pruning can cut and fine-tuning can bring back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VOCAB, SEQUENCE = 300, 24


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return BertModel(config, add_pooling_layer=False).eval()


class MeanPooled(torch.nn.Module):
    """(input_ids, attention_mask) -> the attention-masked mean of the last hidden states."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = _bert()

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def tiny_bert() -> torch.nn.Module:
    """The factory `--model tests.helpers.own_models:tiny_bert` calls."""
    return MeanPooled().eval()


class _ExportBreaks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError("this layer has no ONNX form")
        return self.linear(x)


def export_breaks() -> torch.nn.Module:
    """A model that evaluates in torch and fails in torch.onnx.export."""
    return _ExportBreaks().eval()


def token_samples(path: Path, rows: int = 32, seed: int = 0) -> Path:
    """An .npz of int64 ids and masks (some rows padded), as a tokenizer would give."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(rows, SEQUENCE)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(0, rows, 3):
        cut = int(rng.integers(SEQUENCE // 2, SEQUENCE))
        ids[row, cut:], mask[row, cut:] = 0, 0
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path


def small_cnn() -> torch.nn.Module:
    """The factory `--model tests.helpers.own_models:small_cnn` calls."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def image_samples(path: Path, rows: int = 64, seed: int = 0) -> Path:
    """Smooth random images [rows, 3, 16, 16] (float32), no labels, saved as .npz."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((rows, 3, 4, 4)).astype(np.float32)
    np.savez(path, input=np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3))
    return path


def new_weights_each_call() -> torch.nn.Module:
    """A factory that initialises its model randomly on every call (no seed): what `--model` must refuse."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()


def exits_instead_of_returning() -> torch.nn.Module:
    """A factory that calls sys.exit(0) (a script's main turned factory): `--model` must call it an error, not exit 0."""
    import sys

    sys.exit(0)
