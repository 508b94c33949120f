"""What the rollout remembers, in the device registry's SQLite file: rollouts, their devices, each device's deployment.

Tables (created if missing, next to `devices`):

- `rollouts`: one `orchestrate deploy` of one run's model to one profile, its options, plan and status;
- `rollout_devices`: each device of a rollout: its wave and state, what it had before, its health check
  (what `deploy --resume` reads);
- `deployments`: per device, what it runs now (model sha256 = version, run, candidate) and its last
  health check. A row counts only while the device is the one registered under that name (same
  `registered_at`): a device removed and registered again starts with none.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from orchestrator.errors import DeployError
from orchestrator.registry import registry_path
from orchestrator.store import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    profile TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    model TEXT NOT NULL,           -- JSON: candidate id, label, precision, out_dir
    options TEXT NOT NULL,         -- JSON: canary, max_parallel, on_failure, keep
    waves TEXT NOT NULL,           -- JSON: [[device, ...], ...], the canaries first
    status TEXT NOT NULL,          -- running | done | incomplete | stopped | done-with-failures | interrupted
    message TEXT,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device TEXT NOT NULL,
    wave INTEGER NOT NULL,
    state TEXT NOT NULL,           -- pending | installing | healthy | rolled-back | failed | offline | skipped
    previous_version TEXT,         -- what was current before the install (sha256), if anything
    error TEXT,
    health TEXT,                   -- JSON, the agent's health check
    updated_at REAL NOT NULL,
    PRIMARY KEY (rollout_id, device)
);
CREATE TABLE IF NOT EXISTS deployments (
    device TEXT PRIMARY KEY,
    registered_at REAL NOT NULL,   -- the registry's registered_at of the device this row is about
    version TEXT,                  -- sha256 of the model current on the device, NULL if none
    run_id TEXT,
    candidate TEXT,
    label TEXT,
    precision TEXT,
    rollout_id TEXT,
    deployed_at REAL,
    health TEXT,                   -- JSON, the last health check (of any version; `version` inside says which)
    health_at REAL
);
"""
FINAL_STATES = ("healthy",)
RESUMABLE = ("incomplete", "interrupted", "running")


class DeploymentStore:
    """Rollouts and deployments; every write is one transaction (safe from the rollout's threads)."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else registry_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(connect(self.path)) as db, db:
            db.executescript(SCHEMA)

    def _write(self, sql: str, args: tuple) -> None:
        with closing(connect(self.path)) as db, db:
            db.execute(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with closing(connect(self.path)) as db:
            return db.execute(sql, args).fetchall()

    # rollouts ---------------------------------------------------------------------------------------

    def create_rollout(self, rollout_id: str, run_id: str, profile: str, model_sha256: str, model: dict[str, Any],
                       options: dict[str, Any], waves: list[list[str]]) -> None:
        """Record a new rollout (`running`) and its devices (`pending`)."""
        now = time.time()
        with closing(connect(self.path)) as db, db:
            db.execute("INSERT INTO rollouts (id, run_id, profile, model_sha256, model, options, waves, status, "
                       "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                       (rollout_id, run_id, profile, model_sha256, json.dumps(model), json.dumps(options),
                        json.dumps(waves), now))
            db.executemany("INSERT INTO rollout_devices (rollout_id, device, wave, state, updated_at) "
                           "VALUES (?, ?, ?, 'pending', ?)",
                           [(rollout_id, name, i, now) for i, wave in enumerate(waves) for name in wave])

    def finish_rollout(self, rollout_id: str, status: str, message: str | None = None) -> None:
        """Set a rollout's status (and when it ended)."""
        self._write("UPDATE rollouts SET status = ?, message = ?, finished_at = ? WHERE id = ?",
                    (status, message, time.time(), rollout_id))

    def get_rollout(self, rollout_id: str) -> dict[str, Any]:
        """One rollout with its devices; a unique prefix of the id is enough."""
        rows = self._read("SELECT * FROM rollouts WHERE id LIKE ? ORDER BY id", (rollout_id + "%",))
        if len(rows) != 1:
            raise DeployError(f"{'no rollout' if not rows else f'{len(rows)} rollouts'} with id {rollout_id!r}")
        return self._with_devices(rows[0])

    def latest_resumable(self, run_id: str | None = None, profile: str | None = None) -> dict[str, Any] | None:
        """The newest rollout that can be resumed (devices left offline, or interrupted), if any."""
        query, args = "SELECT * FROM rollouts WHERE status IN (?, ?, ?)", list(RESUMABLE)
        if run_id:
            query, args = query + " AND run_id LIKE ?", [*args, run_id + "%"]
        if profile:
            query, args = query + " AND profile = ?", [*args, profile]
        rows = self._read(query + " ORDER BY created_at DESC LIMIT 1", tuple(args))
        return self._with_devices(rows[0]) if rows else None

    def latest(self) -> dict[str, Any] | None:
        """The newest rollout, if any."""
        rows = self._read("SELECT * FROM rollouts ORDER BY created_at DESC LIMIT 1")
        return self._with_devices(rows[0]) if rows else None

    def _with_devices(self, row: sqlite3.Row) -> dict[str, Any]:
        rollout = dict(row)
        for key in ("model", "options", "waves"):
            rollout[key] = json.loads(rollout[key])
        devices = self._read("SELECT * FROM rollout_devices WHERE rollout_id = ? ORDER BY wave, device", (row["id"],))
        rollout["devices"] = {d["device"]: {**dict(d), "health": json.loads(d["health"]) if d["health"] else None}
                              for d in devices}
        return rollout

    def set_state(self, rollout_id: str, device: str, state: str, *, error: str | None = None,
                  health: dict[str, Any] | None = None, previous_version: str | None = None) -> None:
        """A device's state in a rollout; error/health/previous_version are kept unless given."""
        self._write(
            "UPDATE rollout_devices SET state = ?, error = ?, health = COALESCE(?, health), "
            "previous_version = COALESCE(?, previous_version), updated_at = ? WHERE rollout_id = ? AND device = ?",
            (state, error, json.dumps(health) if health is not None else None, previous_version, time.time(),
             rollout_id, device))

    # deployments ------------------------------------------------------------------------------------

    def record(self, device: str, registered_at: float, current: dict[str, Any] | None,
               rollout_id: str | None = None, health: dict[str, Any] | None = None) -> None:
        """What a device runs now (`current`: the agent's summary of its current version, or None)."""
        current = current or {}
        now = time.time()
        self._write(
            "INSERT INTO deployments (device, registered_at, version, run_id, candidate, label, precision, rollout_id, "
            "deployed_at, health, health_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(device) DO UPDATE SET registered_at = excluded.registered_at, version = excluded.version, "
            "run_id = excluded.run_id, candidate = excluded.candidate, label = excluded.label, "
            "precision = excluded.precision, rollout_id = COALESCE(excluded.rollout_id, rollout_id), "
            "deployed_at = excluded.deployed_at, health = COALESCE(excluded.health, health), "
            "health_at = COALESCE(excluded.health_at, health_at)",
            (device, registered_at, current.get("version"), current.get("run_id"), current.get("candidate"),
             current.get("label"), current.get("precision"), rollout_id, now,
             json.dumps(health) if health is not None else None, now if health is not None else None))

    def deployments(self, registered: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
        """Per device name, its deployment; with `registered` (name -> registered_at), only rows about those devices."""
        out = {}
        for row in self._read("SELECT * FROM deployments"):
            d = dict(row)
            if registered is not None and registered.get(d["device"]) != d["registered_at"]:
                continue
            d["health"] = json.loads(d["health"]) if d["health"] else None
            out[d["device"]] = d
        return out
