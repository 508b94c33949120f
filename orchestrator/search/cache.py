"""Content-keyed caches: what a candidate's stages produced, and its accuracy.

- **Stages.** The output of every step of a pipeline is kept under a key that hashes what
  it depends on: the base model's bytes, the task, the seed, the profile's runtime section,
  the library versions that change the output (torch, onnxruntime), and the pipeline prefix
  up to that step (each technique's name, version and parameters). Candidates that share a
  prefix (prune 0.5 + int8, prune 0.5 + fp16) build the prefix once; a second run builds
  nothing it already has. Torch outputs are saved whole (`torch.save(module)`: pruning
  changes the architecture) when their classes can be pickled (a task whose classes are
  local to a function gets its ONNX export cached instead), ONNX outputs as bytes.
- **Accuracy** of an ONNX model on a task's held-out data: keyed by (model sha256, task, seed).
(Measurements are cached by orchestrator/fleet/measurements.py.)

Every file is written to a temporary name and renamed into place, so a crash never leaves
a half entry that looks finished; a concurrent writer of the same key writes the same bytes.
`--fresh` makes a run read none of these (it still writes them).

The cache folder has a size limit (orchestrator/state/cachelimit.py): a hit marks its entry used, a
write may trim the least recently used entries, and `trim_caches()` trims when a run ends.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

from orchestrator.state.cachelimit import note_written, touch, trim_caches
from orchestrator.state.hashing import atomic_write, digest
from orchestrator.state.paths import cache_dir

log = logging.getLogger(__name__)

__all__ = ["AccuracyCache", "StageCache", "library_versions", "trim_caches"]


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour is part of a stage's output."""
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


class StageCache:
    """Outputs of pipeline prefixes, one file per key (`.pt` torch module or `.onnx` bytes) plus `.json` metadata."""

    def __init__(self, folder: Path | None = None, read: bool = True) -> None:
        self.folder = Path(folder) if folder is not None else cache_dir("stages")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.read = read
        self.limited = folder is None  # only the state folder's cache counts against the size limit

    @staticmethod
    def root_key(base_state: bytes, task_fingerprint: str, seed: int, runtime: dict[str, Any]) -> str:
        """Key of the untouched base model: everything a stage's output depends on before any step."""
        return digest({"base": hashlib.sha256(base_state).hexdigest(), "task": task_fingerprint, "seed": seed,
                       "runtime": runtime, "versions": library_versions()})

    @staticmethod
    def step_key(parent: str, step: str, version: str, params: dict[str, Any]) -> str:
        """Key of a prefix's output: its parent's key plus one step (a technique, or `export`)."""
        return digest({"parent": parent, "step": step, "version": version, "params": params})

    def get(self, key: str) -> tuple[Any, dict[str, Any]] | None:
        """(model, metadata) for a key: a torch module or ONNX bytes; None when absent or unreadable."""
        if not self.read:
            return None
        meta_path = self.folder / f"{key}.json"
        try:
            meta = json.loads(meta_path.read_text())
            data = (self.folder / f"{key}.{meta['kind']}").read_bytes()
        except (OSError, ValueError, KeyError):
            return None
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None  # damaged: rebuilt and overwritten
        touch(meta_path)  # used now: the least recently used entries are the ones trimmed
        if meta["kind"] == "onnx":
            return data, meta
        import torch

        try:
            # Our own files, written by this user into their cache; whole modules need full unpickling.
            return torch.load(io.BytesIO(data), weights_only=False), meta
        except Exception:  # noqa: BLE001 - a module class that no longer loads: rebuild
            return None

    def put(self, key: str, model: Any, meta: dict[str, Any]) -> None:
        """Keep a prefix's output (torch module or ONNX bytes/ModelProto)."""
        if isinstance(model, (bytes, bytearray)):
            kind, data = "onnx", bytes(model)
        elif hasattr(model, "SerializeToString"):
            kind, data = "onnx", model.SerializeToString()
        else:
            import torch

            buf = io.BytesIO()
            try:
                torch.save(model, buf)
            except Exception as exc:  # noqa: BLE001 - e.g. a task whose module classes are local to a function
                # Not kept; the export of this prefix (ONNX, always kept) still spares what follows it.
                log.debug("stage %s not cached: its torch module cannot be saved whole (%s)", key[:12], exc)
                return
            kind, data = "pt", buf.getvalue()
        atomic_write(self.folder / f"{key}.{kind}", data)
        meta = {**meta, "kind": kind, "sha256": hashlib.sha256(data).hexdigest(), "written_at": time.time()}
        text = json.dumps(meta).encode()
        atomic_write(self.folder / f"{key}.json", text)
        if self.limited:
            note_written(len(data) + len(text))


class AccuracyCache:
    """Accuracy of a model on a task's held-out data, by (model sha256, task fingerprint, seed)."""

    def __init__(self, folder: Path | None = None, read: bool = True) -> None:
        self.folder = Path(folder) if folder is not None else cache_dir("accuracy")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.read = read
        self.limited = folder is None

    def _path(self, model_sha: str, task_fingerprint: str, seed: int) -> Path:
        return self.folder / f"{digest([model_sha, task_fingerprint, seed])}.json"

    def get(self, model_sha: str, task_fingerprint: str, seed: int) -> float | None:
        if not self.read:
            return None
        path = self._path(model_sha, task_fingerprint, seed)
        try:
            accuracy = float(json.loads(path.read_text())["accuracy"])
        except (OSError, ValueError, KeyError):
            return None
        touch(path)
        return accuracy

    def put(self, model_sha: str, task_fingerprint: str, seed: int, accuracy: float) -> None:
        text = json.dumps({"model": model_sha, "accuracy": accuracy}).encode()
        atomic_write(self._path(model_sha, task_fingerprint, seed), text)
        if self.limited:
            note_written(len(text))
