"""The measurement cache (SQLite next to the run store): keyed by (model sha256, device, the device's
runtime, the measurement settings). A device is named by its registry name plus what the agent's
`info` says of it (arch, CPU, onnxruntime version and providers). It may seed a search; it never
decides a pick on its own. `--fresh` makes a run read none of it (it still writes).
"""

from __future__ import annotations

import json
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from orchestrator.state.hashing import digest
from orchestrator.state.paths import state_dir
from orchestrator.state.sqlite import connect

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
