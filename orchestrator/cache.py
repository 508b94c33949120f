"""Content-keyed caches: what a candidate's stages produced, its accuracy, and its measurements.

- **Stages.** The output of every step of a pipeline is kept under a key that hashes what
  it depends on: the base model's bytes, the task, the seed, the profile's runtime section,
  the library versions that change the output (torch, onnxruntime), and the pipeline prefix
  up to that step (each technique's name, version and parameters). Candidates that share a
  prefix (prune 0.5 + int8, prune 0.5 + fp16) build the prefix once; a second run builds
  nothing it already has. Torch outputs are saved whole (`torch.save(module)`: pruning
  changes the architecture) when their classes can be pickled (a task whose classes are
  local to a function gets its ONNX export cached instead), ONNX outputs as bytes.
- **Accuracy** of an ONNX model on a task's held-out data: keyed by (model sha256, task, seed).
- **Measurements** (`MeasurementCache`, SQLite next to the run store): keyed by (model sha256,
  device, the device's runtime, the measurement settings). A device is named by its registry
  name plus what the agent's `info` says of it (arch, CPU, onnxruntime version and providers).

Every file is written to a temporary name and renamed into place, so a crash never leaves
a half entry that looks finished; a concurrent writer of the same key writes the same bytes.
`--fresh` makes a run read none of these (it still writes them).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from orchestrator.paths import cache_dir, state_dir
from orchestrator.store import connect

log = logging.getLogger(__name__)


def digest(obj: Any) -> str:
    """sha256 of a JSON-able object (keys sorted), hex."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
        _atomic_write(self.folder / f"{key}.{kind}", data)
        meta = {**meta, "kind": kind, "sha256": hashlib.sha256(data).hexdigest(), "written_at": time.time()}
        _atomic_write(self.folder / f"{key}.json", json.dumps(meta).encode())


class AccuracyCache:
    """Accuracy of a model on a task's held-out data, by (model sha256, task fingerprint, seed)."""

    def __init__(self, folder: Path | None = None, read: bool = True) -> None:
        self.folder = Path(folder) if folder is not None else cache_dir("accuracy")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.read = read

    def _path(self, model_sha: str, task_fingerprint: str, seed: int) -> Path:
        return self.folder / f"{digest([model_sha, task_fingerprint, seed])}.json"

    def get(self, model_sha: str, task_fingerprint: str, seed: int) -> float | None:
        if not self.read:
            return None
        try:
            return float(json.loads(self._path(model_sha, task_fingerprint, seed).read_text())["accuracy"])
        except (OSError, ValueError, KeyError):
            return None

    def put(self, model_sha: str, task_fingerprint: str, seed: int, accuracy: float) -> None:
        _atomic_write(self._path(model_sha, task_fingerprint, seed),
                      json.dumps({"model": model_sha, "accuracy": accuracy}).encode())


MEASUREMENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS measurements (
    model_sha256 TEXT NOT NULL,
    device_key TEXT NOT NULL,      -- digest of the device's name and its agent's info (arch, CPU, runtime)
    settings_key TEXT NOT NULL,    -- digest of the bench settings (the profile's protocol, threads, pinning)
    device TEXT NOT NULL,
    result TEXT NOT NULL,          -- JSON, the agent's bench answer
    measured_at REAL NOT NULL,
    PRIMARY KEY (model_sha256, device_key, settings_key)
);
"""


def measurements_path() -> Path:
    """The measurement cache's SQLite file, in the state folder."""
    return state_dir() / "measurements.sqlite"


def device_key(name: str, info: dict[str, Any]) -> str:
    """Identity of a device for the measurement cache: its name plus what its agent says it runs."""
    keys = ("arch", "cpu_model", "cores", "memory_mb", "onnxruntime", "providers", "emulated", "qemu_cpu")
    return digest({"name": name, **{k: info.get(k) for k in keys}})


class MeasurementCache:
    """Bench results by (model, device, runtime, settings), in SQLite (WAL; one write per measurement)."""

    def __init__(self, path: Path | None = None, read: bool = True) -> None:
        self.path = Path(path) if path is not None else measurements_path()
        self.read = read
        with closing(connect(self.path)) as db, db:
            db.executescript(MEASUREMENTS_SCHEMA)

    def get(self, model_sha: str, dev_key: str, settings_key: str) -> dict[str, Any] | None:
        if not self.read:
            return None
        with closing(connect(self.path)) as db:
            row = db.execute(
                "SELECT result FROM measurements WHERE model_sha256 = ? AND device_key = ? AND settings_key = ?",
                (model_sha, dev_key, settings_key),
            ).fetchone()
        return json.loads(row["result"]) if row else None

    def put(self, model_sha: str, dev_key: str, settings_key: str, device: str, result: dict[str, Any]) -> None:
        with closing(connect(self.path)) as db, db:
            db.execute(
                "INSERT OR REPLACE INTO measurements VALUES (?, ?, ?, ?, ?, ?)",
                (model_sha, dev_key, settings_key, device, json.dumps(result), time.time()),
            )

    def for_device(self, device: str, settings_key: str, limit: int = 500) -> list[tuple[str, dict[str, Any]]]:
        """(model sha256, result) of the newest measurements taken on a device with the given settings."""
        with closing(connect(self.path)) as db:
            rows = db.execute(
                "SELECT model_sha256, result FROM measurements WHERE device = ? AND settings_key = ? "
                "ORDER BY measured_at DESC LIMIT ?", (device, settings_key, limit)).fetchall()
        return [(row["model_sha256"], json.loads(row["result"])) for row in rows]

    def count(self) -> int:
        """How many measurements are cached (tests and `runs` statistics)."""
        with closing(connect(self.path)) as db:
            return db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
