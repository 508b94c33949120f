"""A Hugging Face model folder on disk as a torch module (offline: never the hub), for `--model FOLDER`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orchestrator.errors import ModelSourceError


def load_hf_folder(folder: str) -> tuple[Any, list[Any]]:
    """(torch wrapper, [output name, vocabulary size]) of a Hugging Face model folder on disk, loaded offline.

    The wrapper takes positional (input_ids, attention_mask) and returns the logits of a sequence
    classifier, the pooled sentence embedding of a sentence-transformers folder, or the last hidden state.
    """
    try:
        import transformers
    except ImportError:
        raise ModelSourceError(f"--model {folder}: a Hugging Face folder needs transformers: "
                               "pip install 'edge-orchestrator[hf]'") from None
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a folder on disk; never the hub
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    archs = config.architectures or []
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    auto = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModel
    try:
        inner = auto.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"--model {folder}: {str(exc).splitlines()[0]}") from None
    pooling, normalize = _sentence_transformers_head(Path(folder))
    name = "logits" if classifier else "sentence_embedding" if pooling else "last_hidden_state"

    class HFWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            if classifier or not pooling:
                return out["logits" if classifier else "last_hidden_state"]
            hidden = out["last_hidden_state"]
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:  # the attention-masked mean over tokens, as sentence-transformers pools
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    return HFWrapper().eval(), [name, int(getattr(config, "vocab_size", 0) or 0)]


def _sentence_transformers_head(folder: Path) -> tuple[str | None, bool]:
    """(pooling "mean" | "cls" | None, normalize) of a sentence-transformers folder: what its embedding is."""
    config = folder / "1_Pooling" / "config.json"
    if not config.is_file():
        return None, False
    try:
        pooling = json.loads(config.read_text())
        modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
    except (OSError, ValueError):
        return None, False
    mode = "cls" if pooling.get("pooling_mode_cls_token") else "mean" if pooling.get("pooling_mode_mean_tokens") \
        else None
    return mode, any(str(m.get("type", "")).endswith("Normalize") for m in modules if isinstance(m, dict))
